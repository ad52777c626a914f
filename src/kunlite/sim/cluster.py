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

Fast-forward: a replica whose next step is exactly one decode of each running sequence
(`Instance.decode_only`) takes up to FAST_FORWARD_STEPS such steps as one flight
(`Instance.plan(repeat=k)`): their KV is allocated up front, their time is the sum of the k
steps' costs, and the tokens commit together, with each step's end kept for the ITLs. It is
the same run, step for step: k stops before any sequence would end and before the KV runs
out; requests may wait (or be swapped out) if the head of their queue does not fit now, as it
then fits at no later step of the flight; an arrival that changes that head cuts the flight at
the end of the step in progress (its unused KV released, the steps done by then committed),
where the step-by-step run would try it; `loads()` shows the dispatcher each flight's KV as
allocated step by step; and every flight is cut the same way as soon as the overload policy may act (a replica throttled
under `kunserve`, an instance short of KV or a migration going on under `migrate`), and none
starts meanwhile, nor while a merged group exists (its calm watch samples the load at every
event).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
import numpy as np

from kunlite.engine.args import EngineOptions
from kunlite.engine.clock import VirtualClock
from kunlite.engine.cluster.coordinator import Cluster
from kunlite.engine.cluster.dispatch import InstanceLoad
from kunlite.engine.cluster.migrate import RESERVE_FRACTION, short_of_kv
from kunlite.engine.cluster.launch import WorkerState
from kunlite.engine.cluster.messages import (CopyPages, Ready, RecvPages, RestoreLayers, SendPages, SendParams,
                                             TransferDone)
from kunlite.engine.messages import RequestOutput
from kunlite.engine.plan import throttled
from kunlite.engine.model import param_groups
from kunlite.engine.sizing import pool_sizing
from kunlite.engine.step_cost import StepCost
from kunlite.engine.instance import Instance, Member
from kunlite.engine.sequence import Sequence
from kunlite.engine.work import StageDone, StageWork
from kunlite.sim.pipeline_ff import Stream, Window, plan_window

log = logging.getLogger("kunlite.sim")

FAST_FORWARD_STEPS = 256  # the most decode steps one flight stands for


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


