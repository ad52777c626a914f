"""`kunlite profile`: the grid, batch recovery from step timings, and a quick run on a tiny
model (the JSON and its report; no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kunlite.__main__ import main as kunlite_main
from kunlite.engine.step_cost import step_features
from kunlite.sim.profile import load_profile
from kunlite.sim.profile_grid import FULL, QUICK, Grid, median_samples, reconstruct, split_evenly
from tiny_models import make_tiny_model


def timing_of(batch: list[tuple[int, int]]) -> tuple[int, int, int]:
    """What EngineCore's StepTiming reports for a batch: prefill tokens (chunks of more than one
    token), decode tokens, and the sum of every sequence's computed tokens after the step."""
    return (sum(q for q, _ in batch if q > 1), sum(q for q, _ in batch if q == 1), sum(q + c for q, c in batch))


def test_reconstruct_by_hand() -> None:
    # Decodes at contexts 100, 101, 103: only their sum is known, split evenly.
    assert reconstruct(0, 3, 3 + 100 + 101 + 103, []) == [(1, 102), (1, 101), (1, 101)]
    assert reconstruct(128, 0, 128 + 256, []) == [(128, 256)]
    assert reconstruct(64, 2, (10 + 1) + (20 + 1) + (64 + 512), [10, 20]) == [(1, 10), (1, 20), (64, 512)]
    assert reconstruct(64, 2, 100, [10, 20, 30]) is None  # three tracked decodes, two ran
    assert reconstruct(64, 2, 50, [10, 20]) is None  # the chunk would have a negative context
    assert reconstruct(0, 0, 0, []) is None


@given(decodes=st.lists(st.integers(0, 5000), max_size=40),
       chunk=st.one_of(st.none(), st.tuples(st.integers(2, 2048), st.integers(0, 8192))))
def test_reconstructed_batches_have_the_true_features(decodes: list[int], chunk: tuple[int, int] | None) -> None:
    batch = [(1, c) for c in decodes] + ([chunk] if chunk else [])
    if not batch:
        return
    got = reconstruct(*timing_of(batch), decodes)
    assert got is not None and step_features(got) == step_features(batch)


@given(total=st.integers(0, 10_000), n=st.integers(1, 64))
def test_split_evenly(total: int, n: int) -> None:
    parts = split_evenly(total, n)
    assert len(parts) == n and sum(parts) == total and max(parts) - min(parts) <= 1


def test_grid_documents_budget_and_fit() -> None:
    g = Grid(prefill=((16, 0), (64, 300)), decode=((2, 100), (3, 40)), mixed=((2, 50, 32, 200),),
             repeats=2, decode_steps=2)
    # doc 0 and 1: prefills (300) and mixed prefills (200) of repeats 0, 1; decodes: docs 0..2.
    assert g.doc_lengths() == [300, 300, 40]
    assert g.budget == 64 and g.max_seqs == 3
    small = g.fit_to(100)
    assert small.prefill == ((16, 0),) and small.decode == ((3, 40),) and small.mixed == ()
    assert FULL.budget == 512 and sum(FULL.doc_lengths()) == 8 * 1024 + 24 * 256
    assert QUICK.fit_to(256).prefill == ((16, 0), (128, 0))


def test_median_samples_group_by_cell_and_shape() -> None:
    rows = [("a", [(1, 5), (1, 6)], 3.0), ("a", [(1, 6), (1, 5)], 1.0), ("a", [(1, 5), (1, 6)], 2.0),
            ("b", [(1, 5), (1, 6)], 9.0)]
    got = median_samples(rows)
    assert [(s.cell, s.batch, s.seconds, s.repeats) for s in got] == [
        ("a", [(1, 5), (1, 6)], 2.0, 3), ("b", [(1, 5), (1, 6)], 9.0, 1)]


