"""Helpers for a 2-worker CPU cluster over gloo, driven in-process (the coordinator runs in the
test, the workers are real `python -m kunlite worker` processes), on tiny random-weight models."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kunlite.engine.args import EngineOptions
from kunlite.engine.cluster.coordinator import Cluster
from kunlite.engine.core import EngineCore
from kunlite.engine.messages import EngineRequest, RequestOutput
from kunlite.sampling_params import SamplingParams

# A tiny model's parameters take ~440 KiB of pages: 650 KiB leaves ~52 blocks of 4 tokens per
# device, less than the prompts below need together, so KV runs out mid-generation.
SCARCE = str(650 * 1024)
BASE: dict[str, Any] = dict(page_size=4, dtype="float32", threads=1, max_num_batched_tokens=32, max_model_len=128)
PROMPTS = [[(7 * i + j) % 150 + 3 for j in range(20 + 3 * i)] for i in range(5)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)


def submit(core: Any, prompts: list[list[int]], params: SamplingParams = GREEDY, instance: int | None = None,
           prefix: str = "r") -> None:
    for i, p in enumerate(prompts):
        assert not core.add_request(EngineRequest(f"{prefix}{i}", p, params, time.time(), instance=instance))


def drain(core: Any, timeout_s: float = 120.0) -> dict[str, list[RequestOutput]]:
    """Step until nothing is left; every output, by request."""
    outs: dict[str, list[RequestOutput]] = {}
    deadline = time.monotonic() + timeout_s
    while core.has_unfinished:
        assert time.monotonic() < deadline, "the cluster did not finish in time"
        for o in core.step(0.5):
            outs.setdefault(o.request_id, []).append(o)
    return outs


def tokens(outs: dict[str, list[RequestOutput]]) -> dict[str, list[int]]:
    return {rid: [t for o in seq for t in o.new_token_ids] for rid, seq in outs.items()}


def reference(model: Path, prompts: list[list[int]] = PROMPTS, params: SamplingParams = GREEDY) -> dict[str, list[int]]:
    """Greedy tokens of one device with ample KV: an undisturbed run."""
    core = EngineCore(EngineOptions(model=str(model), device_memory="16MiB", **BASE).build())
    submit(core, prompts, params)
    return tokens(drain(core))


def assert_nothing_held(c: Cluster) -> None:
    """Exact KV accounting on every device: free + used == total, nothing used, running, waiting,
    swapped or reserved."""
    for inst in c.instances.values():
        inst.kv.check()
        sched = inst.scheduler
        assert not (sched.running or sched.waiting or sched.swapped), inst.id
        for m in inst.members:
            assert m.kv.num_used_pages == 0 and not m.kv.tables, (inst.id, m.rank, dict(m.kv.tables))
            assert m.kv.num_free_blocks + m.kv.num_used_blocks == m.kv.num_total_blocks
        held = getattr(sched.policy, "held", {})
        assert not held, held


@contextmanager
def cluster(model: Path, **opts: Any) -> Iterator[Cluster]:
    options = {**BASE, **opts}
    c = Cluster(EngineOptions(model=str(model), devices=2, **options))
    try:
        yield c
    finally:
        c.shutdown()
        for w in c.workers.values():  # nothing left running
            assert w.popen is None or w.popen.poll() is not None, f"worker {w.rank} still runs"