@dataclass
class _FastForward:
    """A flight of k decode steps of one replica."""

    instance: int
    rank: int
    start: float
    ends: list[float]  # when each of the k steps ends
    seconds: list[float]  # each step's compute time (ends[j] = ends[j - 1] + seconds[j])
    computed: np.ndarray  # (B,) num_computed_tokens of its sequences at the start
    head: tuple[str | None, str | None]  # the heads of the swapped and the queue, which do not fit
    event: _Event | None = None  # its StageDone
    _blocks: dict[int, int] = field(default_factory=dict)  # j -> blocks_at(j), as asked
    # A pipeline's (pipeline_ff.py), per step: the slowest stage before the last, and the
    # stages' seconds summed (for the cost fit and the bubble meter); its window and stream,
    # and how many of the stream's window steps committed before ends[0]'s
    slow_other: list[float] | None = None
    stage_sum: list[float] | None = None
    window: Window | None = None
    stream: int = 0
    j0: int = 0

    def trim(self, lo: int, hi: int) -> None:
        """Keep steps lo..hi-1 (the per-step lists)."""
        self.ends, self.seconds = self.ends[lo:hi], self.seconds[lo:hi]
        if self.slow_other is not None and self.stage_sum is not None:
            self.slow_other, self.stage_sum = self.slow_other[lo:hi], self.stage_sum[lo:hi]
        if lo:
            self.computed = self.computed + lo
            self.j0 += lo
            self._blocks = {}

    def blocks_at(self, j: int, page_size: int) -> int:
        """Blocks its sequences hold once j of its steps have begun (as the step-by-step run
        allocates them); remembered, since the dispatcher and the policies ask at every event."""
        got = self._blocks.get(j)
        if got is None:
            got = self._blocks[j] = int((-(-(self.computed + j) // page_size)).sum())
        return got

    def last_seconds(self) -> float:
        """The last step's compute time: what its StageDone reports (the step-by-step run's
        last StageDone, the same float), for the instance's cost fit and bubble meter."""
        return self.seconds[len(self.ends) - 1]


class SimCluster(Cluster):
    def __init__(self, options: EngineOptions, hardware: SimHardware, *, priority_order: bool = False,
                 fast_forward: bool = True) -> None:
        self.clock = VirtualClock()
        self.hw = hardware
        self.fast_forward = fast_forward
        self._ff: dict[int, _FastForward] = {}  # step id -> its flight
        self._ff_planned: _FastForward | None = None  # between planning it and its StageWork
        self.token_times: dict[int, list[float]] = {}  # id() of a fast-forward's output -> when each of its tokens came
        # fast-forwards planned, steps they held, cut short, planned with requests waiting
        self.ff_stats = {"flights": 0, "steps": 0, "cuts": 0, "queued": 0}
        self._queue: list[_Event] = []
        self._order = itertools.count()
        self._busy: dict[int, float] = {}  # device -> when it is free
        self._stage_end: dict[tuple[int, int], float] = {}  # (step, stage) -> when its activations are ready
        self._pairs: dict[int, tuple[int, list[int]]] = {}  # transfer id -> (rank, pages) of the side seen first
        self._changed = True  # a request, an event or a cut since the last _plan_all
        self.horizon = math.inf  # when the next request arrives (the simulation loop says): windows end there
        self._windows: dict[int, Window] = {}  # instance -> its pipeline fast-forward (pipeline_ff.py)
        self._step_info: dict[int, tuple[float, float]] = {}  # a pipeline's step -> (its last stage's end, slowest)
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

    # ------------------------------------------------------------------ fast-forward

    def _plan_all(self, outputs: list[RequestOutput]) -> None:
        if not self._changed and self.elastic is None and self.migrator is None:
            return  # every instance planned what it could at the last pass, and nothing happened since
        self._changed = False
        if self.fast_forward and not self.quiescing and not (self.elastic is not None and self.elastic.groups):
            throttled = None  # asked once, before the first flight is sized (and only if one may be)
            for inst in list(self.instances.values()):
                if inst.num_stages > 1:
                    self._pipeline_flights(inst)
                    continue
                seqs = inst.decode_only(queued=True) if self.states.get(inst.id) == "serving" else None
                if not seqs:
                    continue
                if throttled is None:
                    throttled = self._throttled()
                if throttled:
                    break
                ff = self._steps_ahead(inst, seqs)
                if ff is None:
                    continue
                k = len(ff.ends)
                for s in inst.scheduler.running:
                    inst.kv.allocate(s.seq_id, s.num_computed_tokens + k)
                self._ff_planned = ff
                works = inst.plan(repeat=k)
                assert works is not None and len(inst.flights[works[0].step_id].sched.scheduled) == len(ff.computed)
                self.send(ff.rank, works[0])
        super()._plan_all(outputs)

    def _steps_ahead(self, inst: Instance, seqs: list[Sequence]) -> _FastForward | None:
        """A fast-forward of at least 2 steps for a serving replica `inst` whose next step is one
        decode of each of `seqs` (its `decode_only(queued=True)`), or None."""
        kv = inst.members[0].kv
        if kv.enable_prefix_caching:
            return None
        k = FAST_FORWARD_STEPS
        lo, hi = kv.layers
        last = kv.block_range[[kv.tables[s.seq_id][-1] for s in seqs]]  # (B, 2): new blocks take this range
        if not ((last[:, 0] == lo) & (last[:, 1] == hi)).all():
            return None  # some grow in blocks of an older range, from spare pages: not what blocks() counts
        for s in seqs:
            p = s.params
            if self._token in p.stop_token_ids or (not p.ignore_eos and self._token in self.eos):
                return None
            if p.max_tokens is not None:
                k = min(k, p.max_tokens - len(s.output_token_ids))  # none ends before the last step
            k = min(k, inst.max_model_len - s.num_tokens)
        if k < 2:
            return None
        ps = kv.page_size
        computed = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)  # (B,)
        have = np.array([len(kv.tables[s.seq_id]) for s in seqs], dtype=np.int64)  # (B,)
        free = kv.num_free_blocks

        def blocks(k: int) -> int:
            return int(np.maximum(-(-(computed + k) // ps) - have, 0).sum())

        # The KV all k steps take must be there now; under `migrate`, the instance must not run
        # short of KV within them either (the step-by-step run could start a migration then).
        reserve = RESERVE_FRACTION * kv.num_total_blocks if self.migrator is not None else 0.0
        fits = lambda k: blocks(k) <= free and free - blocks(k) >= reserve  # noqa: E731 - monotone in k
        if not fits(2):
            return None
        lo, hi = 2, k  # the most steps that fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        k = lo
        sched = inst.scheduler
        if sched.waiting or sched.swapped:
            # The first step's KV, as its schedule() takes it (the same blocks, in the same order),
            # then its admission: if the head of the queue does not fit now, it fits at no later
            # step of the flight either (the KV only shrinks).
            for s in seqs:
                kv.allocate(s.seq_id, s.num_computed_tokens + 1)
            if not sched.admits_none(inst.config.max_num_batched_tokens - len(seqs)):
                return None
        rank = inst.members[0].rank
        layers = inst.members[0].layers
        start = max(self.clock.now(), self._busy[rank])
        fast = getattr(self.hw.cost, "decode_steps_seconds", None)  # the same floats, without the batches
        if fast is not None:
            seconds = fast(len(computed), int(computed.sum()), k, layers).tolist()
        else:
            seconds = [self.hw.cost.step_seconds([(1, int(c) + j) for c in computed], layers) for j in range(k)]
        ends, t = [], start
        for sec in seconds:  # summed one by one, as the step-by-step run's clock does
            t += sec
            ends.append(t)
        return _FastForward(inst.id, rank, start, ends, seconds, computed, _head(inst))

    def add_request(self, req: Any) -> list[RequestOutput]:
        out = super().add_request(req)
        self._changed = True
        for step_id, ff in list(self._ff.items()):
            inst = self.instances.get(ff.instance)
            if inst is not None and ff.slow_other is None and _head(inst) != ff.head:
                self._cut(step_id, ff, inst)  # the step-by-step run would try it next
        for iid, win in list(self._windows.items()):
            inst = self.instances.get(iid)
            if inst is not None and _head(inst) != (None, None):
                self._cut_window(win, inst)
        return out

    def _cut(self, step_id: int, ff: _FastForward, inst: Instance) -> None:
        """End the flight with the step in progress now; release the KV of the rest, and commit
        the steps done by now (the policy may act before the step in progress ends, and must
        find the sequences as long as the step-by-step run has them)."""
        now = self.clock.now()
        self._changed = True
        keep = min(bisect.bisect_left(ff.ends, now) + 1, len(ff.ends))  # the steps done by now, and the one in progress
        if keep < len(ff.ends):
            flight = inst.flights[step_id]
            self.ff_stats["cuts"] += 1
            self.ff_stats["steps"] -= len(ff.ends) - keep
            flight.repeat = keep
            for seq, _ in flight.sched.scheduled:
                inst.kv.shrink(seq.seq_id, seq.num_computed_tokens + keep)
            ff.trim(0, keep)
            flight.shape = [(1, s.num_computed_tokens + keep - 1) for s, _ in flight.sched.scheduled]  # its last step's
            if ff.slow_other is None:
                self._busy[ff.rank] = ff.ends[-1]
            assert ff.event is not None
            ff.event.cancelled = True
            ff.event = self._at(ff.ends[-1], ff.rank, msgspec.structs.replace(ff.event.msg, seconds=ff.last_seconds()))
        self._commit_done(step_id, ff, inst, now)

    def _commit_done(self, step_id: int, ff: _FastForward, inst: Instance, now: float) -> None:
        """Commit the flight's steps that ended before `now` (not its last: its StageDone does)."""
        done = bisect.bisect_left(ff.ends, now)
        if not 0 < done < len(ff.ends):
            return
        self._changed = True
        assert ff.event is not None
        outs = inst.commit(msgspec.structs.replace(ff.event.msg, seconds=ff.seconds[done - 1]), steps=done)
        for o in outs:
            self.token_times[id(o)] = ff.ends[:done]  # their tokens came at their own steps' ends
        self.outputs_pending += outs
        if ff.stage_sum is not None:
            inst.bubbles.busy += sum(ff.stage_sum[:done])
        ff.trim(done, len(ff.ends))

    # ------------------------------------------------------------------ a pipeline's fast-forward

    def _pipeline_flights(self, inst: Instance) -> None:
        """Plan the window steps of a stream whose step in flight just committed; or, if the
        instance can plan and all its sequences decode, a new window (pipeline_ff.py)."""
        win = self._windows.get(inst.id)
        if win is not None:
            for u in win.pending():
                if win.streams[u].step_id not in inst.flights:
                    self._fly(inst, win, u)
        if self.elastic is not None or self.migrator is not None or inst.microbatch != "balanced" or \
                self.states.get(inst.id) != "serving" or not inst.can_plan():
            return
        sched = inst.scheduler
        if sched.waiting or sched.swapped or inst._copies or inst._aborting or inst.scratch is not None or \
                inst.maybe_unplaced or inst.members[0].kv.enable_prefix_caching:
            return
        pos = {s.seq_id: i for i, s in enumerate(sched.running)}
        streams = []
        for step_id, flight in inst.flights.items():
            ff = self._ff.get(step_id)
            if (ff is not None and len(ff.ends) > 1) or any(n != 1 or s.seq_id not in pos for s, n in flight.sched.scheduled):
                return
            if ff is not None:
                assert ff.slow_other is not None
                end, slowest = ff.ends[-1], max(ff.slow_other[-1], ff.seconds[-1])
            else:
                end, slowest, _ = self._step_info[step_id]
            ids = [s.seq_id for s, _ in flight.sched.scheduled]
            m, c = len(ids), sum(x for _, x in flight.shape)  # its (last) step's contexts
            streams.append(Stream(ids, [pos[i] for i in ids], end, (m, c + m, m, 1), slowest, step_id))
        left = []
        for s in sched.running:
            p = s.params
            if s.paused or s.num_uncomputed != 1 or s.pending_children or self._token in p.stop_token_ids or \
                    (not p.ignore_eos and self._token in self.eos):
                return
            steps = inst.max_model_len - s.num_tokens
            left.append(steps if p.max_tokens is None else min(steps, p.max_tokens - len(s.output_token_ids)))
        cfg = self.config
        new = plan_window(inst, self.clock.now(), streams, left, self._busy, self.hw.cost, self.hw.link_seconds,
                          cfg.model.hidden_size * cfg.device.torch_dtype.itemsize, FAST_FORWARD_STEPS, self.horizon)
        if new is None:
            return
        if win is not None:
            assert not win.pending()
            for step_id in win.flights.values():
                if step_id in self._ff:
                    self._ff[step_id].window = None
        self._windows[inst.id] = new
        self._busy.update(new.busy)
        self._fly(inst, new, 0)

    def _fly(self, inst: Instance, win: Window, u: int) -> None:
        """Plan stream u's window steps as one flight, now."""
        stream = win.streams[u]
        steps = stream.steps[:win.final[u] + 1]
        k = len(steps)
        assert self.clock.now() == steps[0].time, (self.clock.now(), steps[0].time)
        seqs = [inst.scheduler.running[i] for i in stream.positions]
        for s in seqs:
            inst.kv.allocate(s.seq_id, s.num_computed_tokens + k)
        computed = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)  # (B,)
        ff = _FastForward(inst.id, inst.members[-1].rank, steps[0].time, [st.ends[-1] for st in steps],
                          [st.seconds[-1] for st in steps], computed, _head(inst),
                          slow_other=[max(st.seconds[:-1]) for st in steps], stage_sum=[sum(st.seconds) for st in steps],
                          window=win, stream=u)
        self._ff_planned = ff
        works = inst.plan(repeat=k)
        assert works is not None and [s.seq_id for s, _ in inst.flights[works[0].step_id].sched.scheduled] == \
            stream.seq_ids, "the scheduler planned another microbatch than the window's"
        win.flights[u] = works[0].step_id
        win.live += 1
        for work in works:
            self.send(inst.members[work.stage].rank, work)

    def _flush(self, win: Window, inst: Instance, now: float) -> None:
        """Replay the cost fit's observations of commits before `now`, but for each flight's
        last step (its own commit observes it) and steps a cut left out."""
        obs = win.observations
        while win.applied < len(obs) and obs[win.applied].time < now:
            o = obs[win.applied]
            if 0 <= o.j < win.final[o.stream]:
                inst.step_cost.observe_features(o.features, o.slowest, fitted=o.fitted)
            win.applied += 1

    def _cut_window(self, win: Window, inst: Instance) -> None:
        """An arrival: every stream ends with its step in progress (its steps done by now
        committed), a stream not yet planned plans as the step-by-step run does."""
        now = self.clock.now()
        dropped = False  # window steps planned from now on: none runs
        for u in range(len(win.streams)):
            step_id = win.flights.get(u)
            ff = self._ff.get(step_id) if step_id is not None else None
            if step_id is None:
                dropped |= win.final[u] >= 0
                win.final[u] = -1
            if ff is None:
                continue
            self._cut(step_id, ff, inst)  # type: ignore[arg-type]
            final = ff.j0 + len(ff.ends) - 1
            dropped |= final < win.final[u]
            win.final[u] = final
            ff.window = None
        if dropped:  # (then the window's last plan is still to come: no plan since was the step-by-step one's)
            for s, m in enumerate(inst.members):  # the devices' last stages that still run
                self._busy[m.rank] = max(st.ends[s] for u, stream in enumerate(win.streams)
                                         for st in stream.steps[:win.final[u] + 1])
        self._flush(win, inst, now)
        del self._windows[inst.id]

    def loads(self) -> list[InstanceLoad]:
        """As the coordinator's, with a fast-forward's KV counted as the step-by-step run
        holds it now (allocated a step at a time, at each step's start)."""
        out = super().loads()
        if not self._ff:
            return out
        now = self.clock.now()
        ps = self.config.cache.page_size
        ahead: dict[int, int] = {}
        for ff in self._ff.values():
            planned = 1 + bisect.bisect_right(ff.ends, now, 0, len(ff.ends) - 1)  # steps begun by now
            k = len(ff.ends)
            ahead[ff.instance] = ahead.get(ff.instance, 0) + ff.blocks_at(k, ps) - ff.blocks_at(planned, ps)
        return [replace(x, used_blocks=x.used_blocks - ahead[x.id]) if ahead.get(x.id) else x for x in out]

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
        self._at(end, rank, StageDone(work.step_id, work.instance, rank, seconds, tokens))

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
        while self._queue and self._queue[0].time <= now:
            ev = heapq.heappop(self._queue)
            if ev.cancelled:
                continue
            msg = ev.msg
            self._changed = True
            ff = self._ff.pop(msg.step_id, None) if isinstance(msg, StageDone) else None
            if isinstance(msg, StageDone) and self._step_info.get(msg.step_id, (0, 0, -1))[2] == ev.rank:
                del self._step_info[msg.step_id]  # a pipeline's step commits
            inst = self.instances.get(msg.instance) if isinstance(msg, StageDone) else None
            win = self._windows.get(inst.id) if inst is not None and inst.commits(msg) else None
            if win is not None:  # another stream's steps done by now commit first, and the fit sees them
                for step_id in win.flights.values():
                    if step_id != msg.step_id and step_id in self._ff:
                        self._commit_done(step_id, self._ff[step_id], inst, now)  # type: ignore[arg-type]
                self._flush(win, inst, now)  # type: ignore[arg-type]
            if ff is not None and ff.slow_other is not None and ff.stage_sum is not None and inst is not None:
                inst.flights[msg.step_id].slowest = ff.slow_other[-1]  # its commit observes its last step
                inst.bubbles.busy += sum(ff.stage_sum) - ff.seconds[-1]  # (the StageDone's seconds count there)
                if ff.window is not None:
                    ff.window.live -= 1
                    if not ff.window.live and not ff.window.pending() and self._windows.get(inst.id) is ff.window:
                        del self._windows[inst.id]  # its last flight: every observation is in
            n = len(outputs)
            self._handle(self.workers[ev.rank], msg, outputs)
            if ff is not None:  # (its flight may be a merged group's now, which commits it the same)
                for o in outputs[n:]:
                    self.token_times[id(o)] = ff.ends

    def _watch(self, outputs: list[RequestOutput]) -> None:
        """Simulated workers never die. Runs between the commits and `elastic.tick()`."""
        self._cut_if_throttled()

    def step(self, timeout_s: float = 0.0, wake_fd: int | None = None) -> list[RequestOutput]:
        out = super().step(timeout_s, wake_fd)
        self._cut_if_throttled()  # the trigger looks again at the next event, whoever's it is
        out += self.outputs_pending  # of the steps a cut committed
        self.outputs_pending = []
        return out

    def _throttled(self) -> bool:
        """Whether the overload policy could act at the next event: the parameter-centric
        trigger merge replicas, or live migration start or go on."""
        if self.elastic is not None:
            trigger = self.elastic.trigger
            if any(len(i.members) == 1 and throttled(self.elastic._load(i), trigger)
                   for i in self.instances.values()):
                return True
        if self.migrator is not None:
            return bool(self.migrator.active) or any(short_of_kv(x) for x in self.loads())
        return False

    def _cut_if_throttled(self) -> None:
        """The policy may act at the next event of any instance (the step-by-step run has one
        at each step end of each replica), so while it may, every fast-forward ends with its
        step in progress, where the step-by-step run's replicas stand."""
        if self._ff and self._throttled():
            for step_id, ff in list(self._ff.items()):
                inst = self.instances.get(ff.instance)
                if inst is not None:
                    self._cut(step_id, ff, inst)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        pass


def _head(inst: Instance) -> tuple[str | None, str | None]:
    sched = inst.scheduler
    return (sched.swapped[0].seq_id if sched.swapped else None, sched.waiting[0].seq_id if sched.waiting else None)
