"""The simulator's fast-forward (k decode steps of a replica as one flight) is the same run as
stepping one decode at a time: every request's TTFT, ITLs and E2E, and every policy counter,
equal to the last bit, under memory pressure, with arrivals cutting flights short."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kunlite.config import parse_size
from kunlite.engine.args import EngineOptions
from kunlite.sim.cluster import SimCluster, SimHardware
from kunlite.sim.simulate import POLICIES, simulate
from kunlite.sim.traces import TraceRequest
from tiny_models import make_tiny_model


class LinearCost:
    """A step costs more with its tokens and their context, so each decode step of a flight
    has its own length."""

    def step_seconds(self, batch, layers) -> float:  # type: ignore[no-untyped-def]
        return 0.004 + sum(q * 2e-4 + q * (c + q) * 2e-6 for q, c in batch)


@pytest.fixture(scope="module")
def tiny(tiny_root: Path) -> Path:
    return make_tiny_model(tiny_root, "llama-gqa-tied")


def trace(n: int = 60, seed: int = 1) -> list[TraceRequest]:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(0.05, n))  # (n,) arrivals, a few steps apart
    return [TraceRequest(float(t[i]), int(rng.integers(5, 60)), int(rng.integers(5, 90))) for i in range(n)]


# Seeds where a replica is throttled (and the group merged) while the other fast-forwards:
# kunserve's flights must end with their step in progress, and the merged group's cost fit
# must see the absorbed flight's last step; and where a fast-forwarding replica runs short of
# KV, which starts a migration (each failed before it was handled).
#
# ("migrate", 7, 80, "640KiB"): an arrival cuts a flight of an instance that becomes the
# source of a migration before the step in progress ends; the steps done by then must be
# committed at the cut (the candidate and its blocks are sized from its tokens).
@pytest.mark.parametrize("policy,seed,n,memory", [
    ("recompute", 1, 60, "700KiB"), ("swap", 1, 60, "700KiB"), ("migrate", 1, 60, "700KiB"),
    ("migrate", 5, 60, "700KiB"), ("migrate", 7, 80, "640KiB"), ("kunserve-remote", 1, 60, "700KiB"),
    ("kunserve-remote", 9, 60, "700KiB"), ("kunserve-stall", 0, 60, "700KiB"), ("kunserve-stall", 5, 60, "700KiB"),
    ("kunserve-stall", 9, 60, "700KiB"), ("kunserve-recompute", 21, 60, "700KiB")])
def test_fast_forward_is_the_same_run(tiny: Path, policy: str, seed: int, n: int, memory: str) -> None:
    hw = SimHardware(LinearCost(), lambda n: 1e-4 + n / 1e9, lambda n: 1e-5 + n / 1e10, 1e12, parse_size(memory))
    opts = replace(EngineOptions(model=str(tiny), devices=2, dtype="float32", page_size=4, max_model_len=256,
                                 max_num_batched_tokens=64, enable_prefix_caching=False, calm_window=0.5),
                   **POLICIES[policy])
    reqs = trace(n=n, seed=seed)
    step = simulate(opts, hw, reqs, policy=policy, fast_forward=False)
    fast = simulate(opts, hw, reqs, policy=policy, fast_forward=True)
    assert step.metrics["completed"] == len(reqs)
    assert step.counters["preemptions"] > 0  # the pool runs out: the policy acts
    assert [(r.status, r.ttft, r.itl, r.e2e, r.output_tokens) for r in fast.records] == \
        [(r.status, r.ttft, r.itl, r.e2e, r.output_tokens) for r in step.records]
    assert fast.counters == step.counters
    assert step.fast_forward["flights"] == 0
    assert fast.fast_forward["steps"] > 2 * fast.fast_forward["flights"] > 0
    if policy in ("recompute", "swap"):
        assert fast.fast_forward["queued"] > 0  # flights with a queue that does not fit


# A static pipeline's windows (sim/pipeline_ff.py): its microbatch streams take several decode
# steps each as one flight while the scheduler would plan the same microbatches; arrivals,
# sequences that end, the KV that runs out (recompute preempts at 700 KiB) end them.
@pytest.mark.parametrize("seed,devices,memory", [(0, 2, "700KiB"), (1, 4, "700KiB"), (2, 2, "4MiB"),
                                                 (3, 4, "4MiB"), (4, 2, "700KiB")])
def test_a_pipelines_fast_forward_is_the_same_run(tiny: Path, seed: int, devices: int, memory: str) -> None:
    hw = SimHardware(LinearCost(), lambda n: 1e-4 + n / 1e9, lambda n: 1e-5 + n / 1e10, 1e12, parse_size(memory))
    opts = replace(EngineOptions(model=str(tiny), devices=devices, dtype="float32", page_size=4, max_model_len=256,
                                 max_num_batched_tokens=64, enable_prefix_caching=False), **POLICIES["pp2"])
    reqs = trace(n=80, seed=seed)
    step = simulate(opts, hw, reqs, policy="pp2", fast_forward=False)
    fast = simulate(opts, hw, reqs, policy="pp2", fast_forward=True)
    assert step.metrics["completed"] == len(reqs)
    assert [(r.status, r.ttft, r.itl, r.e2e, r.output_tokens) for r in fast.records] == \
        [(r.status, r.ttft, r.itl, r.e2e, r.output_tokens) for r in step.records]
    assert fast.counters == step.counters
    assert fast.fast_forward["steps"] > 3 * fast.fast_forward["flights"] > 0
    if memory == "700KiB" and devices == 2:
        assert step.counters["preemptions"] > 0


def test_a_stage_that_only_times_its_step_takes_no_loop_pass(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline stage's StageDone before the last (its step's slowest stage, the bubble meter)
    is handled just before the next event, not in a simulation loop pass of its own: the same
    run, the same bubble meters, fewer passes."""
    hw = SimHardware(LinearCost(), lambda n: 1e-4 + n / 1e9, lambda n: 1e-5 + n / 1e10, 1e12, parse_size("700KiB"))
    opts = replace(EngineOptions(model=str(tiny), devices=2, dtype="float32", page_size=4, max_model_len=256,
                                 max_num_batched_tokens=64, enable_prefix_caching=False), **POLICIES["pp2"])
    reqs = trace(n=60, seed=0)
    clusters: list[SimCluster] = []
    passes = [0]
    init, step = SimCluster.__init__, SimCluster.step

    def counted(self: SimCluster, *a: Any, **k: Any) -> Any:
        passes[0] += 1
        return step(self, *a, **k)

    monkeypatch.setattr(SimCluster, "__init__", lambda self, *a, **k: (init(self, *a, **k), clusters.append(self))[0])
    monkeypatch.setattr(SimCluster, "step", counted)
    def run(quiet: bool) -> tuple[Any, Any, int]:
        monkeypatch.setattr(SimCluster, "quiet_stages", quiet)
        passes[0] = 0
        out = []
        for ff in (True, False):
            r = simulate(opts, hw, reqs, policy="pp2", fast_forward=ff)
            c = clusters[-1]
            assert not c._quiet  # every stage's timing was handled
            out.append(([(x.status, x.ttft, x.itl, x.e2e) for x in r.records], r.counters,
                        [(i.bubbles.busy, i.bubbles.wall) for i in c.instances.values()]))
        return out[0], out[1], passes[0]

    quiet_ff, quiet_step, quiet_passes = run(True)
    loud_ff, loud_step, loud_passes = run(False)
    assert quiet_ff == loud_ff and quiet_step == loud_step
    assert quiet_step[1]["preemptions"] > 0
    assert quiet_passes < 0.9 * loud_passes


