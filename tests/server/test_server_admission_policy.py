"""The admission policy and the step cost model on plain numbers: no model, no server."""

from __future__ import annotations

import random

import pytest

from kunlite.engine.messages import StepTiming
from kunlite.server.admission import AdmissionConfig, AdmissionPolicy, InFlight, Ledger, TtftCalibration
from kunlite.server.cost_model import StepCostModel


class FixedCost(StepCostModel):
    """step = 1 ms per prefill token + 10 ms per decode token + 20 ms per step."""

    def step_seconds(self, prefill: float = 0, decode: float = 0, context: float = 0) -> float:
        return 0.001 * prefill + 0.010 * decode + 0.020


def policy(**kw: object) -> AdmissionPolicy:
    cfg = AdmissionConfig(**{"policy": "reject", "max_num_seqs": 4, "max_num_batched_tokens": 100, **kw})
    return AdmissionPolicy(cfg, FixedCost())


def running(remaining: int, n: int = 1, prompt: int = 10) -> InFlight:
    r = InFlight(prompt_tokens=prompt, n=n, max_tokens=remaining, started=True, live_seqs=n)
    r.choice_tokens = [0] * n
    return r


# ---------------------------------------------------------------------------- cost model


def test_cost_model_starts_from_its_prior() -> None:
    m = StepCostModel(prior=(0.5, 0.05, 0.005, 0.05))
    assert m.step_seconds(100, 0, 0) == pytest.approx(0.5 + 0.05)
    assert m.step_seconds(0, 10, 1000) == pytest.approx(0.05 + 0.005 + 0.05)


def test_cost_model_recovers_the_coefficients_of_noisy_steps() -> None:
    rng = random.Random(0)
    true = lambda p, d, c: 2e-4 * p + 3e-3 * d + 1e-6 * c + 0.004  # noqa: E731
    m = StepCostModel()
    steps = []
    for _ in range(400):
        p, d = rng.choice([0, 0, 0, rng.randrange(1, 512)]), rng.randrange(0, 64)
        if p + d == 0:
            d = 1
        c = rng.randrange(d * 10 + p, d * 2000 + p + 1)
        steps.append(StepTiming(p, d, c, true(p, d, c) * rng.uniform(0.95, 1.05)))
    m.observe(steps)
    for p, d, c in [(512, 0, 512), (0, 32, 20_000), (128, 8, 4000), (0, 1, 100)]:
        assert m.step_seconds(p, d, c) == pytest.approx(true(p, d, c), rel=0.1)
    assert (m.theta >= 0).all()


def test_cost_model_slowdown_scales_up_quickly_and_never_down() -> None:
    m = StepCostModel()
    steps = [StepTiming(0, 8, 800, 0.05)] * 200 + [StepTiming(64, 8, 900, 0.20)] * 200
    m.observe(steps)
    base = m.step_seconds(0, 8, 800)
    m.observe([StepTiming(0, 8, 800, 3 * base)] * 10)  # the machine got busy
    assert m.slowdown > 1.5
    assert m.step_seconds(0, 8, 800) > 1.5 * base
    m.observe([StepTiming(0, 8, 800, 0.2 * base)] * 50)  # faster than the fit: no scaling down
    assert m.step_seconds(0, 8, 800) >= 0.9 * float(m.theta @ [0, 0.8, 0.8, 1.0])


def test_cost_model_ignores_empty_and_bad_timings() -> None:
    m = StepCostModel()
    before = m.step_seconds(10, 1, 10)
    m.observe([StepTiming(0, 0, 0, 1.0), StepTiming(5, 0, 5, float("nan")), StepTiming(5, 0, 5, -1.0)])
    assert m.num_observed == 0 and m.step_seconds(10, 1, 10) == before


# ---------------------------------------------------------------------------- TTFT prediction


def test_idle_engine_ttft_is_one_prefill_step() -> None:
    p = policy()
    assert p.predict_ttft(InFlight(50, 1, 8), [], []) == pytest.approx(0.050 + 0.020)


def test_long_prompt_is_chunked_by_the_token_budget() -> None:
    p = policy()
    # 250 tokens at 100 per step: three steps of 100, 100 and 50 prompt tokens
    assert p.predict_ttft(InFlight(250, 1, 8), [], []) == pytest.approx(0.250 + 3 * 0.020)


def test_running_decodes_share_the_budget_and_slow_each_step() -> None:
    p = policy()
    two = [running(100), running(100)]
    # 98 prompt tokens per step next to 2 decodes: 196 tokens take 2 steps
    assert p.predict_ttft(InFlight(196, 1, 8), two, []) == pytest.approx(0.196 + 2 * (0.020 + 0.020))


