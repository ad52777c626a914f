"""Replay a trace through a simulated cluster, one overload policy after another.

Each request of the trace (arrival, prompt tokens, output tokens) is sent to a `SimCluster` at
its arrival (plus the front end's ingress latency, and its tokens reach the client after the
egress latency: both measured by `kunlite profile --served`, else 0), as the server would (the
engine's dispatcher picks the instance; EOS is ignored,
so each produces exactly its output tokens), and the loop moves virtual time from event to
event: arrivals, the end of a stage, the end of a transfer, and a tick every `tick_s` while a
policy watches the load (migration, the parameter-centric trigger and calm window). Outputs
become the `RequestRecord`s of `kunlite bench serve`, so the metrics (TTFT, TPOT, ITL and
E2E percentiles, goodput) are computed by the same code. A timeline of every device's
parameter and KV bytes, and the cluster's events, are kept for the plots.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from kunlite.bench.metrics import FAILED, OK, RequestRecord, compute_metrics
from kunlite.engine.args import EngineOptions
from kunlite.engine.messages import EngineRequest
from kunlite.sampling_params import SamplingParams
from kunlite.sim.cluster import SimCluster, SimHardware
from kunlite.sim.traces import TraceRequest

# Policies by name, as scripts/bench_burst.py names them: the engine options each sets.
POLICIES: dict[str, dict[str, Any]] = {
    "recompute": {"overload_policy": "recompute"},
    "swap": {"overload_policy": "swap", "swap_space": "64GiB"},
    "migrate": {"overload_policy": "migrate"},
    "pp2": {"pipeline_parallel": 2},
    "kunserve-stall": {"overload_policy": "kunserve", "exchange": "stall"},
    "kunserve-remote": {"overload_policy": "kunserve", "exchange": "remote-attention"},
    "kunserve-recompute": {"overload_policy": "kunserve", "exchange": "recompute"},
}


@dataclass
class SimResult:
    policy: str
    metrics: dict[str, Any]
    counters: dict[str, Any]
    records: list[RequestRecord]
    timeline: list[tuple[float, list[tuple[int, int, int, int, int]]]] = field(default_factory=list)
    events: list[tuple[float, str, int]] = field(default_factory=list)
    wall_seconds: float = 0.0  # what the simulation itself took
    fast_forward: dict[str, int] = field(default_factory=dict)  # SimCluster.ff_stats


def simulate(options: EngineOptions, hardware: SimHardware, trace: list[TraceRequest], *,
             slos: dict[str, float] | None = None, tick_s: float = 0.5, sample_s: float = 1.0,
             policy: str = "", seed: int = 0, fast_forward: bool = True) -> SimResult:
    # Without the cyclic garbage collector while it runs: it makes millions of short-lived
    # objects and almost no cycles (a hundred or so in 600 s of the bench trace, freed after),
    # and the collector's passes over the live ones were ~9% of pp2's time. Reference
    # counting still frees everything else as it goes.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _simulate(options, hardware, trace, slos, tick_s, sample_s, policy, seed, fast_forward)
    finally:
        if collecting:
            gc.enable()


def _simulate(options: EngineOptions, hardware: SimHardware, trace: list[TraceRequest], slos: dict[str, float] | None,
              tick_s: float, sample_s: float, policy: str, seed: int, fast_forward: bool) -> SimResult:
    began = time.perf_counter()
    c = SimCluster(options, hardware, fast_forward=fast_forward)
    clock = c.clock
    rng = np.random.default_rng(seed)
    ingress, egress = hardware.ingress_seconds, hardware.egress_seconds
    reqs = sorted(trace, key=lambda r: r.arrival)
    records = [RequestRecord(i, r.arrival, r.prompt_tokens, r.output_tokens) for i, r in enumerate(reqs)]
    latest = 0.0  # the last token of any request (the clock starts at 0)
    times: dict[int, list[float]] = {}  # when each token came, until the request ends
    count: dict[int, int] = {}
    vocab = c.config.model.vocab_size
    watching = c.elastic is not None or c.migrator is not None
    timeline: list[tuple[float, list[tuple[int, int, int, int, int]]]] = []
    events: list[tuple[float, str, int]] = []
    next_sample = 0.0
    i = 0
    while i < len(reqs) or c.has_unfinished or (c.elastic is not None and c.elastic.groups):
        candidates = [t for t in (reqs[i].arrival + ingress if i < len(reqs) else None, c.next_event())
                      if t is not None]
        if watching:
            candidates.append(clock.now() + tick_s)
        if not candidates:
            break  # nothing can happen any more (requests stuck: counted as failed below)
        clock.advance_to(min(candidates))
        now = clock.now()
        while i < len(reqs) and reqs[i].arrival + ingress <= now:
            r = reqs[i]
            ids = rng.integers(3, vocab, max(r.prompt_tokens, 1)).tolist()
            params = SamplingParams(temperature=0.0, max_tokens=max(r.output_tokens, 1), ignore_eos=True)
            records[i].start = r.arrival
            if c.add_request(EngineRequest(str(i), ids, params, r.arrival + ingress)):
                records[i].status = FAILED  # no instance serves
            i += 1
        c.horizon = reqs[i].arrival + ingress if i < len(reqs) else math.inf
        for o in c.step(0.0):
            k = int(o.request_id)
            if o.new_token_ids:
                # A fast-forward's output holds several tokens; each came at its own step's end.
                ts = c.token_times.pop(id(o), None) or [now]
                if egress:
                    ts = [x + egress for x in ts]
                times.setdefault(k, []).extend(ts)
                if ts[-1] > latest:
                    latest = ts[-1]
                count[k] = count.get(k, 0) + len(o.new_token_ids)
            if o.finish_reason is not None:
                rec = records[k]
                rec.end = now + egress
                if o.finish_reason == "error":
                    rec.status, rec.error = FAILED, "the device failed"
                else:
                    ts = times.pop(k)
                    rec.status, rec.ttft, rec.e2e = OK, ts[0] - rec.arrival, rec.end - rec.arrival
                    rec.itl = [b - a for a, b in zip(ts, ts[1:])]  # the gap before each token after the first
                    rec.output_tokens = count.get(k, 0)
        events += [(e.time, e.kind, e.instance) for e in c.take_events()]
        if now >= next_sample:
            timeline.append((now, _devices(c)))
            next_sample = now + sample_s
        if c.elastic is not None and not c.has_unfinished and i >= len(reqs) and \
                now > latest + 10 * options.calm_window + 10:
            break  # idle long past the calm window: what is merged stays merged
    for rec in records:
        if rec.status not in (OK, FAILED):
            rec.status, rec.error = FAILED, "never finished"
    duration = max([rec.end or 0.0 for rec in records] + [0.0]) - (reqs[0].arrival if reqs else 0.0)
    stats = c.stats()
    counters = {"preemptions": stats.num_preemptions_total, "swaps": stats.num_swaps_out_total,
                "migrations": stats.num_migrations_total, "drops": stats.num_drops_total,
                "restores": stats.num_restores_total, "exchanged_bytes": stats.exchanged_bytes_total,
                "remote_attention_calls": stats.remote_attention_calls_total}
    return SimResult(policy, compute_metrics(records, duration, [50, 90, 99], slos), counters, records, timeline, events,
                     time.perf_counter() - began, dict(c.ff_stats))


def _devices(c: SimCluster) -> list[tuple[int, int, int, int, int]]:
    """One row per device: (rank, parameter bytes held, KV bytes used, KV bytes in all, layers held)."""
    out = []
    pb = c._page_bytes()
    for inst in c.instances.values():
        for m in inst.members:
            held = _held_pages(c, m.rank, m.layers)
            out.append((m.rank, held * pb, m.kv.num_used_pages * pb, m.kv.num_kv_pages * pb, m.layers[1] - m.layers[0]))
    return sorted(out)


def _held_pages(c: SimCluster, rank: int, layers: tuple[int, int]) -> int:
    """Parameter pages a device running `layers` holds (a device's groups never change size)."""
    from kunlite.engine.model import needed_groups

    cache = c.__dict__.setdefault("_held_cache", {})
    if (rank, layers) not in cache:
        ready = c.workers[rank].ready
        needed = set(needed_groups(c.config.model, layers))
        cache[rank, layers] = sum(n for g, (_, n) in ready.groups.items() if g in needed)  # type: ignore[union-attr]
    return cache[rank, layers]


def run_policies(base: EngineOptions, hardware: SimHardware, trace: list[TraceRequest], policies: list[str], *,
                 slos: dict[str, float] | None = None, fast_forward: bool = True, jobs: int = 1) -> list[SimResult]:
    """One simulation per policy, in order; `jobs` > 1 runs that many at once in worker
    processes (each simulation is deterministic: the same results)."""
    for name in policies:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    runs = [(replace(base, **POLICIES[name]), name) for name in policies]
    if jobs <= 1 or len(runs) == 1:
        return [simulate(o, hardware, trace, slos=slos, policy=n, fast_forward=fast_forward) for o, n in runs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(jobs, len(runs)), mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(simulate, o, hardware, trace, slos=slos, policy=n, fast_forward=fast_forward)
                   for o, n in runs]
        return [f.result() for f in futures]