def test_a_pipeline_window_on_the_analytic_cost(tiny: Path) -> None:
    # The built-in profiles cost a flight's steps with decode_steps_seconds, in chunks: the
    # same floats as the step-by-step run's batches. Qwen2.5-14B on 8 x A800, a minute of trace.
    from kunlite.sim import cli

    argv = ["--model", "qwen2.5-14b", "--device", "a800", "--devices", "8", "--synthetic", "--duration", "60",
            "--rate", "6", "--max-num-seqs", "256", "--max-num-batched-tokens", "4096"]
    args = cli._resolve(cli.build_parser().parse_args(argv))
    opts = EngineOptions(model=cli.model_dir(args.model), devices=8, dtype=args.dtype, page_size=args.page_size,
                         max_num_seqs=256, max_num_batched_tokens=4096, max_model_len=args.max_model_len,
                         enable_prefix_caching=False)
    hw = cli.hardware(args, opts.build().model)
    reqs = cli.trace_of(args)
    o = replace(opts, **POLICIES["pp2"])
    step = simulate(o, hw, reqs, policy="pp2", fast_forward=False)
    fast = simulate(o, hw, reqs, policy="pp2", fast_forward=True)
    assert [(r.status, r.ttft, r.itl, r.e2e) for r in fast.records] == [(r.status, r.ttft, r.itl, r.e2e) for r in step.records]
    assert fast.fast_forward["steps"] > 10_000