def test_queued_prompts_ahead_add_up_and_share_steps() -> None:
    p = policy()
    alone = p.predict_ttft(InFlight(30, 1, 8), [], [])
    behind = p.predict_ttft(InFlight(30, 1, 8), [], [InFlight(30, 1, 8, arrival=0.0)])
    # both prompts fit one step: the second pays only for its tokens, not another step
    assert behind == pytest.approx(alone + 0.030)
    far_behind = p.predict_ttft(InFlight(30, 1, 8), [], [InFlight(90, 1, 8), InFlight(90, 1, 8)])
    assert far_behind > behind


def test_full_slots_wait_for_the_first_sequence_to_finish() -> None:
    p = policy()
    full = [running(5), running(50), running(50), running(50)]
    ttft = p.predict_ttft(InFlight(10, 1, 8), full, [])
    # 5 decode steps of 4 sequences, then the prompt next to 3 decodes
    assert ttft == pytest.approx(5 * (0.040 + 0.020) + (0.010 + 0.030 + 0.020))


def test_step_in_flight_is_counted_and_a_new_prompt_cannot_join_it() -> None:
    p = policy()
    pending = [InFlight(50, 1, 8, arrival=1.0)]
    # The engine began a step with the pending prompt at t=1.0; it is now t=1.01.
    ttft = p.predict_ttft(InFlight(20, 1, 8, arrival=1.01), [], pending, now=1.01, step_start=1.0)
    in_flight = 0.050 + 0.020 - 0.010
    next_step = 0.020 + 0.010 + 0.020  # the new prompt, next to the first decode of the other
    assert ttft == pytest.approx(in_flight + next_step)
    # A prompt that came after the step began is prefilled after it, with the new one.
    late = [InFlight(50, 1, 8, arrival=1.005)]
    assert p.predict_ttft(InFlight(20, 1, 8), [], late, now=1.01, step_start=1.0) == pytest.approx(
        (0.020 - 0.010) + (0.050 + 0.020 + 0.020))
    # An overdue step is taken to end now.
    assert p.predict_ttft(InFlight(20, 1, 8), [], pending, now=2.0, step_start=1.0) == pytest.approx(next_step)


def test_n_choices_take_n_slots() -> None:
    p = policy()
    one = p.predict_ttft(InFlight(10, 1, 8), [running(20, n=1)], [InFlight(10, 1, 8)])
    four = p.predict_ttft(InFlight(10, 1, 8), [running(20, n=3)], [InFlight(10, 1, 8)])
    assert four > one + 10 * 0.020  # the last prompt waits for a slot


# ---------------------------------------------------------------------------- decisions


def ledger_with(*reqs: InFlight) -> Ledger:
    ledger = Ledger()
    for i, r in enumerate(reqs):
        ledger.add(f"r{i}", r)
    return ledger


def test_reject_when_the_prediction_misses_the_slo_with_retry_after() -> None:
    p = policy(slo_ttft_s=0.5)
    assert p.decide(InFlight(50, 1, 8), Ledger()).admit
    busy = ledger_with(*[InFlight(100, 1, 8, arrival=i) for i in range(8)])
    d = p.decide(InFlight(50, 1, 8, arrival=9), busy)
    assert not d.admit and d.reason == "slo_ttft"
    assert d.predicted_ttft > 0.5
    assert d.retry_after == pytest.approx(d.predicted_ttft - 0.5)
    assert "predicted time to first token" in d.message


def test_fcfs_admits_everything_but_the_queue_caps() -> None:
    p = policy(policy="fcfs", slo_ttft_s=0.001)
    busy = ledger_with(*[InFlight(100, 1, 8) for _ in range(8)])
    assert p.decide(InFlight(50, 1, 8), busy).admit
    assert p.deadline(0.0) is None
    capped = policy(policy="fcfs", max_queued_requests=8)
    d = capped.decide(InFlight(50, 1, 8), busy)
    assert not d.admit and d.reason == "queue_requests" and d.retry_after and d.retry_after > 0
    tokens = policy(policy="fcfs", max_queued_tokens=850)
    assert not tokens.decide(InFlight(51, 1, 8), busy).admit
    assert tokens.decide(InFlight(50, 1, 8), busy).admit


def test_queue_caps_count_only_requests_without_a_first_token() -> None:
    p = policy(policy="fcfs", max_queued_requests=1)
    assert p.decide(InFlight(10, 1, 8), ledger_with(running(10), running(10))).admit
    assert not p.decide(InFlight(10, 1, 8), ledger_with(InFlight(10, 1, 8))).admit


