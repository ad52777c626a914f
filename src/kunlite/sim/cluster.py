"""A cluster whose devices are a cost model and whose wires are a link model, in virtual time.

`SimCluster` is the coordinator of `engine/cluster/` as it is: the same instances, scheduler,
block accounting, preemption policies, dispatcher, live migration and parameter-centric policy
(trigger, planner, exchange, restore). Only what touches tensors and wires is replaced: `send`
turns each message a worker would get into timed events, and `_poll` delivers the events that
are due, through the coordinator's own `_handle`, as the workers' answers.

    StageWork    the device computes its share when it is free and the previous stage's
                 activations have arrived: the step cost model for its layers (plus swap and
                 remote-attention traffic over the link model); a StageDone at the end
    Send/RecvPages  a transfer of len(pages) pages over the link between the two devices; a
                 TransferDone at both ends (a blocking receive keeps its device busy)
    CopyPages    a copy within the device, at its memory bandwidth
    RestoreLayers / SendParams  the weights over the link from the peer, or from host memory
    DropLayers, RunLayers  immediate
A device's pool is sized by `engine/sizing.py`, page for page as the real one.

Decode steps are taken many at a time where that is the same run (`fast_forward.py`).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

from kunlite.engine.args import EngineOptions
from kunlite.engine.clock import VirtualClock
from kunlite.engine.cluster.coordinator import Cluster
from kunlite.engine.cluster.launch import WorkerState
from kunlite.engine.cluster.messages import (CopyPages, Ready, RecvPages, RestoreLayers, SendPages, SendParams,
                                             TransferDone)
from kunlite.engine.messages import RequestOutput
from kunlite.engine.model import param_groups
from kunlite.engine.sizing import pool_sizing
from kunlite.engine.step_cost import StepCost
from kunlite.engine.instance import Instance, Member
from kunlite.engine.work import StageDone, StageWork
from kunlite.sim.fast_forward import FastForward

log = logging.getLogger("kunlite.sim")


@dataclass(frozen=True)
class SimHardware:
    """What the simulation needs of a device and its links."""

    cost: StepCost  # seconds of a step for a layer range
    link_seconds: Any  # callable: bytes -> seconds between two devices (one link model for all pairs)
    host_seconds: Any  # callable: bytes -> seconds to or from host memory (swap, weights from host)
    copy_bandwidth: float  # bytes/s of a copy within a device
    device_memory: int  # bytes of each device's pool
    ingress_seconds: float = 0.0  # a request reaches the engine this long after it is sent (the front end)
    egress_seconds: float = 0.0  # a token reaches the client this long after its step commits


@dataclass(order=True)
class _Event:
    time: float
    order: int
    rank: int = field(compare=False)
    msg: Any = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class SimCluster(FastForward, Cluster):
    quiet_stages = True  # see _quiet (False: each StageDone is an event of its own, as a test compares)

    def __init__(self, options: EngineOptions, hardware: SimHardware, *, priority_order: bool = False,
                 fast_forward: bool = True) -> None:
        self.clock = VirtualClock()
        self.hw = hardware
        self._init_fast_forward(fast_forward)
        self._queue: list[_Event] = []
        # StageDones that only time their step (a pipeline stage before the last: the step's
        # slowest stage and the bubble meter), where no overload policy acts between events:
        # handled in their order just before the next event, without a loop pass of their own
        self._quiet: list[_Event] = []
        self._order = itertools.count()
        self._busy: dict[int, float] = {}  # device -> when it is free
        self._stage_end: dict[tuple[int, int], float] = {}  # (step, stage) -> when its activations are ready
        self._pairs: dict[int, tuple[int, list[int]]] = {}  # transfer id -> (rank, pages) of the side seen first
        self._setup(options, priority_order, "warning")
        cfg = self.config
        elem = cfg.device.torch_dtype.itemsize
        for rank in range(options.devices):
            layers = self.stage_layers[rank % options.pipeline_parallel]
            self.workers[rank] = WorkerState(rank=rank, local=False, state="ready", generation=0,
                                             ready=self._ready_message(rank, layers, elem))
            self._busy[rank] = 0.0
        self.generation = 0
        self._build_instances()
        self._ready()
        never_eos = next(t for t in itertools.count(1) if t not in self.eos)
        self._token = never_eos  # what a simulated sample is: any token that is not an EOS

    def _ready_message(self, rank: int, layers: tuple[int, int], elem: int) -> Ready:
        cfg = self.config
        sizing = pool_sizing(cfg.model, layers, elem_bytes=elem, page_size=cfg.cache.page_size,
                             device_memory=self.hw.device_memory)
        groups, first = {}, 0
        sizes = {g.name: g.pages for g in sizing.groups}
        for name in param_groups(cfg.model, layers):  # laid out from page 0 in this order, as the pool does
            groups[name] = (first, sizes[name])
            first += sizes[name]
        return Ready(rank, "sim", sizing.num_pages, sizing.page_bytes, list(range(first, sizing.num_pages)),
                     first, first * sizing.page_bytes, groups)

    def make_instance(self, iid: int, members: list[Member]) -> Instance:
        inst = super().make_instance(iid, members)
        inst.payload = False  # no device reads page tables or sample rows here
        return inst

    # ------------------------------------------------------------------ the workers, simulated

    def send(self, rank: int, msg: Any) -> bool:
        now = self.clock.now()
        if isinstance(msg, StageWork):
            self._stage(rank, msg, now)
        elif isinstance(msg, (SendPages, RecvPages)):
            self._transfer(rank, msg, now)
        elif isinstance(msg, CopyPages):
            self._busy[rank] = max(self._busy[rank], now) + len(msg.src) * self._page_bytes() / self.hw.copy_bandwidth
        elif isinstance(msg, RestoreLayers):
            nbytes = self._group_bytes(rank, msg.groups)
            seconds = self.hw.host_seconds(nbytes) if msg.source < 0 else self.hw.link_seconds(nbytes)
            start = max(self._busy[rank], now, self._busy.get(msg.source, now))
            self._busy[rank] = start + seconds
        elif isinstance(msg, SendParams):
            self._busy[rank] = max(self._busy[rank], now) + self.hw.link_seconds(self._group_bytes(rank, msg.groups))
        return True  # DropLayers, RunLayers, Ping ...: nothing to wait for

    def send_service(self, rank: int, msg: Any) -> bool:
        return True  # remote attention: its traffic is costed in the requester's step

    def _stage(self, rank: int, work: StageWork, now: float) -> None:
        ff = self._ff_planned
        if ff is not None:  # k decode steps: their ends were costed when it was planned
            if not work.is_last:
                return  # a pipeline's stage: its window timed it, and set the devices' busy
            self._ff_planned = None
            end = ff.ends[-1]
            if ff.slow_other is None:
                self._busy[rank] = end
            ff.event = self._at(end, rank, StageDone(work.step_id, work.instance, rank, ff.last_seconds(),
                                                     [self._token] * len(work.samples)))
            self._ff[work.step_id] = ff
            self.ff_stats["flights"] += 1
            self.ff_stats["queued"] += ff.head != (None, None)
            self.ff_stats["steps"] += len(ff.ends)
            return
        # (new tokens, context) per sequence: the flight's shape when the work carries no WorkSeqs
        batch = [(len(s.tokens), s.num_computed) for s in work.seqs] if work.seqs else \
            self.instances[work.instance].flights[work.step_id].shape
        layers = next(m.layers for i in self.instances.values() for m in i.members if m.rank == rank)
        seconds = self.hw.cost.step_seconds(batch, layers)
        pb = self._page_bytes()
        if work.swap_out or work.swap_in:
            seconds += self.hw.host_seconds((len(work.swap_out.pages) + len(work.swap_in.pages)) * pb)
        if work.remote:  # per layer: q, k, v out and o back for the remote rows, over the link
            m = self.config.model
            rows = sum(len(work.seqs[r].tokens) for rr in work.remote for r in rr.rows)
            per_layer = rows * (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim * self.config.device.torch_dtype.itemsize
            seconds += (layers[1] - layers[0]) * self.hw.link_seconds(per_layer)
        start = max(now, self._busy[rank])
        if not work.is_first:
            hidden = sum(q for q, _ in batch) * self.config.model.hidden_size * self.config.device.torch_dtype.itemsize
            start = max(start, self._stage_end.pop((work.step_id, work.stage - 1), now) + self.hw.link_seconds(hidden))
        end = start + seconds
        self._busy[rank] = end
        if work.num_stages > 1:  # (its end, its slowest stage so far, the rank it ends on)
            self._step_info[work.step_id] = (end, max(seconds, self._step_info.get(work.step_id, (0, 0.0, 0))[1]), rank)
        if not work.is_last:
            self._stage_end[(work.step_id, work.stage)] = end
        tokens = [self._token] * len(work.samples) if work.is_last else []
        done = StageDone(work.step_id, work.instance, rank, seconds, tokens)
        if work.is_last or not self.quiet_stages or self.elastic is not None or self.migrator is not None:
            self._at(end, rank, done)
        else:
            heapq.heappush(self._quiet, _Event(end, next(self._order), rank, done))

    def _transfer(self, rank: int, msg: SendPages | RecvPages, now: float) -> None:
        other = self._pairs.pop(msg.transfer_id, None)
        if other is None:
            self._pairs[msg.transfer_id] = (rank, list(msg.pages))
            return
        nbytes = len(msg.pages) * self._page_bytes()
        sender, receiver = (rank, other[0]) if isinstance(msg, SendPages) else (other[0], rank)
        end = max(now, self._busy[sender] if isinstance(msg, RecvPages) else now) + self.hw.link_seconds(nbytes)
        if isinstance(msg, RecvPages) and msg.blocking:
            self._busy[receiver] = max(self._busy[receiver], end)
        self._at(end, sender, TransferDone(msg.transfer_id, sender, nbytes, end - now))
        self._at(end, receiver, TransferDone(msg.transfer_id, receiver, nbytes, end - now))

    def _at(self, t: float, rank: int, msg: Any) -> _Event:
        ev = _Event(t, next(self._order), rank, msg)
        heapq.heappush(self._queue, ev)
        return ev

    def _page_bytes(self) -> int:
        return next(iter(self.workers.values())).ready.page_bytes  # type: ignore[union-attr]

    def _group_bytes(self, rank: int, groups: list[str]) -> int:
        ready = self.workers[rank].ready
        assert ready is not None
        return sum(ready.groups[g][1] for g in groups) * ready.page_bytes

    # ------------------------------------------------------------------ time

    def next_event(self) -> float | None:
        while self._queue and self._queue[0].cancelled:
            heapq.heappop(self._queue)
        return self._queue[0].time if self._queue else None

    def _poll(self, timeout_s: float, wake_fd: int | None = None, outputs: list[RequestOutput] | None = None) -> None:
        """Deliver every event that is due now (the caller advances the clock)."""
        outputs = outputs if outputs is not None else []
        now = self.clock.now()
        queue, quiet = self._queue, self._quiet
        while queue and queue[0].time <= now:
            ev = heapq.heappop(queue)
            if ev.cancelled:
                continue
            while quiet and quiet[0] < ev:  # (time, then order)
                q = heapq.heappop(quiet)
                self._delivering(q.msg, q.rank, now)  # (nothing to do for it, as for any such stage)
                self._handle(self.workers[q.rank], q.msg, outputs)
            ff = self._delivering(ev.msg, ev.rank, now)
            n = len(outputs)
            self._handle(self.workers[ev.rank], ev.msg, outputs)
            if ff is not None:  # (its flight may be a merged group's now, which commits it the same)
                for o in outputs[n:]:
                    self.token_times[id(o)] = ff.ends

    def _watch(self, outputs: list[RequestOutput]) -> None:
        """Simulated workers never die. Runs between the commits and `elastic.tick()`."""
        self._cut_if_throttled()

    def step(self, timeout_s: float = 0.0, wake_fd: int | None = None) -> list[RequestOutput]:
        self._extend_windows()  # (the simulation loop moves the horizon on after each arrival)
        out = super().step(timeout_s, wake_fd)
        self._cut_if_throttled()  # the trigger looks again at the next event, whoever's it is
        out += self.outputs_pending  # of the steps a cut committed
        self.outputs_pending = []
        return out

    def shutdown(self, timeout_s: float = 10.0) -> None:
        pass

