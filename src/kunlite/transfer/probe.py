"""P2P bandwidth between two workers by message size, measured through `transfer/` itself
(the same world, tags and send/recv that pipelines, migrations and exchanges use).

Two processes join generation 0 of a 2-rank world over a store this process hosts (the
coordinator's part). For each size, rank 0 sends k messages of that size back to back (k such
that a burst moves at least 32 MiB, at most 64 messages) and rank 1 answers with 4 bytes once it
has them all; the burst's time, less one 4-byte round trip, over k, is the time per message.
Each burst is repeated and the median counts. The 4-byte round trip is reported as latency.

Rank 0 writes its results to a file: a multiprocessing.Queue handed to the ranks made every
gloo round trip here take ~4 ms instead of ~0.15 ms (measured; the device workers are started
with subprocess and carry none).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

DEFAULT_SIZES = tuple(1 << k for k in range(12, 29, 2))  # 4 KiB .. 256 MiB


@dataclass(frozen=True)
class Sample:
    num_bytes: int
    seconds: float  # median time per message, back to back

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else float("nan")


def _rank_main(rank: int, port: int, device: str, sizes: list[int], repeats: int, out_path: str) -> None:
    import json

    import torch

    from kunlite.transfer import p2p
    from kunlite.transfer.world import Rendezvous, World, connect_store

    torch.set_num_threads(1)
    rdzv = Rendezvous("127.0.0.1", port, 2, rank, rank)
    world = World(connect_store(rdzv, 60), rdzv, device, 120)
    world.join(0)
    dev = world.device
    ack = torch.zeros(1, dtype=torch.float32, device=dev)

    def burst(payload: torch.Tensor, k: int) -> float:
        start = time.perf_counter()
        if rank == 0:
            pending = [p2p.send(payload, 1, p2p.Tag.PROBE) for _ in range(k)]
            for p in pending:
                p.wait()
            p2p.recv(tuple(ack.shape), ack.dtype, 1, p2p.Tag.PROBE, dev)
        else:
            for _ in range(k):
                p2p.recv(tuple(payload.shape), payload.dtype, 0, p2p.Tag.PROBE, dev)
            p2p.send(ack, 0, p2p.Tag.PROBE).wait()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    for _ in range(20):  # the first exchanges of a new pair are slow
        burst(ack, 1)
    base = statistics.median(burst(ack, 1) for _ in range(50))
    results = []
    for size in sizes:
        payload = torch.ones(max(size // 4, 1), dtype=torch.float32, device=dev)
        k = min(max((32 << 20) // size, 1), 64)
        burst(payload, k)  # warm
        times = [burst(payload, k) for _ in range(repeats)]
        results.append((size, max(statistics.median(times) - base, 1e-9) / k))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"latency": base, "samples": results}, f)
    world.leave()


def measure(sizes: list[int] | tuple[int, ...] = DEFAULT_SIZES, repeats: int = 10,
            device: str = "cpu") -> tuple[float, list[Sample]]:
    """Run the two ranks; returns the 4-byte round-trip time and one Sample per size (rank 1
    uses cuda:1 on CUDA)."""
    from kunlite.engine.cluster.launch import free_port
    from kunlite.transfer.world import host_store

    port = free_port("127.0.0.1")
    store = host_store("127.0.0.1", port, 60)  # noqa: F841 - lives while the ranks run
    ctx = multiprocessing.get_context("spawn")
    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
    out.close()
    devices = [device, device] if device == "cpu" else ["cuda:0", "cuda:1"]
    procs = [ctx.Process(target=_rank_main, args=(r, port, devices[r], list(sizes), repeats, out.name))
             for r in range(2)]
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(600)
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"a probe rank failed (exit codes {[p.exitcode for p in procs]})")
        with open(out.name) as f:
            result = json.load(f)
        latency, samples = result["latency"], [Sample(int(n), float(t)) for n, t in result["samples"]]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        os.unlink(out.name)
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    return latency, samples


def format_table(samples: list[Sample], backend: str) -> str:
    lines = [f"| message | time per message | bandwidth ({backend}) |", "|---:|---:|---:|"]
    for s in samples:
        size = f"{s.num_bytes / 2**20:.0f} MiB" if s.num_bytes >= 2**20 else f"{s.num_bytes / 2**10:.0f} KiB"
        lines.append(f"| {size} | {s.seconds * 1e3:.3f} ms | {s.gb_per_s:.2f} GB/s |")
    return "\n".join(lines)
