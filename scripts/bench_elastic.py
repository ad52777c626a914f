"""The parameter-centric policy's own costs on the default model, 2 CPU workers over gloo:
drop-to-serving latency, the KV exchange's bandwidth (beside the P2P probe's at the same
message sizes), and the restore time.

    python scripts/bench_elastic.py [--requests 8] [--prompt 400] [--waiting 4] [--chunk 8]
        [--exchange remote-attention] [--repeats 3]

Each repeat: two replicas, `--requests` long prompts on instance 0, decoding; then
`--waiting` short requests join its queue (what a burst leaves at the trigger) and the
replicas merge into a 2-stage pipeline at once. The merged group's first step serves the
queue in the freed pages while the running requests' KV is exchanged (`--exchange`, the
server's flag; each chunk's requests pause while their own KV moves). The requests finish
in the pipeline, and the group is restored (weights pulled from the peer, KV moved home).
Times are the coordinator's: the drop from the decision to the merged group serving
(accounting moved, devices told), to its first step planned (sent to the devices), and to
that step done (its compute included); the restore from its decision to the split (weights
P2P and KV moves included). Exchange copies are timed on the receiver, from posting the
receive to the data having landed; a chunk's copies start together on one pair of workers,
so the chunk's bandwidth is its bytes over its longest copy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from kunlite.engine.args import EngineOptions
from kunlite.engine.cluster.coordinator import Cluster
from kunlite.engine.messages import EngineRequest
from kunlite.sampling_params import SamplingParams
from kunlite.transfer.probe import measure


def once(args: argparse.Namespace, seed: int) -> dict[str, list[float]]:
    c = Cluster(EngineOptions(devices=2, threads=1, dtype="bfloat16", device_memory=args.device_memory,
                              max_model_len=2048, overload_policy="kunserve", exchange=args.exchange, calm_window=3600))
    try:
        c.elastic.chunk = args.chunk
        rng = np.random.default_rng(seed)
        params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
        for i in range(args.requests):
            c.add_request(EngineRequest(f"r{i}", rng.integers(100, 40000, args.prompt).tolist(), params, time.time(),
                                        instance=0))
        while any(s.in_prefill for s in c.instances[0].scheduler.running) or c.instances[0].scheduler.waiting:
            c.step(0.1)
        # The queue a burst leaves at the trigger: it is absorbed by the merged group and is what
        # its first step serves in the freed pages (the requests above are in flight or exchanging).
        for i in range(args.waiting):
            c.add_request(EngineRequest(f"w{i}", rng.integers(100, 40000, args.waiting_prompt).tolist(), params,
                                        time.time(), instance=0))
        c.elastic.drop_now()
        while c.has_unfinished:
            c.step(0.1)
        c.elastic.restore_now(0)
        while len(c.instances) != 2:
            c.step(0.1)
        return {**c.elastic.timings, "transfers": c.elastic.transfer_log, "chunks": c.elastic.chunk_log}
    finally:
        c.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prompt", type=int, default=400)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device-memory", default="600MiB")
    p.add_argument("--waiting", type=int, default=4, help="requests queued at the drop")
    p.add_argument("--waiting-prompt", type=int, default=48)
    p.add_argument("--exchange", default="remote-attention", choices=["stall", "remote-attention", "recompute"],
                   help="what the in-flight requests do while their KV moves (the server's --exchange)")
    args = p.parse_args()
    began = time.time()
    runs = [once(args, seed) for seed in range(args.repeats)]
    ms = lambda key: statistics.median(v for r in runs for v in r[key]) * 1e3  # noqa: E731
    transfers = [t for r in runs for t in r["transfers"]]
    sizes = sorted({n for n, _ in transfers})
    exchange_gbs = statistics.median(n / s / 1e9 for n, s in transfers)
    chunks = [t for r in runs for t in r["chunks"]]
    chunk_gbs = statistics.median(n / s / 1e9 for n, s in chunks)
    latency, probe = measure(sizes[:1] + sizes[-1:] if len(sizes) > 1 else sizes, repeats=10)
    print(f"# {platform.node()} {time.strftime('%Y-%m-%d %H:%M', time.localtime(began))}: default model (bf16), "
          f"2 workers x 1 thread, {args.requests} requests of {args.prompt} prompt tokens, chunks of {args.chunk}; "
          f"medians of {args.repeats} runs")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| drop: decision to the merged group serving (accounting, devices told) | {ms('drop_s'):.1f} ms |")
    print(f"| drop: decision to its first step planned | {ms('drop_to_first_step_planned_s'):.1f} ms |")
    print(f"| drop: decision to its first step done | {ms('drop_to_first_step_done_s'):.1f} ms |")
    print(f"| exchange: whole, all requests moved | {ms('exchange_s'):.0f} ms |")
    print(f"| exchange: copies, {len(transfers)} of {sizes[0] / 2**20:.1f}-{sizes[-1] / 2**20:.1f} MiB | "
          f"{exchange_gbs:.2f} GB/s (median) |")
    print(f"| exchange: chunks, {len(chunks)} of {statistics.median(n for n, _ in chunks) / 2**20:.1f} MiB "
          f"(copies at once, one pair) | {chunk_gbs:.2f} GB/s (median) |")
    for s in probe:
        print(f"| P2P probe at {s.num_bytes / 2**20:.1f} MiB (bench_transfer) | {s.gb_per_s:.2f} GB/s |")
    print(f"| restore: decision to two replicas (weights P2P, KV home) | {ms('restore_s'):.0f} ms |")


if __name__ == "__main__":
    main()
