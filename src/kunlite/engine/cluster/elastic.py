"""KunServe's parameter-centric memory management, carried out by the coordinator.

The life of a group (each transition decided by the pure trigger and planner of `engine/plan.py`):

    replicas --throttled: plan--> merge: every member keeps its share of the layers and drops the
      rest (DropLayers; the pages become KV in place, no copy); one pipeline instance takes over
      the parts' queues and their steps in flight, and serves at once: new requests get blocks
      over each member's new layers only, and the dispatcher sees the new capacity
    --> exchanging: the requests that were running hold KV for every layer on their old device.
      Under `stall` they pause until their KV for the layers another member now runs has moved
      there (chunks of `chunk` requests, one chunk in flight, interleaved with pipeline steps;
      the sender's pages are freed once the receiver has them); under `recompute` their KV is
      freed at the merge and they are prefilled again in the pipeline
    --> pipeline (every request placed) --calm--> restoring: the group stops stepping, every
      member takes the pages of its dropped groups back (KV living there moves within the
      device), pulls those weights from the member that holds them (P2P), each request's KV
      moves to one member (its home), and the group splits back into the replicas it was made
      of, each with the requests whose home it is
A member's death ends the group's requests with an error; once the worker is back, the
survivors reload what they dropped from the checkpoint and the replicas serve again.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kunlite.engine.cluster.messages import (CopyPages, DropLayers, RecvPages, RestoreLayers, RunLayers, SendPages,
                                             SendParams, TransferDone, TransferFailed)
from kunlite.engine.block_manager import BlockManager, BlockManagerError
from kunlite.engine.instance import Instance, Member
from kunlite.engine.messages import ClusterEvent
from kunlite.engine.model import needed_groups
from kunlite.engine.plan import CalmWatch, Group, KVLoad, Merge, ModelBytes, TriggerConfig, plan_merge, throttled
from kunlite.engine.sequence import Sequence

if TYPE_CHECKING:
    from kunlite.engine.cluster.coordinator import Cluster

log = logging.getLogger("kunlite.cluster")

EXCHANGE_MODES = ("stall", "remote-attention", "recompute")


@dataclass
class GroupRecord:
    """A merged group: what it was made of, and the transitions in progress."""

    merge: Merge
    merged_at: float
    watch: CalmWatch
    pending: set[int] = field(default_factory=set)  # transfer ids of the exchange chunk in flight
    chunk: list[Sequence] = field(default_factory=list)  # the requests of that chunk
    exchanged_bytes: int = 0
    chunk_bytes: int = 0  # of the chunk in flight: its copies all start when it is sent
    chunk_seconds: float = 0.0  # the longest of its copies so far: the chunk's span on the wire
    restore_began: float = 0.0
    restore_requested: bool = False  # split as soon as the chunk in flight lands
    decided: float = 0.0  # perf_counter when the merge was decided
    first_step_seen: bool = False
    state_before: str = "pipeline"  # to go back to when a restore must wait
    survivors: set[int] = field(default_factory=set)  # members alive when the group failed
    unplaced: list[Sequence] = field(default_factory=list)  # see Elastic._unplaced
    stale: bool = False  # unplaced must be checked again (a chunk landed, requests were requeued)
    preemptions_seen: int = 0
    candidates_seen: int = 0  # len(group.maybe_unplaced) at the last check (a fork adds children)


class Elastic:
    def __init__(self, cluster: "Cluster", mode: str, trigger: TriggerConfig, chunk: int = 8) -> None:
        if mode not in EXCHANGE_MODES:
            raise ValueError(f"--exchange must be one of {', '.join(EXCHANGE_MODES)}")
        self.c = cluster
        self.clock = cluster.clock
        self.mode = mode
        self.trigger = trigger
        self.chunk = chunk
        self.groups: dict[int, GroupRecord] = {}
        cfg = cluster.config.model
        self.model_bytes = self._model_bytes()
        self.num_layers = cfg.num_layers
        self.counters = {"drops": 0, "restores": 0, "exchanged_bytes": 0, "remote_attention_calls": 0}
        # drop_s: the decision to the merged group serving (accounting moved, devices told);
        # drop_to_first_step_*: to its first step planned (sent) and committed (done).
        self.timings: dict[str, list[float]] = {"drop_s": [], "drop_to_first_step_planned_s": [],
                                                "drop_to_first_step_done_s": [], "restore_s": [], "exchange_s": []}
        self._transfers: dict[int, tuple[int, int]] = {}  # transfer id -> (group id, receiving rank)
        self.transfer_log: list[tuple[int, float]] = []  # (bytes, seconds on the wire) per exchange copy
        self.chunk_log: list[tuple[int, float]] = []  # (bytes, seconds from its start to its last copy) per chunk
        self.seconds: dict[str, float] = {}  # instance-seconds per state
        self._last_tick = self.clock.now()

    def _model_bytes(self) -> ModelBytes:
        ready = next(w.ready for w in self.c.workers.values() if w.ready)
        pb = ready.page_bytes
        size = {g: n * pb for g, (_, n) in ready.groups.items()}
        return ModelBytes(tuple(size[f"layer.{i}"] for i in range(self.c.config.model.num_layers)),
                          size.get("embed", 0), size.get("head", 0), self.c.config.model.tie_word_embeddings)

    # ------------------------------------------------------------------ the loop's hook

    def state_seconds(self) -> dict[str, float]:
        return dict(self.seconds)

    def tick(self) -> None:
        now = self.clock.now()
        for state in self.c.states.values():
            self.seconds[state] = self.seconds.get(state, 0.0) + now - self._last_tick
        self._last_tick = now
        for gid, rec in list(self.groups.items()):
            inst = self.c.instances.get(gid)
            state = self.c.states.get(gid)
            if inst is None:
                continue
            if state == "restoring":  # no new step and no new chunk until it splits (or goes back)
                if not rec.pending:
                    self._restore(gid, rec, inst)
                continue
            if state not in ("pipeline", "exchanging"):
                continue
            if not rec.first_step_seen and inst.first_committed is not None:
                rec.first_step_seen = True
                self.timings["drop_to_first_step_planned_s"].append(inst.first_planned - rec.decided)
                self.timings["drop_to_first_step_done_s"].append(inst.first_committed - rec.decided)
            if rec.restore_requested and not rec.pending:
                if self._restore(gid, rec, inst) or self.c.states.get(gid) == "restoring":
                    continue  # split, or waiting for its steps in flight
                # no room yet: the exchange goes on meanwhile
            if self.mode == "recompute":
                self._requeue_unplaced(inst, rec)
            elif not rec.pending:
                self._next_chunk(gid, rec, inst)
            if state == "exchanging" and not rec.pending and not self._unplaced(rec, inst):
                self.c.states[gid] = "pipeline"
                self.timings["exchange_s"].append(now - rec.merged_at)
            calm = rec.watch.observe(now, self._load(inst), self._undropped(rec))
            if calm and not rec.pending:
                self._restore(gid, rec, inst)  # it may come before every request was exchanged
        self._maybe_merge()

    def _load(self, inst: Instance) -> KVLoad:
        ps = self.c.config.cache.page_size
        need = sum(s.num_tokens for s in inst.scheduler.waiting)
        return KVLoad(inst.kv.num_used_blocks * ps, inst.kv.num_total_blocks * ps, need, len(inst.scheduler.waiting))

    def _undropped(self, rec: GroupRecord) -> int:
        """KV tokens the group's parts had as replicas (their capacity after a split)."""
        return sum(self.c.replica_kv_tokens[g.ranks[0]] for g in rec.merge.parts)

    # ------------------------------------------------------------------ drop

    def _maybe_merge(self) -> None:
        busy = any(s not in ("serving", "pipeline") for s in self.c.states.values())
        replicas = [i for i in self.c.instances.values() if i.id not in self.groups and len(i.members) == 1]
        if busy or len(replicas) < 2:
            return
        loads = {i.id: self._load(i) for i in replicas}
        if not any(throttled(load, self.trigger) for load in loads.values()):
            return
        deficit_tokens = sum(max(x.waiting_need - x.free, 0) for x in loads.values())
        bytes_per_token = self.model_bytes.replica_bytes() and self._kv_bytes_per_token()
        plan = plan_merge([Group(i.id, (i.members[0].rank,)) for i in replicas], deficit_tokens * bytes_per_token,
                          self.model_bytes)
        for merge in plan.merges:
            self._merge(merge)

    def drop_now(self) -> None:
        """Merge the replicas at once, throttled or not (tests; an operator's command)."""
        replicas = [i for i in self.c.instances.values() if i.id not in self.groups and len(i.members) == 1]
        plan = plan_merge([Group(i.id, (i.members[0].rank,)) for i in replicas], 1, self.model_bytes)
        for merge in plan.merges:
            self._merge(merge)

    def _kv_bytes_per_token(self) -> int:
        ready = next(w.ready for w in self.c.workers.values() if w.ready)
        return ready.page_bytes * self.num_layers // self.c.config.cache.page_size

    def _merge(self, merge: Merge) -> None:
        started = self.clock.now()
        c = self.c
        parts = [c.instances[g.id] for g in merge.parts]
        members = []
        for rank, layers in zip(merge.ranks, merge.layers):
            ready = c.workers[rank].ready
            assert ready is not None  # invariant: only loaded replicas merge
            keep = set(needed_groups(c.config.model, layers))
            drop = [g for g in ready.groups if g not in keep]
            c.send(rank, DropLayers(layers, drop))
            kv = c.kv_of[rank]
            kv.add_pages([p for g in drop for p in range(ready.groups[g][0], ready.groups[g][0] + ready.groups[g][1])])
            kv.set_layers(layers)
            members.append(Member(rank, layers, kv))
        gid = min(g.id for g in merge.parts)
        group = c.make_instance(gid, members)
        if self.mode == "remote-attention":
            group.scratch = {m.rank: c.scratch_of[m.rank] for m in members}
        group.absorb(parts)
        for p in parts:
            c.retire(p)
            if p.id != gid:
                c.moved += [(s.request_id, gid) for s in _seqs(p)]
                del c.instances[p.id]
                del c.states[p.id]
        c.instances[gid] = group
        old = group.unplaced(_seqs(group))
        c.states[gid] = "exchanging" if old else "pipeline"
        if self.mode != "remote-attention":
            for seq in old:
                seq.paused = True  # never scheduled unplaced: recomputed, or paused until its KV has moved
        group.maybe_unplaced = {s.seq_id for s in old}
        rec = self.groups[gid] = GroupRecord(merge, self.clock.now(), CalmWatch(self.trigger), unplaced=old,
                                             preemptions_seen=group.scheduler.num_preemptions,
                                             candidates_seen=len(old))
        rec.decided = started
        if self.mode == "recompute":
            self._requeue_unplaced(group, rec)
        self.counters["drops"] += 1
        took = self.clock.now() - started
        self.timings["drop_s"].append(took)
        c.events.append(ClusterEvent(self.clock.wall(), "drop", gid, f"devices {list(merge.ranks)} as a pipeline "
                                     f"{list(merge.layers)}; {len(old)} requests to exchange"))
        log.info("drop: instances %s merged into a %d-stage pipeline %s in %.1f ms (%d requests to exchange)",
                 [g.id for g in merge.parts], len(members), list(merge.layers), took * 1e3, len(old))

    # ------------------------------------------------------------------ exchange

    def _unplaced(self, rec: GroupRecord, inst: Instance) -> list[Sequence]:
        """The group's requests whose KV is still on their old device only. Only requests of
        the merge (and the children they fork, which share their blocks) can be: one admitted
        since gets blocks on every member, and one placed stays placed. So the candidates
        (`Instance.maybe_unplaced`, which the group's steps also use) only shrink: they are
        checked again (a covers_many per member) when a chunk landed, requests were requeued,
        preempted or forked, and otherwise lose their finished requests (a tick of a group of
        thousands must not scan them all)."""
        n = inst.scheduler.num_preemptions
        if rec.stale or n != rec.preemptions_seen or len(inst.maybe_unplaced) != rec.candidates_seen:
            rec.unplaced = inst.unplaced([s for s in _seqs(inst) if s.seq_id in inst.maybe_unplaced])
            inst.maybe_unplaced = {s.seq_id for s in rec.unplaced}
            rec.stale, rec.preemptions_seen, rec.candidates_seen = False, n, len(inst.maybe_unplaced)
        else:
            rec.unplaced = [s for s in rec.unplaced if not s.is_finished]
        return rec.unplaced

    def _movable(self, rec: GroupRecord, inst: Instance) -> list[Sequence]:
        """Unplaced running requests not in a step or a chunk, in the scheduler's order."""
        todo = {id(s) for s in self._unplaced(rec, inst)}
        return [s for s in inst.scheduler.running if id(s) in todo and not s.in_flight]

    def _requeue_unplaced(self, inst: Instance, rec: GroupRecord) -> None:
        """`recompute`: a request whose KV is on its old device only is prefilled again in the
        pipeline (one whose step is in flight once that step commits)."""
        for seq in self._movable(rec, inst):
            seq.paused = False
            inst.scheduler.requeue(seq)
            rec.stale = True

    def restore_now(self, gid: int) -> None:
        """Split a merged group calm or not (tests; an operator's command): no new exchange
        chunk starts, and the split comes once the chunk in flight has landed."""
        self.groups[gid].restore_requested = True

    def _next_chunk(self, gid: int, rec: GroupRecord, inst: Instance) -> None:
        """Move the KV of the next few unplaced requests to the members that run its layers.
        While its chunk is in flight a request counts as in flight: it is not scheduled, and an
        abort of it takes effect when the chunk lands (a receive may still write its pages)."""
        if self.mode == "recompute":
            return
        todo = self._movable(rec, inst)[: self.chunk]
        if not todo:
            return
        ps = self.c.config.cache.page_size
        for seq in todo:
            seq.paused = seq.in_flight = True
            home = next(m for m in inst.members if seq.seq_id in m.kv.tables)
            blocks = home.kv.tables[seq.seq_id]
            for m in inst.members:
                if m.rank == home.rank:
                    continue
                if seq.seq_id in m.kv.tables or not m.kv.can_allocate(seq.seq_id, len(blocks) * ps):
                    seq.in_flight = False
                    return  # no room on the receiver yet: try again after a step frees some
                m.kv.allocate(seq.seq_id, len(blocks) * ps)
                lo, hi = m.layers
                src = [int(home.kv.block_pages[b, layer]) for b in blocks for layer in range(lo, hi)]
                dst = [int(m.kv.block_pages[b, layer]) for b in m.kv.tables[seq.seq_id] for layer in range(lo, hi)]
                tid = self.c.new_transfer_id()
                rec.pending.add(tid)
                self._transfers[tid] = (gid, m.rank)
                self.c.send(home.rank, SendPages(tid, m.rank, src))
                self.c.send(m.rank, RecvPages(tid, home.rank, dst))
            rec.chunk.append(seq)

    def on_transfer(self, msg: TransferDone | TransferFailed) -> bool:
        """A chunk's copy reported; True if it was the exchange's."""
        entry = self._transfers.get(msg.transfer_id)
        if entry is None:
            return False
        gid, receiver = entry
        if msg.rank != receiver:
            return True  # the sender's report; the receiver's says when the pages are there
        del self._transfers[msg.transfer_id]
        rec = self.groups.get(gid)
        if rec is None:
            return True
        rec.pending.discard(msg.transfer_id)
        if isinstance(msg, TransferFailed):
            log.error("exchange of group %d failed: %s", gid, msg.message)
            return True  # the worker's death follows; the group's requests fail with it
        rec.exchanged_bytes += msg.num_bytes
        self.counters["exchanged_bytes"] += msg.num_bytes
        self.transfer_log.append((msg.num_bytes, msg.seconds))
        rec.chunk_bytes += msg.num_bytes
        rec.chunk_seconds = max(rec.chunk_seconds, msg.seconds)
        if not rec.pending:
            self.chunk_log.append((rec.chunk_bytes, rec.chunk_seconds))
            rec.chunk_bytes, rec.chunk_seconds = 0, 0.0
            self._land_chunk(gid, rec)
        return True

    def _land_chunk(self, gid: int, rec: GroupRecord) -> None:
        inst = self.c.instances[gid]
        for seq in rec.chunk:
            for m in inst.members:
                if seq.seq_id in m.kv.tables:
                    m.kv.trim(seq.seq_id, m.layers)  # the sender's copy of the moved layers is freed
            seq.paused = seq.in_flight = False
        self.c.outputs_pending += inst.finish_aborted(rec.chunk)
        rec.chunk = []
        rec.stale = True

    # ------------------------------------------------------------------ restore

    def _restore(self, gid: int, rec: GroupRecord, inst: Instance) -> bool:
        """Split a group back into its parts once its steps in flight have committed, if the
        requests' KV fits the replicas (tried first on copies of the accounting). False while it
        cannot happen yet."""
        c = self.c
        homes = self._homes(inst)
        if not self._fits(inst, homes):
            if c.states[gid] == "restoring":
                c.states[gid] = rec.state_before  # no room after all: serve on, try again later
            return False
        if c.states[gid] != "restoring":
            rec.restore_began = self.clock.now()
            rec.state_before = c.states[gid]
            c.states[gid] = "restoring"  # no new steps
        if inst.flights:
            return False  # the tick comes back once its steps in flight have committed
        actions = self._split_kv({m.rank: m.kv for m in inst.members}, inst, homes)
        for rank, msg in actions:
            c.send(rank, msg)
        self._replicas(gid, rec, inst, homes)
        return True

    def _fits(self, inst: Instance, homes: dict[str, int]) -> bool:
        """Whether the split's accounting goes through, tried on copies of it."""
        try:
            self._split_kv({m.rank: copy.deepcopy(m.kv) for m in inst.members}, inst, homes, dry_run=True)
        except BlockManagerError:
            return False
        return True

    def _split_kv(self, kvs: dict[int, BlockManager], inst: Instance, homes: dict[str, int],
                  dry_run: bool = False) -> list[tuple[int, Any]]:
        """The accounting of a split, on `kvs` (one BlockManager per member), and the messages
        that carry it out, in order. Raises BlockManagerError when something does not fit.
        1. Every member takes its dropped groups' pages back (KV there moves within the device)
           and pulls those weights from the member that holds them, pair by pair in one order.
        2. Each request's KV moves to its home: a full-width table there takes the home's own
           layers by a local copy and the others' by P2P; the old tables are freed."""
        c = self.c
        full = (0, self.num_layers)
        out: list[tuple[int, Any]] = []
        for m in inst.members:
            ready = c.workers[m.rank].ready
            assert ready is not None
            kv = kvs[m.rank]
            dropped = [g for g in ready.groups if g not in needed_groups(c.config.model, m.layers)]
            pages = [p for g in dropped for p in range(ready.groups[g][0], ready.groups[g][0] + ready.groups[g][1])]
            if not kv.can_reclaim(pages):
                raise BlockManagerError(f"device {m.rank} cannot take its parameter pages back yet")
            moves = kv.reclaim(pages)
            for src in inst.members:
                theirs = [g for g in dropped if g in needed_groups(c.config.model, src.layers)]
                if src.rank != m.rank and theirs:
                    out += [(src.rank, SendParams(theirs, m.rank)), (m.rank, RestoreLayers(theirs, moves, src.rank))]
                    moves = []
            if moves:
                out.append((m.rank, CopyPages([a for a, _ in moves], [b for _, b in moves])))
            kv.set_layers(full)
        ps = c.config.cache.page_size
        for seq in _seqs(inst):
            holders = [m.rank for m in inst.members if seq.seq_id in kvs[m.rank].tables]
            home = homes[seq.seq_id]
            hk = kvs[home]
            if not holders or (holders == [home] and hk.covers(seq.seq_id, full)):
                continue  # no KV, or never exchanged: whole on its home already
            n_blocks = max(len(kvs[r].tables[seq.seq_id]) for r in holders)
            tmp = f"{seq.seq_id}@home"
            hk.allocate(tmp, n_blocks * ps)
            for r in holders:
                kv = kvs[r]
                lo, hi = kv.seq_range(seq.seq_id)
                table = kv.tables[seq.seq_id]
                src = [int(kv.block_pages[b, layer]) for b in table for layer in range(lo, hi)]
                dst = [int(hk.block_pages[b, layer]) for b in hk.tables[tmp][: len(table)] for layer in range(lo, hi)]
                if r == home:
                    out.append((home, CopyPages(src, dst)))
                else:  # the home waits for the pages before its next step reads them
                    tid = -1 if dry_run else c.new_transfer_id()
                    out += [(r, SendPages(tid, home, src)), (home, RecvPages(tid, r, dst, blocking=True))]
            for r in holders:
                kvs[r].free(seq.seq_id)
            hk.rename(tmp, seq.seq_id)
        return out

    def _replicas(self, gid: int, rec: GroupRecord, inst: Instance, homes: dict[str, int]) -> None:
        """The parts serve again as replicas, each with the requests whose home it is."""
        c = self.c
        full = (0, self.num_layers)
        parts = [g.ranks[0] for g in rec.merge.parts]
        for rank in parts:
            c.send(rank, RunLayers(full))
        c.retire(inst)
        del c.instances[gid]
        del c.states[gid]
        del self.groups[gid]
        replicas = {}
        for g in rec.merge.parts:
            rank = g.ranks[0]
            replicas[rank] = c.make_instance(g.id, [Member(rank, full, c.kv_of[rank])])
            c.instances[g.id] = replicas[rank]
            c.states[g.id] = "serving"
        sched = inst.scheduler
        for seq in sched.running:
            seq.paused = False
            replicas[homes[seq.seq_id]].scheduler.attach(seq)
            c.moved.append((seq.request_id, replicas[homes[seq.seq_id]].id))
        for i, seq in enumerate(sched.waiting):
            target = replicas[parts[i % len(parts)]]
            target.scheduler.waiting.append(seq)
            c.moved.append((seq.request_id, target.id))
        took = self.clock.now() - rec.restore_began
        self.timings["restore_s"].append(took)
        self.counters["restores"] += 1
        c.events.append(ClusterEvent(self.clock.wall(), "restore", gid, f"split into instances {[g.id for g in rec.merge.parts]}"))
        log.info("restore: group %d split back into %d replicas in %.1f ms", gid, len(parts), took * 1e3)

    def _homes(self, inst: Instance) -> dict[str, int]:
        """Each request's home: the member holding most of its KV pages; ties go to the member
        with less work so far (the split balances the replicas)."""
        load = {m.rank: 0 for m in inst.members}
        homes = {}
        for seq in sorted(_seqs(inst), key=lambda s: -s.num_tokens):
            held = {m.rank: sum(m.kv.width(b) for b in m.kv.tables.get(seq.seq_id, ())) for m in inst.members}
            home = max(held, key=lambda r: (held[r], -load[r]))
            homes[seq.seq_id] = home
            load[home] += seq.num_tokens
        return homes

    # ------------------------------------------------------------------ deaths

    def on_instance_failed(self, gid: int) -> None:
        """A member of a merged group died: its requests are failed by the caller; the record
        stays until the workers are back, then `recover` splits the group."""
        rec = self.groups.get(gid)
        if rec is not None:
            rec.pending.clear()
            rec.chunk = []
            for tid in [t for t, (g, _) in self._transfers.items() if g == gid]:
                del self._transfers[tid]
            rec.survivors = {m.rank for m in self.c.instances[gid].members if self.c.workers[m.rank].state == "ready"}

    def recover(self, gid: int) -> list[Instance] | None:
        """The replicas a failed merged group becomes once every member is loaded again: the
        survivors reload what they dropped from the checkpoint. None if `gid` is no group."""
        rec = self.groups.pop(gid, None)
        if rec is None:
            return None
        c = self.c
        full = (0, self.num_layers)
        out = []
        for g in rec.merge.parts:
            rank = g.ranks[0]
            ready = c.workers[rank].ready
            assert ready is not None
            member = next((m for m in c.instances[gid].members if m.rank == rank), None)
            if member is not None and rank in rec.survivors:  # a restarted worker holds every layer
                dropped = [n for n in ready.groups if n not in needed_groups(c.config.model, member.layers)]
                if dropped:
                    c.send(rank, RestoreLayers(dropped, [], -1))  # from the checkpoint: no peer is sure to
                c.send(rank, RunLayers(full))
            c.kv_of[rank] = c.fresh_kv(rank, full)
            out.append(c.make_instance(g.id, [Member(rank, full, c.kv_of[rank])]))
        return out

    def progress(self, inst: Instance) -> tuple[int, int]:
        """(requests whose KV is still to move, bytes moved) of a merged group; zeros otherwise."""
        rec = self.groups.get(inst.id)
        if rec is None:
            return 0, 0
        return len(self._unplaced(rec, inst)), rec.exchanged_bytes


def _seqs(inst: Instance) -> list[Sequence]:
    s = inst.scheduler
    return list(s.running) + list(s.swapped) + list(s.waiting)
