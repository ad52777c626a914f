"""The bubble fraction of a 2-stage pipeline (stage idle time over the time a step is in
flight), with microbatches of balanced predicted cost and with an even split, on one mixed
workload: decodes of running requests interleaved with prompts arriving over time.

    python scripts/bench_pipeline.py [--requests 32] [--prompt 200] [--tokens 64] [--modes balanced,even]

Each mode runs in-process as a coordinator with two `kunlite worker`s (default model, one
thread each, --pipeline-parallel 2). The table gives, per mode, the bubble fraction, the
output tokens per second, and P50/P99 TTFT and TPOT.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from kunlite.engine.args import EngineOptions
from kunlite.engine.cluster.coordinator import Cluster
from kunlite.engine.messages import EngineRequest
from kunlite.sampling_params import SamplingParams


def run(mode: str, args: argparse.Namespace) -> dict[str, float]:
    c = Cluster(EngineOptions(devices=2, pipeline_parallel=2, threads=1, device_memory=args.device_memory, dtype="bfloat16",
                              max_model_len=1024, microbatch=mode))
    try:
        rng = np.random.default_rng(0)
        params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
        arrivals = np.cumsum(rng.exponential(1 / args.rate, args.requests))  # Poisson arrivals
        lengths = rng.integers(args.prompt // 4, args.prompt * 2, args.requests)
        sent = 0
        sent_at: dict[str, float] = {}
        first_at: dict[str, float] = {}
        last_at: dict[str, float] = {}
        count: dict[str, int] = {}
        start = time.perf_counter()
        while sent < args.requests or c.has_unfinished:
            now = time.perf_counter() - start
            while sent < args.requests and arrivals[sent] <= now:
                ids = rng.integers(100, 40000, int(lengths[sent])).tolist()
                c.add_request(EngineRequest(f"r{sent}", ids, params, time.time()))
                sent_at[f"r{sent}"] = now
                sent += 1
            for o in c.step(0.05):
                t = time.perf_counter() - start
                first_at.setdefault(o.request_id, t)
                last_at[o.request_id] = t
                count[o.request_id] = count.get(o.request_id, 0) + len(o.new_token_ids)
        elapsed = time.perf_counter() - start
        inst = next(iter(c.instances.values()))
        ttft = [first_at[r] - sent_at[r] for r in first_at]
        tpot = [(last_at[r] - first_at[r]) / (count[r] - 1) for r in count if count[r] > 1]
        return {"bubble": inst.bubbles.fraction(time.perf_counter()), "tok_s": sum(count.values()) / elapsed,
                "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
                "tpot_p50": float(np.percentile(tpot, 50)), "tpot_p99": float(np.percentile(tpot, 99))}
    finally:
        c.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="balanced,even")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt", type=int, default=200, help="mean prompt tokens (uniform in [p/4, 2p))")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rate", type=float, default=2.0, help="arrivals per second (Poisson)")
    p.add_argument("--device-memory", default="600MiB")
    args = p.parse_args()
    began = time.time()
    rows = [(mode, run(mode, args)) for mode in args.modes.split(",")]
    print(f"# {platform.node()} {time.strftime('%Y-%m-%d %H:%M', time.localtime(began))}: default model, "
          f"--pipeline-parallel 2 over 2 workers x 1 thread; {args.requests} requests, prompts ~{args.prompt} tokens, "
          f"{args.tokens} new tokens, {args.rate:g}/s")
    print("| microbatching | bubble fraction | output tok/s | TTFT P50 (s) | TTFT P99 (s) | TPOT P50 (s) | TPOT P99 (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, r in rows:
        print(f"| {mode} | {r['bubble']:.1%} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | "
              f"{r['tpot_p50']:.3f} | {r['tpot_p99']:.3f} |")


if __name__ == "__main__":
    main()
