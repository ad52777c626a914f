"""The simulator's event loop on traces small enough to check by hand, and the engine's own
policies running in virtual time (no processes, no tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kunlite.engine.args import EngineOptions
from kunlite.sim.cluster import SimHardware
from kunlite.sim.simulate import simulate
from kunlite.sim.traces import TraceRequest
from tiny_models import make_tiny_model


class ConstantCost:
    """Every step of a stage takes `seconds`, whatever it holds."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def step_seconds(self, batch, layers) -> float:  # type: ignore[no-untyped-def]
        return self.seconds


def hardware(step_s: float, memory: str = "8MiB", link_s: float = 0.0) -> SimHardware:
    from kunlite.config import parse_size

    return SimHardware(ConstantCost(step_s), lambda n: link_s, lambda n: 0.0, 1e12, parse_size(memory))


def options(model: Path, **kw) -> EngineOptions:  # type: ignore[no-untyped-def]
    return EngineOptions(model=str(model), devices=2, dtype="float32", page_size=4, max_model_len=128,
                         max_num_batched_tokens=32, enable_prefix_caching=False, **kw)


@pytest.fixture(scope="module")
def tiny(tiny_root: Path) -> Path:
    return make_tiny_model(tiny_root, "llama-gqa-tied")


def test_one_request_one_second_per_step(tiny: Path) -> None:
    # Prompt of 5 in one step (the first token), then 2 decode steps: TTFT 1, ITL 1, 1, E2E 3.
    r = simulate(options(tiny), hardware(1.0), [TraceRequest(0.5, 5, 3)])
    [rec] = r.records
    assert (rec.status, rec.ttft, rec.itl, rec.e2e, rec.output_tokens) == ("ok", 1.0, [1.0, 1.0], 3.0, 3)


def test_two_arrivals_go_to_two_replicas(tiny: Path) -> None:
    r = simulate(options(tiny), hardware(1.0), [TraceRequest(0.0, 5, 2), TraceRequest(0.0, 7, 2)])
    assert [rec.ttft for rec in r.records] == [1.0, 1.0]  # in parallel, one per instance


def test_a_longer_prompt_takes_more_chunks(tiny: Path) -> None:
    # 70 tokens at a budget of 32: chunks of 32, 32, 6 -> the first token after 3 steps.
    r = simulate(options(tiny), hardware(0.25), [TraceRequest(0.0, 70, 1)])
    assert r.records[0].ttft == pytest.approx(0.75)


def test_a_pipeline_runs_its_stages_one_after_the_other(tiny: Path) -> None:
    # Two stages of 0.5 s and a 0.1 s link for the activations: a step is 1.1 s end to end.
    r = simulate(options(tiny, pipeline_parallel=2), hardware(0.5, link_s=0.1), [TraceRequest(0.0, 5, 2)])
    assert r.records[0].ttft == pytest.approx(1.1) and r.records[0].itl == [pytest.approx(1.1)]


def test_recompute_under_pressure_preempts_and_finishes_everything(tiny: Path) -> None:
    trace = [TraceRequest(0.01 * i, 20 + 3 * i, 60) for i in range(10)]
    r = simulate(options(tiny), hardware(0.01, memory=str(650 * 1024)), trace)
    assert r.metrics["completed"] == 10 and r.counters["preemptions"] > 0


def test_kunserve_drops_and_restores_in_virtual_time(tiny: Path) -> None:
    """The parameter-centric policy itself, unchanged: a burst on a scarce KV drops, the
    group serves as a pipeline, and calm restores two replicas."""
    trace = [TraceRequest(0.01 * i, 20 + 3 * i, 60) for i in range(10)]
    r = simulate(options(tiny, overload_policy="kunserve", exchange="stall", calm_window=0.5),
                 hardware(0.01, memory=str(650 * 1024)), trace)
    assert r.metrics["completed"] == 10
    assert r.counters["drops"] >= 1 and r.counters["restores"] >= 1 and r.counters["exchanged_bytes"] > 0
    kinds = [k for _, k, _ in r.events]
    assert kinds.index("drop") < kinds.index("restore")
    # The timeline sees the layers change: 3 layers per device, then 2 + 1, then 3 again.
    held = [sorted(row[4] for row in rows) for _, rows in r.timeline]
    assert [3, 3] in held and [1, 2] in held


def test_policies_in_worker_processes_give_the_same_results(tiny: Path) -> None:
    from kunlite.sim.link import Link
    from kunlite.sim.simulate import run_policies

    hw = SimHardware(ConstantCost(0.01), Link(1e-4, 1e9).seconds, Link(1e-5, 1e10).seconds, 1e12, 650 * 1024)
    trace = [TraceRequest(0.01 * i, 20 + 3 * i, 60) for i in range(10)]
    policies = ["recompute", "swap", "kunserve-stall"]
    one = run_policies(options(tiny, calm_window=0.5), hw, trace, policies)
    two = run_policies(options(tiny, calm_window=0.5), hw, trace, policies, jobs=2)
    key = lambda rs: [(r.policy, [(x.ttft, x.itl, x.e2e) for x in r.records], r.counters) for r in rs]  # noqa: E731
    assert key(two) == key(one) and [r.policy for r in two] == policies
    assert one[0].counters["preemptions"] > 0 and one[2].counters["drops"] > 0
