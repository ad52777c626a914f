"""Balanced microbatches: the online step-cost model, the scheduler's cost limit, and the
bubble meter, on plain numbers."""

from __future__ import annotations

import pytest

from kunlite.engine.microbatch import BubbleMeter, OnlineStepCost
from kunlite.engine.step_cost import StepCostWeights
from test_scheduler import make, run_step, seq


def test_the_online_model_fits_the_steps_it_sees() -> None:
    truth = StepCostWeights(per_token=2e-3, per_attention_pair=1e-6, per_sequence=5e-4, per_step=0.01)
    model = OnlineStepCost(min_samples=8, refit_every=4)
    assert model.predict([(10, 0)]) == 11.0  # before a fit: tokens (and one per sequence)
    shapes = [[(1, c)] * b for b in (1, 4, 16) for c in (10, 200, 800)] + [[(q, 0)] for q in (16, 128, 512)]
    for batch in shapes * 2:
        model.observe(batch, truth.predict(batch))
    for batch in ([(1, 300)] * 8, [(256, 0)], [(1, 50)] * 3 + [(64, 100)]):
        assert model.predict(batch) == pytest.approx(truth.predict(batch), rel=0.05)


def test_the_online_model_fits_its_latest_samples_oldest_first() -> None:
    # Its samples are a ring of `keep` rows: past the first lap, a refit sees the latest `keep`
    # steps in the order they came (the fit's floats depend on it), and a copy goes its own way.
    import numpy as np

    from kunlite.engine.step_cost import fit_feature_weights, step_features

    rng = np.random.default_rng(3)
    model = OnlineStepCost(keep=16, refit_every=5, min_samples=4)
    seen = []
    for i in range(44):  # refits at the 4th sample, then every 5th: the 44th is one
        batch = [(int(rng.integers(1, 64)), int(rng.integers(0, 900)))]
        secs = 0.01 + 1e-4 * batch[0][0] + 1e-6 * batch[0][1] * (1 + 0.1 * rng.random())
        model.observe(batch, secs)
        seen.append((step_features(batch), secs))
        if i == 30:
            twin, then = model.copy(), model.weights
    last = seen[-16:]
    want = fit_feature_weights(np.array([f for f, _ in last], dtype=np.float64), [s for _, s in last])
    assert model.weights == want
    assert twin.weights == then != model.weights  # the copy saw none of the later samples
    assert twin._count == 16 and twin._next == 31 % 16


def test_the_ring_holds_the_latest_samples_in_order_and_given_weights_are_taken() -> None:
    # The simulator replays steps with the weights a refit due then gives (`fitted=`): those
    # are taken as they are; without them a refit fits the latest `keep` samples; a sample of
    # 0 s is no sample; a copy holds the same rows.
    import numpy as np

    from kunlite.engine.step_cost import fit_feature_weights

    rng = np.random.default_rng(5)
    given = StepCostWeights(1e-3, 2e-6, 3e-4, 5e-3)
    model = OnlineStepCost(keep=16, refit_every=40, min_samples=4)
    seen, computed = [], 0
    for i in range(100):
        m = int(rng.integers(1, 20))
        features = (m, m * int(rng.integers(10, 900)) + m, m, 1)
        seconds = 0.0 if i % 17 == 5 else 0.004 + 1e-4 * m + 1e-7 * features[1] * (1 + 0.1 * rng.random())
        before = model.weights
        model.observe_features(features, seconds, fitted=given if i > 50 else None)  # (seconds 0: not a sample)
        if seconds > 0:
            seen.append((features, seconds))
        if model.weights is not before and i <= 50:  # the 4th and the 44th: computed from the latest 16
            computed += 1
            last = seen[-16:]
            assert model.weights == fit_feature_weights(np.array([f for f, _ in last], dtype=np.float64),
                                                        [s for _, s in last])
    assert computed == 2
    twin = model.copy()
    rows = [(twin._next + i) % 16 for i in range(16)]  # oldest first
    assert twin._x[rows].tolist() == [list(f) for f, _ in seen[-16:]]
    assert twin._y[rows].tolist() == [s for _, s in seen[-16:]]
    assert twin._count == 16 and twin.weights == model.weights == given  # the 84th-sample refit came given


def test_a_cost_limit_cuts_a_prompt_to_what_fits_but_always_takes_one() -> None:
    s = make(blocks=64, budget=64)
    for name in "abcd":
        s.add(seq(name, 10))
    cost = lambda batch: float(sum(q for q, _ in batch))  # noqa: E731 - one unit per token
    out = s.schedule(cost=cost, cost_limit=25)
    # a and b whole, then a chunk of c: the 5 tokens still under the limit (the whole prompt used
    # to be refused, which starved the queue behind a microbatch of decodes)
    assert [(q.seq_id, n) for q, n in out.scheduled] == [("a", 10), ("b", 10), ("c", 5)]
    for q, _ in out.scheduled:
        q.in_flight = True  # the first microbatch is in flight
    out = s.schedule(cost=cost, cost_limit=1)  # too small for anything: still one, whole
    assert [(q.seq_id, n) for q, n in out.scheduled] == [("d", 10)]
    s.kv.check()


