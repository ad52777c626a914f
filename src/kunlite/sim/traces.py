"""Request traces for the simulator: BurstGPT CSVs in and out, replay speed, rate upscaling,
gamma arrivals, and BurstGPT-like synthetic traces.

A trace is a list of `TraceRequest(arrival, prompt_tokens, output_tokens)`. Invariant of
every trace these functions return: arrivals non-decreasing, the first at 0.0 (seconds since
the trace starts, as `bench/arrivals.py` has it), token counts >= 1.

The CSV is BurstGPT's (https://github.com/HPMLL/BurstGPT): Timestamp, Model, Request tokens,
Response tokens, Total tokens, Log Type. `kunlite bench serve --dataset-name burstgpt` reads
the same files, so a real server and the simulator can replay one file. Generate a synthetic
one with `python -m kunlite.sim.traces --out trace.csv` (see `--help`).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from kunlite.bench import arrivals
from kunlite.bench.datasets import read_burstgpt_rows

CSV_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")


class TraceRequest(NamedTuple):
    arrival: float  # seconds since the first request of the trace
    prompt_tokens: int
    output_tokens: int


def _with_arrivals(requests: Sequence[TraceRequest], at: np.ndarray) -> list[TraceRequest]:
    return [TraceRequest(float(t), r.prompt_tokens, r.output_tokens) for t, r in zip(at, requests)]


def read_burstgpt(
    path: str,
    *,
    models: Collection[str] | None = None,
    log_types: Collection[str] | None = None,
    start: float | None = None,
    duration: float | None = None,
    limit: int | None = None,
    time_scale: float = 1.0,
) -> list[TraceRequest]:
    """A BurstGPT CSV as a trace. Failed requests (0 tokens) are skipped; `models` (e.g.
    {"ChatGPT"}) and `log_types` (e.g. {"Conversation log"}) filter rows; `start` and
    `duration` (seconds of trace time, Timestamp's clock) cut a window; `limit` keeps the
    first requests; time_scale > 1 replays faster (as `bench serve --trace-time-scale`)."""
    rows = read_burstgpt_rows(path, models=models, log_types=log_types)
    if start is not None:
        rows = [r for r in rows if r[0] >= start]
    if duration is not None and rows:
        end = (rows[0][0] if start is None else start) + duration
        rows = [r for r in rows if r[0] < end]
    rows = rows[:limit]
    at = arrivals.trace_arrivals([r[0] for r in rows], time_scale)
    return [TraceRequest(float(t), n_in, n_out) for t, (_, n_in, n_out) in zip(at, rows)]


def write_burstgpt(path: str, requests: Sequence[TraceRequest], *, model: str = "ChatGPT",
                   log_type: str = "Conversation log") -> None:
    """Write a trace as a BurstGPT CSV (Timestamp = arrival, with full float precision, so
    that reading it back gives the same trace)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in requests:
            w.writerow([repr(float(r.arrival)), model, r.prompt_tokens, r.output_tokens,
                        r.prompt_tokens + r.output_tokens, log_type])


def scale_time(requests: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """Replay factor times faster: arrivals divided by factor (the rate times factor, and the
    bursts factor times shorter)."""
    return _with_arrivals(requests, arrivals.trace_arrivals([r.arrival for r in requests], factor))


def upscale(requests: Sequence[TraceRequest], factor: float, *, window: float = 1.0,
            seed: int = 0) -> list[TraceRequest]:
    """Multiply the request rate by factor while keeping the trace's length and the shape of
    its bursts (KunServe-style upscaling, unlike `scale_time`, which also shortens them).

    Each request is kept, and factor - 1 extra copies of it are overlaid, each arriving a
    uniform random delay in [0, window) after it: floor(factor) - 1 copies always, and one
    more with probability frac(factor). So the requests in any stretch longer than the
    window are multiplied by factor (exactly for an integer factor; in expectation
    otherwise), with the lengths of that stretch. Copies land within the window, so bursts
    shorter than it are smeared over it.
    """
    if not factor >= 1.0:
        raise ValueError(f"upscale factor must be >= 1, got {factor}")
    if not window > 0:
        raise ValueError(f"upscale window must be > 0, got {window}")
    rng = np.random.default_rng(seed)
    whole, frac = int(math.floor(factor)), factor - math.floor(factor)
    copies = np.full(len(requests), whole - 1) + (rng.random(len(requests)) < frac)
    src = np.repeat(np.arange(len(requests)), copies)  # one index per extra copy
    base = np.array([r.arrival for r in requests], dtype=np.float64)
    at = np.concatenate([base, base[src] + rng.uniform(0.0, window, size=len(src))])
    which = np.concatenate([np.arange(len(requests)), src])
    order = np.argsort(at, kind="stable")  # originals first among equal times
    out = [requests[i] for i in which[order]]
    return _with_arrivals(out, at[order] - (at[order][0] if len(at) else 0.0))


def gamma_arrivals(n: int, rate: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """n arrival times of a gamma renewal process with mean gap 1/rate and coefficient of
    variation cv of the gaps (cv = 1/sqrt(shape): 1 is Poisson, above 1 bursty)."""
    if not cv > 0:
        raise ValueError(f"cv must be > 0, got {cv}")
    return arrivals.gamma_arrivals(n, rate, 1.0 / cv**2, rng)


def mmpp_arrivals(n: int, rate: float, burst_factor: float, burst_seconds: float,
                  calm_seconds: float, rng: np.random.Generator) -> np.ndarray:
    """n arrival times of a two-state Markov-modulated Poisson process.

    Calm periods (mean calm_seconds) at a base rate alternate with bursts (mean
    burst_seconds) at burst_factor times it; both lengths exponential, and the process starts
    in its stationary state. The base rate is set so that the long-run mean rate is `rate`:
    base = rate / (1 + p (burst_factor - 1)), p = burst_seconds / (burst_seconds + calm_seconds).
    """
    if not (rate > 0 and burst_factor >= 1 and burst_seconds > 0 and calm_seconds > 0):
        raise ValueError("mmpp needs rate > 0, burst_factor >= 1 and period lengths > 0")
    p = burst_seconds / (burst_seconds + calm_seconds)
    base = rate / (1.0 + p * (burst_factor - 1.0))
    bursting = bool(rng.random() < p)
    t, chunks, count = 0.0, [], 0
    while count < n:
        length = rng.exponential(burst_seconds if bursting else calm_seconds)
        k = rng.poisson(base * (burst_factor if bursting else 1.0) * length)
        chunks.append(np.sort(t + rng.uniform(0.0, length, size=k)))  # Poisson given the count
        count += k
        t += length
        bursting = not bursting
    at = np.concatenate(chunks)[:n] if n > 0 else np.zeros(0)
    return at - at[0] if n > 0 else at


def lognormal_lengths(n: int, median: float, sigma: float, max_len: int,
                      rng: np.random.Generator) -> np.ndarray:
    """n token counts median * exp(sigma * N(0, 1)), rounded, clipped to [1, max_len]."""
    return np.clip(np.rint(median * np.exp(sigma * rng.standard_normal(n))), 1, max_len).astype(np.int64)


@dataclass(frozen=True)
class SyntheticTrace:
    """A BurstGPT-like trace: bursty arrivals and long-tailed lengths, reproducible by seed.

    Lengths are lognormal. The defaults follow the shape of BurstGPT's ChatGPT conversation
    rows (request tokens: median a few hundred, a tail into the thousands; responses: median
    around 250): prompts median 400 with sigma 1.0 (P90 ~1.4k, P99 ~4k, capped at 4096),
    outputs median 250 with sigma 0.8 (P90 ~700, capped at 2048).

    `long_fraction` of the requests (0 by default) are long-lived instead: chain-of-thought-like
    outputs, lognormal with `long_output_median` / `long_output_sigma`, capped at
    `long_output_max` (reasoning traces such as the codeforces-cots data KunServe also
    replays run to thousands of tokens). Which requests are long is drawn independently of
    their arrival; with long_fraction 0 nothing more is drawn, so the trace of a seed is
    the same as before the knob existed.
    """

    num_requests: int = 1000
    rate: float = 1.0  # long-run mean requests/s
    arrival: str = "mmpp"  # mmpp (bursts of burst_factor x the base rate) or gamma
    cv: float = 3.0  # gamma: coefficient of variation of the gaps
    burst_factor: float = 8.0  # mmpp: burst rate / base rate
    burst_seconds: float = 20.0  # mmpp: mean length of a burst
    calm_seconds: float = 120.0  # mmpp: mean time between bursts
    prompt_median: float = 400.0
    prompt_sigma: float = 1.0
    prompt_max: int = 4096
    output_median: float = 250.0
    output_sigma: float = 0.8
    output_max: int = 2048
    long_fraction: float = 0.0  # share of requests with chain-of-thought-like long outputs
    long_output_median: float = 3000.0
    long_output_sigma: float = 0.5
    long_output_max: int = 8192
    seed: int = 0


def generate(spec: SyntheticTrace) -> list[TraceRequest]:
    """The trace of a spec; the same spec gives the same trace."""
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    if spec.arrival == "gamma":
        at = gamma_arrivals(n, spec.rate, spec.cv, rng)
    elif spec.arrival == "mmpp":
        at = mmpp_arrivals(n, spec.rate, spec.burst_factor, spec.burst_seconds, spec.calm_seconds, rng)
    else:
        raise ValueError(f"unknown arrival process {spec.arrival!r} (mmpp, gamma)")
    ins = lognormal_lengths(n, spec.prompt_median, spec.prompt_sigma, spec.prompt_max, rng)
    outs = lognormal_lengths(n, spec.output_median, spec.output_sigma, spec.output_max, rng)
    if not 0.0 <= spec.long_fraction <= 1.0:
        raise ValueError(f"long_fraction must be in [0, 1], got {spec.long_fraction}")
    if spec.long_fraction > 0:  # drawn after everything else: the rest of the trace is unchanged
        long = rng.random(n) < spec.long_fraction
        outs = np.where(long, lognormal_lengths(n, spec.long_output_median, spec.long_output_sigma,
                                                spec.long_output_max, rng), outs)
    return [TraceRequest(float(t), int(i), int(o)) for t, i, o in zip(at, ins, outs)]


def describe(requests: Sequence[TraceRequest]) -> str:
    """One line: requests, duration, mean rate, gap CV and length percentiles."""
    if not requests:
        return "empty trace"
    at = np.array([r.arrival for r in requests])
    gaps = np.diff(at)
    cv = float(gaps.std() / gaps.mean()) if len(gaps) and gaps.mean() > 0 else math.nan
    duration = float(at[-1] - at[0])
    rate = (len(at) - 1) / duration if duration > 0 else math.inf

    def pct(xs: list[int]) -> str:
        return "/".join(f"{v:.0f}" for v in np.percentile(xs, [50, 90, 99]))

    return (f"{len(requests)} requests over {duration:.1f} s ({rate:.3f} req/s), gap CV {cv:.2f}; "
            f"prompt tokens p50/p90/p99 {pct([r.prompt_tokens for r in requests])}, "
            f"output tokens {pct([r.output_tokens for r in requests])}")


def main(argv: list[str] | None = None) -> int:
    """python -m kunlite.sim.traces --out FILE [--num-requests N --rate R ...]"""
    parser = argparse.ArgumentParser(prog="python -m kunlite.sim.traces",
                                     description="Write a BurstGPT-like synthetic trace as a BurstGPT CSV.")
    parser.add_argument("--out", required=True, help="CSV file to write")
    for f in fields(SyntheticTrace):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help="default: %(default)s")
    args = parser.parse_args(argv)
    spec = SyntheticTrace(**{f.name: getattr(args, f.name) for f in fields(SyntheticTrace)})
    trace = generate(spec)
    write_burstgpt(args.out, trace)
    print(f"{args.out}: {describe(trace)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
