"""`sim/traces.py`: BurstGPT CSV in and out, time scaling, upscaling, arrival processes and
the synthetic generator (statistical checks with fixed seeds)."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kunlite.bench import datasets
from kunlite.sim import traces
from kunlite.sim.traces import SyntheticTrace, TraceRequest


def gap_cv(at: np.ndarray) -> float:
    gaps = np.diff(at)
    return float(gaps.std() / gaps.mean())


def write_rows(path: Path, rows: list[tuple]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(traces.CSV_COLUMNS)
        w.writerows(rows)


def test_csv_round_trip_and_bench_serve_reads_the_same_file(tmp_path: Path) -> None:
    trace = traces.generate(SyntheticTrace(num_requests=300, rate=2.0, seed=7))
    path = tmp_path / "trace.csv"
    traces.write_burstgpt(str(path), trace)
    assert traces.read_burstgpt(str(path)) == trace
    samples = datasets.load_burstgpt(str(path), 300, datasets.TextTokens(), np.random.default_rng(0))
    assert [(s.timestamp, s.prompt_len, s.output_len) for s in samples] == [tuple(r) for r in trace]


def test_filters_window_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    write_rows(path, [
        (10, "ChatGPT", 100, 20, 120, "Conversation log"),
        (12, "GPT-4", 200, 30, 230, "Conversation log"),
        (13, "ChatGPT", 300, 0, 300, "Conversation log"),  # failed: no response
        (15, "ChatGPT", 400, 40, 440, "API log"),
        (11, "ChatGPT", 500, 50, 550, "Conversation log"),  # out of order in the file
        (30, "ChatGPT", 600, 60, 660, "Conversation log"),
    ])
    p = str(path)
    assert traces.read_burstgpt(p) == [TraceRequest(0.0, 100, 20), TraceRequest(1.0, 500, 50),
                                      TraceRequest(2.0, 200, 30), TraceRequest(5.0, 400, 40),
                                      TraceRequest(20.0, 600, 60)]
    chat = traces.read_burstgpt(p, models={"ChatGPT"}, log_types={"Conversation log"})
    assert [r.prompt_tokens for r in chat] == [100, 500, 600]
    assert [r.prompt_tokens for r in traces.read_burstgpt(p, start=11, duration=4.5)] == [500, 200, 400]
    assert [r.prompt_tokens for r in traces.read_burstgpt(p, limit=2)] == [100, 500]


def test_time_scaling_divides_the_arrivals(tmp_path: Path) -> None:
    trace = traces.generate(SyntheticTrace(num_requests=100, seed=1))
    fast = traces.scale_time(trace, 4.0)
    assert [r.arrival for r in fast] == pytest.approx([r.arrival / 4.0 for r in trace])
    assert [r[1:] for r in fast] == [r[1:] for r in trace]
    path = tmp_path / "t.csv"
    traces.write_burstgpt(str(path), trace)
    replayed = traces.read_burstgpt(str(path), time_scale=4.0)
    assert [r.arrival for r in replayed] == pytest.approx([r.arrival for r in fast])
    with pytest.raises(ValueError):
        traces.scale_time(trace, 0.0)


def test_upscaling_multiplies_the_rate_and_keeps_the_bursts() -> None:
    trace = traces.generate(SyntheticTrace(num_requests=4000, rate=5.0, seed=2))
    up = traces.upscale(trace, 3.0, window=1.0, seed=0)
    assert len(up) == 3 * len(trace)  # exact for an integer factor
    assert Counter(r[1:] for r in up) == Counter({k: 3 * v for k, v in Counter(r[1:] for r in trace).items()})
    arr = [r.arrival for r in up]
    assert arr == sorted(arr) and arr[0] == 0.0
    assert arr[-1] == pytest.approx(trace[-1].arrival, abs=1.0)  # same length: not compressed
    # Every copy arrives within a window after its original, so by any time t there are
    # between 3 x the requests by t - window and 3 x the requests by t.
    orig = np.array([r.arrival for r in trace])
    for t in np.linspace(0.0, orig[-1] + 2.0, 500):
        n_up = np.searchsorted(arr, t, side="right")
        assert 3 * np.searchsorted(orig, t - 1.0, side="right") <= n_up <= 3 * np.searchsorted(orig, t, side="right")
    frac = traces.upscale(trace, 2.5, seed=0)
    assert len(frac) == pytest.approx(2.5 * len(trace), rel=0.03)
    assert traces.upscale(trace, 1.0) == trace
    with pytest.raises(ValueError):
        traces.upscale(trace, 0.5)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_gaps_have_the_target_cv(cv: float) -> None:
    at = traces.gamma_arrivals(200_000, rate=10.0, cv=cv, rng=np.random.default_rng(0))
    assert gap_cv(at) == pytest.approx(cv, rel=0.05)
    assert np.diff(at).mean() == pytest.approx(0.1, rel=0.03)


def test_mmpp_has_the_mean_rate_and_is_bursty() -> None:
    spec = SyntheticTrace(num_requests=100_000, rate=5.0, arrival="mmpp", seed=3)
    at = np.array([r.arrival for r in traces.generate(spec)])
    assert (len(at) - 1) / at[-1] == pytest.approx(5.0, rel=0.1)
    assert gap_cv(at) > 1.5
    # Seconds in a burst carry about burst_factor times the requests of calm seconds.
    per_second = np.bincount(at.astype(np.int64))
    assert np.percentile(per_second, 99) > 4 * np.median(per_second)


def test_lengths_are_long_tailed_with_the_target_median() -> None:
    trace = traces.generate(SyntheticTrace(num_requests=50_000, seed=4))
    prompts = np.array([r.prompt_tokens for r in trace])
    outputs = np.array([r.output_tokens for r in trace])
    assert np.median(prompts) == pytest.approx(400, rel=0.03)
    assert np.median(outputs) == pytest.approx(250, rel=0.03)
    assert prompts.min() >= 1 and prompts.max() == 4096 and outputs.max() <= 2048
    assert np.percentile(prompts, 99) > 2500  # a tail into the thousands


def test_generation_is_reproducible_by_seed() -> None:
    a = traces.generate(SyntheticTrace(num_requests=500, seed=5))
    assert a == traces.generate(SyntheticTrace(num_requests=500, seed=5))
    assert a != traces.generate(SyntheticTrace(num_requests=500, seed=6))
    g = traces.generate(SyntheticTrace(num_requests=500, arrival="gamma", seed=5))
    assert g[0].arrival == 0.0 and len(g) == 500
    with pytest.raises(ValueError):
        traces.generate(SyntheticTrace(arrival="poisson"))


def test_cli_writes_a_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.csv"
    assert traces.main(["--out", str(out), "--num-requests", "50", "--rate", "2.5", "--arrival", "gamma"]) == 0
    assert "50 requests" in capsys.readouterr().out
    assert traces.read_burstgpt(str(out)) == traces.generate(SyntheticTrace(num_requests=50, rate=2.5, arrival="gamma"))
