"""The single-device engine, in one process: one instance of one member, and its device.

`step()` is the whole loop of a replica: plan a step, run it on the device, commit it. The
server runs many devices through `engine/cluster/`, with the same `Instance` on the scheduling
side and the same `StageRunner` on each device; the offline `LLM` and the tests use this one.
"""

from __future__ import annotations

import logging
import os
import socket

import torch

from kunlite.config import ConfigError, EngineConfig
from kunlite.engine.block_manager import BlockManager
from kunlite.engine.cpu_tuning import keep_freed_memory
from kunlite.engine.instance import Instance, Member, eos_token_ids, stop_reason
from kunlite.engine.cluster.dispatch import blocks_for
from kunlite.engine.messages import ClusterEvent, DeviceStats, EngineRequest, EngineStats, InstanceStats, RequestOutput, StepTiming
from kunlite.engine.preemption import make_policy
from kunlite.engine.runner import ModelRunner
from kunlite.engine.sampler import Sampler
from kunlite.engine.stage import StageRunner

__all__ = ["EngineCore", "eos_token_ids", "stop_reason"]

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, *, priority_order: bool = False) -> None:
        self.config = config
        if not config.device.is_cuda:
            keep_freed_memory()
        if config.device.threads:
            torch.set_num_threads(config.device.threads)
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config)
        self.kv: BlockManager = self.runner.new_block_manager()
        self.eos = eos_token_ids(config.model_dir)
        self.max_model_len = config.max_model_len
        swap_slots = config.cache.swap_space // self.runner.pool.page_bytes
        self.instance = Instance(0, [Member(0, config.layers, self.kv)], config.scheduler,
                                 make_policy(config.scheduler.preemption_mode, [swap_slots]), self.eos,
                                 self.max_model_len, priority_order=priority_order)
        self.scheduler = self.instance.scheduler
        self.stage = StageRunner(self.runner, Sampler(seed=config.seed), self.eos, swap_slots=swap_slots)
        if self.kv_capacity_tokens < self.max_model_len:
            # A sequence that can never fit would wait forever: refuse to start instead.
            raise ConfigError(
                f"the KV cache holds {self.kv_capacity_tokens} tokens, fewer than --max-model-len "
                f"{self.max_model_len}; raise --device-memory or lower --max-model-len")
        log.info("KV capacity: %d tokens (%d blocks of %d tokens, %d KV pages of %d KiB; %d parameter pages)",
                 self.kv_capacity_tokens, self.kv.num_total_blocks, self.kv.page_size, self.kv.num_kv_pages,
                 self.runner.pool.page_bytes // 1024, self.runner.pool.param_pages)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv.num_total_blocks * self.kv.page_size

    # ------------------------------------------------------------------ requests

    def add_request(self, req: EngineRequest) -> list[RequestOutput]:
        """Queue a request (the single device never refuses one: nothing to return)."""
        self.instance.add_request(req)
        return []

    def abort(self, request_ids: list[str], choices: list[tuple[str, int]] = ()) -> list[RequestOutput]:
        """End whole requests, or single choices of them; their KV is freed at once."""
        return self.instance.abort(request_ids, choices)

    @property
    def has_unfinished(self) -> bool:
        return self.instance.has_unfinished

    # ------------------------------------------------------------------ one step

    def step(self, timeout_s: float = 0.0, wake_fd: int | None = None) -> list[RequestOutput]:
        """Plan one step, run it here, commit it. (The timeout and wake-up descriptor are the
        cluster's; a local step never waits.)"""
        works = self.instance.plan()
        if works is None:
            return []
        done, _ = self.stage.run(works[0])
        return self.instance.commit(done)

    # ------------------------------------------------------------------ reporting

    def stats(self) -> EngineStats:
        pool, kv, sched = self.runner.pool, self.kv, self.scheduler
        device = DeviceStats(0, os.getpid(), socket.gethostname(), str(self.runner.device), self.runner.layers, True,
                             pool.param_pages * pool.page_bytes, kv.num_used_pages * pool.page_bytes,
                             kv.num_kv_pages * pool.page_bytes)
        waiting_blocks = sum(blocks_for(s.num_tokens, kv.page_size, s.pending_children + 1) for s in sched.waiting)
        instance = InstanceStats(0, "serving", len(sched.running), len(sched.waiting), kv.num_used_blocks,
                                 kv.num_total_blocks, waiting_blocks, kv.page_size, [device])
        return EngineStats(num_running=len(sched.running), num_waiting=len(sched.waiting),
                           kv_pages_used=kv.num_used_pages, kv_pages_total=kv.num_kv_pages,
                           num_preemptions_total=sched.num_preemptions,
                           param_pages=pool.param_pages, page_size=kv.page_size, instances=[instance],
                           **self.instance.swap_counters(pool.page_bytes))

    def running_request_ids(self) -> set[str]:
        return {s.request_id for s in self.scheduler.running}

    def take_moved(self) -> list[tuple[str, int]]:
        return []

    def take_events(self) -> list[ClusterEvent]:
        return self.instance.take_events()

    def shutdown(self) -> None:
        pass

    @property
    def timings(self) -> list[StepTiming]:
        return self.instance.timings

    def take_timings(self) -> list[StepTiming]:
        return self.instance.take_timings()

    def record_batches(self) -> None:
        """Every StepTiming from now on carries its batch (--step-log)."""
        self.instance.record_batches = True
