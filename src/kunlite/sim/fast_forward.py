"""Fast-forward: decode steps taken many at a time, the same run as one at a time.

A replica whose next step is exactly one decode of each running sequence
(`Instance.decode_only`) takes up to FAST_FORWARD_STEPS such steps as one flight
(`Instance.plan(repeat=k)`): their KV is allocated up front, their time is the sum of the k
steps' costs, and the tokens commit together, with each step's end kept for the ITLs. It is
the same run, step for step: k stops before any sequence would end and before the KV runs
out; requests may wait (or be swapped out) if the head of their queue does not fit now, as it
then fits at no later step of the flight; an arrival that changes that head cuts the flight at
the end of the step in progress (its unused KV released, the steps done by then committed),
where the step-by-step run would try it; `loads()` shows the dispatcher each flight's KV as
allocated step by step; and every flight is cut the same way as soon as the overload policy
may act (a replica throttled under `kunserve`, an instance short of KV or a migration going on
under `migrate`), and none starts meanwhile, nor while a merged group exists (its calm watch
samples the load at every event).

A static pipeline's microbatch streams fast-forward in windows (`pipeline_ff.py`), where no
overload policy watches (recompute or swap preemption: the `pp2` baseline): each stream's steps
of a window are one flight, planned when its step in flight commits; before any commit of the
instance, the other streams' steps done by then commit and the cost fit sees the window's
commits before it, so that a plan the window did not foresee finds the instance as the
step-by-step run has it. A window plans nothing from the next arrival on until the request
has gone to another instance (`_extend_windows`: then it plans on to the arrival after, and
its flights in flight grow by their new steps); an arrival to the instance cuts every stream
at its step in progress.

`FastForward` is `SimCluster`'s half that does it: it plans flights (`_plan_all`), cuts them,
and shows the dispatcher their KV as the step-by-step run holds it (`loads`).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from kunlite.engine.cluster.dispatch import InstanceLoad
from kunlite.engine.cluster.migrate import RESERVE_FRACTION, short_of_kv
from kunlite.engine.instance import Instance
from kunlite.engine.messages import RequestOutput
from kunlite.engine.plan import throttled
from kunlite.engine.sequence import Sequence
from kunlite.engine.step_cost import StepCostWeights
from kunlite.engine.work import StageDone
from kunlite.sim.pipeline_ff import Stream, Window, plan_window

if TYPE_CHECKING:
    from kunlite.sim.cluster import _Event

FAST_FORWARD_STEPS = 256  # the most decode steps one flight stands for


@dataclass
class Flight:
    """k decode steps of a replica, or of a pipeline's stream, as one step in flight."""

    instance: int
    rank: int  # the device whose StageDone commits it
    start: float
    ends: list[float]  # when each of the k steps ends
    # each step's compute time (a pipeline's: its last stage's; a replica's ends[j] = ends[j - 1] + seconds[j])
    seconds: list[float]
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


