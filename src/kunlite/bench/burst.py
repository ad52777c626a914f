"""The bursty workload of KunServe's setting, and running it against a live server.

Two scenarios, each a list of `BurstRequest`s (arrival time, prompt and output lengths, kind):
    long-then-burst  long generations (chain-of-thought-like, hundreds of tokens) start at once
                     and hold most of the KV; `burst_at` seconds later a burst of short requests
                     arrives, with gamma arrivals (or the rows of a BurstGPT-format CSV)
    dense            the same with the KV full from the start and the burst soon after
    at-once          every request at t = 0 with a short prompt: all are admitted, and the cost
                     shows in TPOT and preemptions instead of TTFT
The workload is written as a BurstGPT-format CSV as well, so that the simulator replays the
very same requests.

`run` drives a server with the streaming client of `kunlite bench serve` (same records, same
metrics), and reads the overload counters of `/v1/cluster` before and after.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from kunlite.bench.arrivals import gamma_arrivals
from kunlite.bench.client import Target, send_request
from kunlite.bench.datasets import Sample, TextTokens
from kunlite.bench.metrics import RequestRecord, compute_metrics


@dataclass(frozen=True)
class BurstRequest:
    arrival: float  # seconds after the start
    prompt_tokens: int
    output_tokens: int
    kind: str  # long | burst | short


def long_then_burst(*, n_long: int, long_prompt: int, long_tokens: int, n_burst: int, burst_prompt: int,
                    burst_tokens: int, burst_at: float, burst_rate: float, burstiness: float,
                    seed: int = 0) -> list[BurstRequest]:
    rng = np.random.default_rng(seed)
    longs = [BurstRequest(0.05 * i, long_prompt, long_tokens, "long") for i in range(n_long)]
    times = burst_at + gamma_arrivals(n_burst, burst_rate, burstiness, rng)
    return longs + [BurstRequest(float(t), burst_prompt, burst_tokens, "burst") for t in times]


def dense(*, long_prompt: int = 100, burst_prompt: int = 48, burst_tokens: int = 48, burstiness: float = 0.5,
          seed: int = 0) -> list[BurstRequest]:
    """The KV full from the start (8 long generations of 60 tokens) and a burst of 32 at 0.5 s,
    48 a second: under a KV-centric policy every burst request waits for KV the longs hold,
    so TTFT moves in proportion to the step time (the simulator's validation workload)."""
    return long_then_burst(n_long=8, long_prompt=long_prompt, long_tokens=60, n_burst=32, burst_prompt=burst_prompt,
                           burst_tokens=burst_tokens, burst_at=0.5, burst_rate=48.0, burstiness=burstiness, seed=seed)


def with_trace(longs: list[BurstRequest], rows: list[Any], burst_at: float) -> list[BurstRequest]:
    """The long generations, then the rows of a BurstGPT trace (sim.traces.TraceRequest) from
    burst_at on."""
    return [r for r in longs if r.kind == "long"] + [
        BurstRequest(burst_at + r.arrival, r.prompt_tokens, r.output_tokens, "burst") for r in rows]


def all_at_once(*, n: int, prompt: int, tokens: int) -> list[BurstRequest]:
    return [BurstRequest(0.0, prompt, tokens, "short") for _ in range(n)]


def write_trace(path: Path, requests: list[BurstRequest], model: str) -> None:
    """The workload as a BurstGPT-format CSV (Timestamp, Model, Request tokens, Response tokens,
    Total tokens, Log Type), in arrival order."""
    lines = ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"]
    for r in sorted(requests, key=lambda r: r.arrival):
        lines.append(f"{r.arrival:.6f},{model},{r.prompt_tokens},{r.output_tokens},"
                     f"{r.prompt_tokens + r.output_tokens},Conversation log")
    path.write_text("\n".join(lines) + "\n")


async def _drive(target: Target, requests: list[BurstRequest], tokens: TextTokens, seed: int) -> list[RequestRecord]:
    rng = np.random.default_rng(seed)
    samples = []
    for i, r in enumerate(requests):
        prompt, n = tokens.random_prompt(r.prompt_tokens, rng)
        samples.append(Sample(f"{i} {prompt}", n, r.output_tokens))
    records = [RequestRecord(i, r.arrival, s.prompt_len, s.output_len) for i, (r, s) in enumerate(zip(requests, samples))]
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
    async with httpx.AsyncClient(timeout=target.timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            await asyncio.sleep(max(requests[i].arrival - (time.perf_counter() - t0), 0.0))
            await send_request(client, target, samples[i], records[i], t0, tokens)

        await asyncio.gather(*(one(i) for i in range(len(requests))))
    return records


def counters(base_url: str, headers: dict[str, str]) -> dict[str, float]:
    r = httpx.get(base_url + "/v1/cluster", headers=headers, timeout=10)
    r.raise_for_status()
    return dict(r.json()["counters"])


def run(base_url: str, model: str, requests: list[BurstRequest], tokens: TextTokens, *,
        slos: dict[str, float], headers: dict[str, str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Drive the workload; metrics of every request, of each kind, and the counters' deltas."""
    headers = headers or {}
    target = Target(base_url + "/v1/completions", model, False, headers, ignore_eos=True, temperature=0.0)
    before = counters(base_url, headers)
    start = time.perf_counter()
    records = asyncio.run(_drive(target, requests, tokens, seed))
    duration = time.perf_counter() - start
    after = counters(base_url, headers)
    out: dict[str, Any] = {"all": compute_metrics(records, duration, [50, 99], slos)}
    for kind in sorted({r.kind for r in requests}):
        mine = [rec for rec, r in zip(records, requests) if r.kind == kind]
        out[kind] = compute_metrics(mine, duration, [50, 99], slos)
    out["counters"] = {k: after[k] - before.get(k, 0) for k in after}
    out["records"] = [rec.to_json() for rec in records]
    return out