def test_quick_profile_on_a_tiny_model(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_tiny_model(tiny_root, "llama-gqa-tied")
    out = tmp_path / "profile.json"
    assert kunlite_main(["profile", "--quick", "--model", str(model), "--threads", "1", "--device-memory", "16MiB",
                         "--dtype", "float32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "relative error median" in printed and f"wrote {out}" in printed
    p = json.loads(out.read_text())
    assert (p["device"], p["model"], p["dtype"], p["threads"], p["num_layers"], p["grid"]) == (
        "cpu", str(model), "float32", 1, 3, "quick")
    assert p["p2p"] is None
    fit = p["fit"]
    assert fit["features"] == ["tokens", "attention_pairs", "sequences", "constant"]
    assert all(w >= 0 for w in fit["weights"].values())
    assert fit["report"]["median_rel_error"] >= 0 and fit["report"]["num_eval"] > 0
    samples = {(s["cell"], tuple(map(tuple, s["batch"]))): s for s in p["samples"]}
    assert all(s["seconds"] > 0 and s["repeats"] >= 1 for s in p["samples"])
    # The cells' intended shapes came back from the aggregates: the prefix cache served the
    # contexts, and the mixed step is 4 decodes plus one chunk.
    assert ("prefill q=16 c=0", ((16, 0),)) in samples
    assert ("decode B=4 c=64", ((1, 65),) * 4) in samples
    assert ("mixed B=4 c=64 + q=128 c=0", ((1, 65),) * 4 + ((128, 0),)) in samples
    assert samples[("prefill q=16 c=0", ((16, 0),))]["repeats"] == 2
    # The event loop's view of it: a FittedStepCost, and a measured link once p2p is filled.
    cost, link = load_profile(out)
    batch = [(1, 40), (16, 0)]
    assert cost.step_seconds(batch, (0, 3)) == pytest.approx(cost.weights.predict(batch)) and link is None
    _, link = load_profile({**p, "p2p": [[1024, 1e-4], [1 << 20, 1e-3]]})
    assert link is not None and link.seconds(1 << 20) == pytest.approx(1e-3)


def test_served_seconds_by_hand() -> None:
    from kunlite.sim.profile_served import served_seconds

    log = [
        # instance 0: planned at 1.0, committed 1.5; the next was planned before that commit
        # (at 1.45: a pipeline of one? no: the plan raced the commit message), so it counts from 1.5
        {"instance": 0, "stages": 1, "started": 1.0, "ended": 1.5, "batch": [[16, 0]]},
        {"instance": 0, "stages": 1, "started": 1.45, "ended": 1.7, "batch": [[1, 16]]},
        # after idling, a step counts from its plan
        {"instance": 0, "stages": 1, "started": 3.0, "ended": 3.1, "batch": [[1, 17]]},
        # another instance's steps interleave and count on their own
        {"instance": 1, "stages": 1, "started": 1.2, "ended": 1.6, "batch": [[8, 0], [1, 30]]},
        # a pipeline's steps and a batch not recorded are left out
        {"instance": 2, "stages": 2, "started": 1.0, "ended": 1.4, "batch": [[1, 5]]},
        {"instance": 1, "stages": 1, "started": 2.0, "ended": 2.2, "batch": None},
    ]
    got = served_seconds(log)
    assert [(b, pytest.approx(s)) for b, s in got] == [
        ([(16, 0)], 0.5), ([(1, 16)], 0.2), ([(1, 17)], 0.1), ([(8, 0), (1, 30)], 0.4)]


def test_served_profile_through_a_two_worker_server(smollm2: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # The real server (2 workers, gloo) under the quick calibration load: every replica step
    # is in the step log with its batch, and the fit comes from them.
    out, steps = tmp_path / "served.json", tmp_path / "steps.jsonl"
    assert kunlite_main(["profile", "--served", "--quick", "--model", str(smollm2), "--devices", "2", "--threads", "1",
                         "--device-memory", "1GiB", "--max-model-len", "256", "--dtype", "bfloat16",
                         "--step-log", str(steps), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "calibration waves served" in printed and "relative error median" in printed
    lines = [json.loads(x) for x in steps.read_text().splitlines()]
    assert {x["instance"] for x in lines} == {0, 1}  # both replicas served
    assert all(x["ended"] > x["started"] and x["batch"] for x in lines)
    # the prompts' tokens were logged (6 waves at once, 2 long and 12 burst requests; a few
    # may come from the prefix cache), and decode steps of up to 6 sequences a replica
    prefilled = sum(q for x in lines for q, _ in x["batch"] if q > 1)
    assert prefilled >= 0.8 * ((16 + 64) * (1 + 4 + 12) + 2 * 100 + 12 * 48)
    assert max(sum(q == 1 for q, _ in x["batch"]) for x in lines) >= 6
    p = json.loads(out.read_text())
    assert (p["grid"], p["dtype"], p["threads"], p["num_layers"]) == ("served-quick", "bfloat16", 1, 30)
    assert p["served"]["steps"] == len(lines) and len(p["samples"]) > 20
    assert all(w >= 0 for w in p["fit"]["weights"].values()) and p["fit"]["report"]["num_eval"] > 0
    cost, _ = load_profile(out)
    assert cost.step_seconds([(1, 100)] * 8, (0, 30)) > cost.step_seconds([(1, 100)], (0, 30)) > 0


def test_decode_and_prefill_steps_weigh_the_same_in_all() -> None:
    from kunlite.sim.profile_served import balanced_weights, frontend_latency, step_kind

    batches = [[(1, 5)]] * 9 + [[(1, 5), (30, 0)]] * 3
    w = balanced_weights(batches)
    kinds = [step_kind(b) for b in batches]
    assert kinds.count("decode") == 9 and kinds.count("prefill") == 3
    assert sum(x for x, k in zip(w, kinds) if k == "decode") == pytest.approx(6.0)
    assert sum(x for x, k in zip(w, kinds) if k == "prefill") == pytest.approx(6.0)
    # A probe sent at 10.0 is planned at 10.03 and committed at 10.3; its first token at 10.31.
    lines = [{"instance": 0, "stages": 1, "started": 10.03, "ended": 10.3, "batch": [[16, 0]]},
             {"instance": 0, "stages": 1, "started": 10.3, "ended": 10.35, "batch": [[1, 16]]}]
    got = frontend_latency([(10.0, 10.31)], lines)
    assert got["probes"] == 1 and got["ingress_s"] == pytest.approx(0.03) and got["egress_s"] == pytest.approx(0.01)