class FastForward:
    """The fast-forward half of `SimCluster` (a mixin: it plans through the coordinator's
    `_plan_all`, and reads the cluster's instances, clock, cost model and event queue)."""

    # What it reads of the cluster (SimCluster, engine/cluster/coordinator.py):
    instances: dict[int, Instance]
    states: dict[int, str]
    clock: Any  # VirtualClock
    hw: Any  # SimHardware
    config: Any  # EngineConfig
    elastic: Any  # the parameter-centric policy, or None
    migrator: Any  # live migration, or None
    quiescing: bool
    eos: frozenset[int]
    _token: int  # what a simulated sample is
    _busy: dict[int, float]  # device -> when it is free
    outputs_pending: list[RequestOutput]

    def _init_fast_forward(self, enabled: bool) -> None:
        self.fast_forward = enabled
        self._ff: dict[int, Flight] = {}  # step id -> its flight
        self._ff_planned: Flight | None = None  # between planning it and its StageWork
        self.token_times: dict[int, list[float]] = {}  # id() of a flight's output -> when each of its tokens came
        # flights planned, steps they held, cut short, planned with requests waiting
        self.ff_stats = {"flights": 0, "steps": 0, "cuts": 0, "queued": 0}
        self._windows: dict[int, Window] = {}  # instance -> its pipeline window (pipeline_ff.py)
        # a pipeline's step in flight -> (when it ends, its slowest stage so far, the rank it ends on)
        self._step_info: dict[int, tuple[float, float, int]] = {}
        self._changed = True  # a request, an event or a cut since the last _plan_all
        self.horizon = math.inf  # when the next request arrives (the simulation loop says): windows pause there

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

    def _steps_ahead(self, inst: Instance, seqs: list[Sequence]) -> Flight | None:
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
        return Flight(inst.id, rank, start, ends, seconds, computed, _head(inst))

    def add_request(self, req: Any) -> list[RequestOutput]:
        out = super().add_request(req)
        self._changed = True
        for step_id, ff in list(self._ff.items()):
            if ff.slow_other is not None:
                continue  # a pipeline's stream: its window is cut below
            inst = self.instances.get(ff.instance)
            if inst is not None and _head(inst) != ff.head:
                self._cut(step_id, ff, inst)  # the step-by-step run would try it next
        for iid, win in list(self._windows.items()):
            inst = self.instances.get(iid)
            if inst is not None and _head(inst) != (None, None):
                self._cut_window(win, inst)
        return out

    def _cut(self, step_id: int, ff: Flight, inst: Instance) -> None:
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

    def _commit_done(self, step_id: int, ff: Flight, inst: Instance, now: float) -> None:
        """Commit the flight's steps that ended before `now` (not its last: its StageDone does)."""
        done = bisect.bisect_left(ff.ends, now)
        if not 0 < done < len(ff.ends):
            return
        self._changed = True
        assert ff.event is not None
        outs = inst.commit(msgspec.structs.replace(ff.event.msg, seconds=ff.seconds[done - 1]), steps=done)
        ends = ff.ends[:done]  # their tokens came at their own steps' ends (a list nobody changes)
        for o in outs:
            self.token_times[id(o)] = ends
        self.outputs_pending += outs
        if ff.stage_sum is not None:
            inst.bubbles.busy += sum(ff.stage_sum[:done])
        ff.trim(done, len(ff.ends))

    # ------------------------------------------------------------------ a pipeline's fast-forward

    def _pipeline_flights(self, inst: Instance) -> None:
        """Plan the window steps of a stream whose step it follows just committed; or, if the
        instance can plan and all its sequences decode, a new window (pipeline_ff.py)."""
        win = self._windows.get(inst.id)
        if win is not None:
            for u in win.pending():
                after = win.after(u)
                if after is not None and after not in inst.flights:
                    self._fly(inst, win, u)
        if self.elastic is not None or self.migrator is not None or inst.microbatch != "balanced" or \
                self.states.get(inst.id) != "serving" or not inst.can_plan():
            return
        running = inst.decode_only(pipeline=True)
        if running is None or inst.members[0].kv.enable_prefix_caching:
            return
        pos = {s.seq_id: i for i, s in enumerate(running)}
        streams = []
        for step_id, flight in inst.flights.items():
            ff = self._ff.get(step_id)
            if (ff is not None and len(ff.ends) > 1) or \
                    any(n != 1 or s.seq_id not in pos for s, n in flight.sched.scheduled):
                return  # a prompt in flight, or a flight with steps to go
            if ff is not None:
                assert ff.slow_other is not None
                end, slowest = ff.ends[-1], max(ff.slow_other[-1], ff.seconds[-1])
            else:
                end, slowest, _ = self._step_info[step_id]
            ids = [s.seq_id for s, _ in flight.sched.scheduled]
            m, c = len(ids), sum(x for _, x in flight.shape)  # its (last) step's contexts
            streams.append(Stream(ids, [pos[i] for i in ids], end, (m, c + m, m, 1), slowest, step_id))
        left = []
        for s in running:
            p = s.params
            if self._token in p.stop_token_ids or (not p.ignore_eos and self._token in self.eos):
                return
            steps = inst.max_model_len - s.num_tokens
            left.append(steps if p.max_tokens is None else min(steps, p.max_tokens - len(s.output_token_ids)))
        cfg = self.config
        new = plan_window(inst, self.clock.now(), streams, left, self._busy, self.hw.cost, self.hw.link_seconds,
                          cfg.model.hidden_size * cfg.device.torch_dtype.itemsize, FAST_FORWARD_STEPS, self.horizon,
                          may_grow=len(self.instances) > 1)
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

    def _extend_windows(self) -> None:
        """Windows paused at an arrival that went to another instance plan on to the next one
        (before any event from that arrival on is delivered: the first of them may be the
        commit a window paused at)."""
        for iid, win in self._windows.items():
            if win.resume is None or win.horizon >= self.horizon:
                continue
            inst = self.instances[iid]
            assert _head(inst) == (None, None), "a request came to the instance: its window was cut"
            old = win.final
            win.extend(self.horizon)
            win.final = [len(u.steps) - 1 for u in win.streams]
            for u, step_id in win.flights.items():
                if win.final[u] > old[u] and step_id in self._ff:
                    self._grow(inst, win, u, step_id, old[u])
            self._busy.update(win.busy)

    def _grow(self, inst: Instance, win: Window, u: int, step_id: int, old: int) -> None:
        """Stream u's flight in flight, step_id (its window steps up to `old`), takes its steps
        after `old` too: their KV, their ends, its StageDone at the new last one."""
        steps = win.streams[u].steps[old + 1:win.final[u] + 1]
        k = len(steps)
        ff, flight = self._ff[step_id], inst.flights[step_id]
        assert flight.repeat == len(ff.ends)
        for s, _ in flight.sched.scheduled:
            inst.kv.allocate(s.seq_id, s.num_computed_tokens + flight.repeat + k)
        flight.repeat += k
        flight.shape = [(n, c + k) for n, c in flight.shape]  # its last step's
        ff.ends += [st.ends[-1] for st in steps]
        ff.seconds += [st.seconds[-1] for st in steps]
        assert ff.slow_other is not None and ff.stage_sum is not None and ff.event is not None
        ff.slow_other += [max(st.seconds[:-1]) for st in steps]
        ff.stage_sum += [sum(st.seconds) for st in steps]
        ff.event.cancelled = True
        ff.event = self._at(ff.ends[-1], ff.rank, msgspec.structs.replace(ff.event.msg, seconds=ff.last_seconds()))
        self.ff_stats["steps"] += k

    def _fly(self, inst: Instance, win: Window, u: int) -> None:
        """Plan stream u's window steps as one flight, now."""
        stream = win.streams[u]
        steps = stream.steps[:win.final[u] + 1]
        k = len(steps)
        assert self.clock.now() == steps[0].time, (self.clock.now(), steps[0].time)
        running = {s.seq_id: s for s in inst.scheduler.running}  # (sequences ended since the window began)
        seqs = [running[i] for i in stream.seq_ids]
        for s in seqs:
            inst.kv.allocate(s.seq_id, s.num_computed_tokens + k)
        computed = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)  # (B,)
        ff = Flight(inst.id, inst.members[-1].rank, steps[0].time, [st.ends[-1] for st in steps],
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
            if step_id is None:  # not planned yet: none of its steps runs
                dropped |= win.final[u] >= 0
                win.final[u] = -1
                continue
            ff = self._ff.get(step_id)
            if ff is None:
                continue  # it committed to its end already
            self._cut(step_id, ff, inst)
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

    def _delivering(self, msg: Any, rank: int, now: float) -> Flight | None:
        """An event is about to be handled: its flight, if it ends one; for a pipeline in a
        window, the other streams' steps done by now commit first, and the fit sees them."""
        if not isinstance(msg, StageDone):
            self._changed = True
            return None
        ff = self._ff.pop(msg.step_id, None)
        if self._step_info.get(msg.step_id, (0.0, 0.0, -1))[2] == rank:
            del self._step_info[msg.step_id]  # a pipeline's step commits
        inst = self.instances.get(msg.instance)
        if inst is None or msg.step_id not in inst.flights or inst.commits(msg):
            self._changed = True  # (a stage before the last only times its step: nothing new to plan)
        if inst is None:
            return ff
        win = self._windows.get(inst.id) if inst.commits(msg) else None
        if win is not None:
            for step_id in win.flights.values():
                if step_id != msg.step_id and step_id in self._ff:
                    self._commit_done(step_id, self._ff[step_id], inst, now)
            self._flush(win, inst, now)
        if ff is not None and ff.slow_other is not None and ff.stage_sum is not None:
            flight = inst.flights[msg.step_id]
            flight.slowest = ff.slow_other[-1]  # its commit observes its last step
            inst.bubbles.busy += sum(ff.stage_sum) - ff.seconds[-1]  # (the StageDone's seconds count there)
            if ff.window is not None:
                flight.fitted = _fitted_at(ff.window, ff.stream, now)  # its window fitted the cost on it already
                ff.window.live -= 1
                if not ff.window.live and not ff.window.pending() and self._windows.get(inst.id) is ff.window:
                    del self._windows[inst.id]  # its last flight: every observation is in
        return ff

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


def _fitted_at(win: Window, u: int, now: float) -> StepCostWeights | None:
    """The fit's weights after the observation of stream u's last window step, which commits
    now (the first observation not replayed yet, or one of the few at the same time)."""
    obs, last = win.observations, win.final[u]
    for k in range(win.applied, len(obs)):
        o = obs[k]
        if o.time > now:
            break
        if o.stream == u and o.j == last:
            return o.fitted
    return None


def _head(inst: Instance) -> tuple[str | None, str | None]:
    sched = inst.scheduler
    return (sched.swapped[0].seq_id if sched.swapped else None, sched.waiting[0].seq_id if sched.waiting else None)
