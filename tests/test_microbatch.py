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