def test_a_prompt_in_progress_is_not_cut_below_its_min_chunk() -> None:
    s = make(blocks=64, budget=64)
    s.add(seq("b", 3))
    s.add(seq("a", 40))
    out = run_step_with(s, cost_limit=13, min_chunk=16)  # admitting a: cut to what fits (the floor is for
    assert out == [("b", 3), ("a", 10)]                  # prompts in progress)
    assert run_step_with(s, cost_limit=6) == [("b", 1), ("a", 5)]  # in progress, no floor: cut to what fits
    assert run_step_with(s, cost_limit=6, min_chunk=16) == [("b", 1), ("a", 16)]  # not below the floor
    assert run_step_with(s, cost_limit=2, min_chunk=16) == [("b", 1), ("a", 9)]  # or its remainder
    s.kv.check()


def run_step_with(s, **kw) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    out = s.schedule(cost=lambda batch: float(sum(q for q, _ in batch)), **kw)
    for q, n in out.scheduled:
        q.num_computed_tokens += n
        if q.num_computed_tokens == q.num_tokens:
            q.append_token(7)
    return [(q.seq_id, n) for q, n in out.scheduled]


def test_a_balanced_pipeline_runs_a_prompt_in_few_chunks() -> None:
    # Two stages, a few decodes running and one prompt of 539 tokens: each microbatch carries
    # half the round's predicted cost, but the prompt (in one microbatch at a time) gets at
    # least half the budget a step. Cut to half the work left, it ran 11 chunks: 269, 134, ...
    from kunlite.config import SchedulerConfig
    from kunlite.engine.block_manager import BlockManager
    from kunlite.engine.instance import Instance, Member
    from kunlite.engine.messages import EngineRequest
    from kunlite.engine.preemption import RecomputePolicy
    from kunlite.engine.work import StageDone
    from kunlite.sampling_params import SamplingParams

    members = [Member(r, (r, r + 1), BlockManager(page_size=16, pages=range(256), layers=(r, r + 1), num_layers=2))
               for r in (0, 1)]
    cfg = SchedulerConfig(max_num_batched_tokens=1024, max_num_seqs=64, max_model_len=2048)
    inst = Instance(0, members, cfg, RecomputePolicy(), frozenset(), 2048)
    inst.payload = False
    truth = StepCostWeights(per_token=1e-4, per_attention_pair=1e-8, per_sequence=1e-4, per_step=5e-3)
    inst.step_cost.weights = truth  # as fitted
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    for i in range(5):
        inst.add_request(EngineRequest(f"d{i}", [1] * 200, params, 0.0))
    chunks: list[int] = []
    in_flight: list[int] = []

    def step() -> None:  # plan into free slots, then commit the oldest microbatch
        while len(in_flight) < 2 and (works := inst.plan()) is not None:
            flight = inst.flights[works[0].step_id]
            chunks.extend(n for s, n in flight.sched.scheduled if s.seq_id == "p")
            in_flight.append(works[0].step_id)
        step_id = in_flight.pop(0)
        flight = inst.flights[step_id]
        inst.commit(StageDone(step_id, 0, 1, truth.predict(flight.shape), [5] * len(flight.sampled)))

    for _ in range(6):
        step()
    inst.add_request(EngineRequest("p", [2] * 539, params, 0.0))
    for _ in range(30):
        step()
    assert sum(chunks) == 539 and len(chunks) <= 2, chunks
    inst.kv.check()


def test_without_chunked_prefill_a_prompt_that_does_not_fit_waits() -> None:
    s = make(blocks=64, budget=64, chunked=False)
    for name in "abc":
        s.add(seq(name, 10))
    cost = lambda batch: float(sum(q for q, _ in batch))  # noqa: E731
    out = s.schedule(cost=cost, cost_limit=25)
    assert [(q.seq_id, n) for q, n in out.scheduled] == [("a", 10), ("b", 10)]
    s.kv.check()


def test_the_bubble_meter_counts_idle_stage_time_while_busy() -> None:
    meter = BubbleMeter(stages=2)
    meter.started(0.0)
    meter.stage_done(1.0)  # stage 0 busy 1 s, stage 1 busy 0.5 s, over 1 s of wall time
    meter.stage_done(0.5)
    meter.idle(1.0)
    meter.started(5.0)  # idle time between steps does not count
    meter.stage_done(1.0)
    meter.stage_done(1.0)
    meter.idle(6.0)
    assert meter.fraction(10.0) == pytest.approx(1 - 3.5 / (2 * 2.0))


def test_run_step_still_drives_the_scheduler() -> None:  # the helper these tests import
    s = make(blocks=16)
    s.add(seq("x", 5))
    assert [(q.seq_id, n) for q, n in run_step(s).scheduled] == [("x", 5)]