def test_a_queue_that_does_not_fit_does_not_stop_a_flight(tiny: Path) -> None:
    # Long generations fill the pool; the queue behind them waits for one to end. The replicas
    # fast-forward meanwhile, and a newcomer at the tail of the queue does not cut them.
    hw = SimHardware(LinearCost(), lambda n: 0.0, lambda n: 0.0, 1e12, parse_size("700KiB"))
    opts = EngineOptions(model=str(tiny), devices=2, dtype="float32", page_size=4, max_model_len=256,
                         max_num_batched_tokens=64, enable_prefix_caching=False)
    reqs = [TraceRequest(0.0, 60, 150) for _ in range(4)] + [TraceRequest(0.01 * i, 100, 20) for i in range(1, 7)]
    step = simulate(opts, hw, reqs, fast_forward=False)
    fast = simulate(opts, hw, reqs, fast_forward=True)
    assert [(r.ttft, r.itl, r.e2e) for r in fast.records] == [(r.ttft, r.itl, r.e2e) for r in step.records]
    assert fast.fast_forward["queued"] >= 2
    assert fast.fast_forward["steps"] > 100


def test_an_arrival_cuts_a_flight_where_the_step_by_step_run_would_schedule_it(tiny: Path) -> None:
    # Two long generations, one per replica, both fast-forwarding; a third request arrives in
    # the middle of a step and must start right after that step, not after the flight.
    hw = SimHardware(LinearCost(), lambda n: 0.0, lambda n: 0.0, 1e12, parse_size("8MiB"))
    opts = EngineOptions(model=str(tiny), devices=2, dtype="float32", page_size=4, max_model_len=256,
                         max_num_batched_tokens=64, enable_prefix_caching=False)
    reqs = [TraceRequest(0.0, 10, 200), TraceRequest(0.0, 10, 200), TraceRequest(0.5003, 8, 5)]
    step = simulate(opts, hw, reqs, fast_forward=False)
    fast = simulate(opts, hw, reqs, fast_forward=True)
    assert fast.fast_forward["cuts"] >= 1
    assert [(r.ttft, r.itl, r.e2e) for r in fast.records] == [(r.ttft, r.itl, r.e2e) for r in step.records]


@pytest.mark.parametrize("which", ["analytic", "fitted"])
def test_decode_steps_cost_the_same_floats_as_their_batches(which: str) -> None:
    from kunlite.engine.step_cost import FittedStepCost, StepCostWeights
    from kunlite.sim.hardware import AnalyticStepCost, get_device
    from kunlite.sim.model_configs import builtin_config_dict
    from kunlite.config import ModelConfig

    if which == "analytic":
        model = ModelConfig.from_dict(builtin_config_dict("qwen2.5-14b"))
        cost = AnalyticStepCost(model, get_device("a800"))
        ranges = [(0, 48), (0, 24), (24, 48), (10, 11)]
    else:
        cost = FittedStepCost(StepCostWeights(2.5e-3, 2.4e-6, 1.5e-3, 1.1e-2), 30)
        ranges = [(0, 30), (0, 15), (15, 30)]
    rng = np.random.default_rng(0)
    for layers in ranges:
        for n in (1, 7, 256):
            ctx = rng.integers(0, 4000, n)  # (n,) contexts of the first step
            k = 33
            want = [cost.step_seconds([(1, int(c) + j) for c in ctx], layers) for j in range(k)]
            got = cost.decode_steps_seconds(n, int(ctx.sum()), k, layers).tolist()
            assert got == want  # bit for bit: the fast-forward's clock must be the step-by-step one
            one = [cost.decode_step_seconds(n, int(ctx.sum()) + n * j, layers) for j in range(k)]
            assert one == want  # (a pipeline's window costs its steps one at a time)
            at = cost.decode_seconds_at(n, layers)  # (a stream's steps, its batch size fixed)
            assert [at(int(ctx.sum()) + n * j) for j in range(k)] == want