def test_priority_only_counts_work_of_equal_or_higher_priority() -> None:
    p = policy(policy="priority", slo_ttft_s=0.3)
    low = [InFlight(100, 1, 8, priority=5, arrival=i) for i in range(6)]
    busy = ledger_with(*low)
    urgent = p.decide(InFlight(50, 1, 8, priority=0, arrival=10), busy)
    normal = p.decide(InFlight(50, 1, 8, priority=5, arrival=10), busy)
    assert urgent.admit and not normal.admit
    assert urgent.predicted_ttft < normal.predicted_ttft
    # under "reject" the queue is FCFS: priority does not help
    assert not policy(slo_ttft_s=0.3).decide(InFlight(50, 1, 8, priority=0, arrival=10), busy).admit


def test_tpot_slo_rejects_a_request_that_would_slow_the_batch() -> None:
    p = policy(slo_tpot_s=0.055)  # 3 decodes: 50 ms; 4: 60 ms
    three = ledger_with(running(30), running(10), running(40))
    d = p.decide(InFlight(10, 1, 8), three)
    assert not d.admit and d.reason == "slo_tpot"
    assert d.retry_after == pytest.approx(10 * 0.050)  # until the shortest one is done
    assert p.decide(InFlight(10, 1, 8), ledger_with(running(30), running(10))).admit


def test_calibration_is_an_upper_quantile_of_recent_misses_and_never_below_one() -> None:
    cal = TtftCalibration(min_predicted_s=0.5, window=10, quantile=0.9)
    assert cal.factor == 1.0
    for _ in range(10):
        cal.observe(1.0, 0.8)  # predictions that were pessimistic do not scale anything down
    assert cal.factor == 1.0
    cal.observe(0.1, 5.0)  # too short a prediction to say anything about the SLO
    assert cal.factor == 1.0
    for measured in (1.2, 1.5, 1.3):
        cal.observe(1.0, measured)
    assert cal.factor == pytest.approx(1.3)  # 10 latest: seven 0.8, then 1.2, 1.5, 1.3 -> 90% quantile
    for _ in range(10):
        cal.observe(1.0, 1.0)
    assert cal.factor == 1.0  # the window forgets
    cal.observe(1.0, 100.0)
    assert cal.ratios[-1] == cal.max_factor


def test_a_request_the_replay_puts_just_under_the_slo_is_rejected_once_predictions_ran_short() -> None:
    p = policy(slo_ttft_s=0.5)
    busy = ledger_with(*[InFlight(100, 1, 8, arrival=i) for i in range(3)])
    new = InFlight(50, 1, 8, arrival=9)
    d = p.decide(new, busy, now=9.0)
    assert d.admit and 0.25 < d.raw_ttft < 0.5 and d.predicted_ttft == pytest.approx(d.raw_ttft)
    for _ in range(5):
        p.calibration.observe(0.4, 0.6)  # recent requests took 1.5x their prediction (or were shed)
    d2 = p.decide(new, busy, now=9.0)
    assert not d2.admit and d2.reason == "slo_ttft"
    assert d2.raw_ttft == pytest.approx(d.raw_ttft) and d2.predicted_ttft == pytest.approx(1.5 * d.raw_ttft)
    # time already spent since arrival (tokenizing) counts against the SLO too
    assert p.decide(new, busy, now=9.1).raw_ttft == pytest.approx(d.raw_ttft + 0.1)


def test_deadlines_under_slo_policies() -> None:
    assert policy(slo_ttft_s=0.5).deadline(10.0) == pytest.approx(10.5)
    assert policy(policy="priority", slo_ttft_s=0.5).deadline(10.0) == pytest.approx(10.5)
    assert policy().deadline(10.0) is None  # no SLO, no deadline


def test_ledger_tracks_first_tokens_and_finished_choices() -> None:
    ledger = Ledger()
    ledger.add("a", InFlight(10, 2, 5))
    assert len(ledger.pending()) == 1 and not ledger.running()
    assert ledger.on_tokens("a", 0, 1, False) is True
    assert ledger.on_tokens("a", 1, 1, False) is False
    assert ledger.pending() == [] and ledger.running()[0].live_seqs == 2
    ledger.on_tokens("a", 0, 3, True)
    assert ledger.running()[0].live_seqs == 1 and ledger.running()[0].remaining == 1
    ledger.on_tokens("a", 1, 3, True)
    assert ledger.running() == []
    assert ledger.on_tokens("unknown", 0, 1, False) is False
    assert ledger.remove("a") is not None and ledger.remove("a") is None


def test_config_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError):
        AdmissionConfig(policy="lottery")


def test_a_decision_is_cheap_with_a_long_queue() -> None:
    import time

    p = policy(max_num_seqs=64, max_num_batched_tokens=512, slo_ttft_s=1e9)
    ledger = ledger_with(*[running(200) for _ in range(64)], *[InFlight(300, 2, 100) for _ in range(500)])
    start = time.perf_counter()
    d = p.decide(InFlight(100, 1, 10), ledger)
    assert d.admit and time.perf_counter() - start < 0.5
