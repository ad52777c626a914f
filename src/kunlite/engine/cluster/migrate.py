"""Live migration of a running request to another instance (Llumnix), and when to do it.

`choose_migration` (pure) picks a source instance that is short of KV (its queue needs more
blocks than it has free, or its free blocks fall under a reserve) and the instance with the
most room, if that room holds the request with a reserve to spare. The request that moves is
the one preemption would take next (lowest priority, latest arrival) among those decoding.

A `Migration` is a handshake with an abort path:
    reserve   the destination allocates blocks for the request under a reservation id
    stages    the blocks written so far (full blocks: they no longer change) are copied from
              each source member to the matching destination member, while the request keeps
              decoding at the source; each stage copies what the previous one did not
    pause     when what is left is small (FINAL_BLOCKS) or after MAX_STAGES stages, the request
              stops being scheduled, its step in flight commits, and the rest (with the
              partial last block) is copied
    commit    the reservation becomes the request's table at the destination, which runs it
              from there; the source frees its blocks
    abort     the request ended, a side died, or a copy failed: once no copy into the
              reservation can still land, the destination frees it and the source (if alive)
              resumes the request; nothing is leaked on either side
Only instances of the same shape (members with the same layer ranges) exchange requests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from kunlite.engine.clock import REAL, Clock
from kunlite.engine.cluster.dispatch import InstanceLoad, freeness
from kunlite.engine.cluster.messages import RecvPages, SendPages, TransferDone, TransferFailed
from kunlite.engine.instance import Instance
from kunlite.engine.messages import ClusterEvent
from kunlite.engine.preemption import select_victim
from kunlite.engine.sequence import Sequence

log = logging.getLogger("kunlite.cluster")

FINAL_BLOCKS = 16  # pause and finish once at most this many blocks are left to copy
MAX_STAGES = 3  # or after this many live stages
RESERVE_FRACTION = 0.05  # an instance below this share of free blocks is short of KV
ENDED_AT_SOURCE = "the request ended at the source"


def short_of_kv(load: InstanceLoad) -> bool:
    free = load.total_blocks - load.used_blocks
    return load.waiting_blocks > free or free < RESERVE_FRACTION * load.total_blocks


def choose_migration(loads: Seq[InstanceLoad], need_blocks: Callable[[int], int | None],
                     busy: set[int]) -> tuple[int, int] | None:
    """(source, destination) instances for one migration, or None. `need_blocks(src)` is the
    blocks the source's candidate request holds (None: no candidate); `busy`: instances already
    in a migration."""
    serving = [x for x in loads if x.serving and x.id not in busy]
    for src in sorted(serving, key=freeness):
        if not short_of_kv(src):
            break
        need = need_blocks(src.id)
        if need is None:
            continue
        room = [d for d in serving if d.id != src.id and not short_of_kv(d)
                and d.total_blocks - d.used_blocks - d.waiting_blocks >= need + RESERVE_FRACTION * d.total_blocks]
        if room:
            return src.id, max(room, key=lambda d: (freeness(d), -d.id)).id
    return None


def candidate(inst: Instance) -> Sequence | None:
    """The request to move: the next preemption victim among those decoding alone (n = 1)."""
    siblings: dict[str, int] = {}
    for s in inst.scheduler.running:
        siblings[s.request_id] = siblings.get(s.request_id, 0) + 1
    movable = [s for s in inst.scheduler.running
               if not s.in_prefill and not s.paused and not s.pending_children and siblings[s.request_id] == 1]
    return select_victim(movable) if movable else None


@dataclass
class Migration:
    id: int
    seq: Sequence
    src: Instance
    dst: Instance
    reserve_id: str
    copied: int = 0  # blocks already at the destination
    upto: int = 0  # blocks at the destination once the copies in flight land
    stages: int = 0
    final: bool = False
    pending: set[int] = field(default_factory=set)  # transfer ids still in flight
    aborting: str | None = None
    paused_at: float | None = None
    num_bytes: int = 0


class Migrator:
    def __init__(self, send: Callable[[int, Any], bool], page_size: int, new_id: Callable[[], int],
                 clock: Clock = REAL) -> None:
        self.send = send
        self.clock = clock
        self.page_size = page_size
        self.active: dict[int, Migration] = {}
        self._by_transfer: dict[int, tuple[Migration, int]] = {}  # transfer -> (migration, receiving rank)
        self._new_id = new_id  # transfer ids are the cluster's, unique across its users
        self.moved: list[tuple[str, int]] = []
        self.num_done = 0
        self.num_aborted = 0
        self.bytes_moved = 0
        self.pause_seconds = 0.0
        self.events: list[ClusterEvent] = []

    # ------------------------------------------------------------------ deciding

    def trigger(self, instances: dict[int, Instance], loads: list[InstanceLoad]) -> None:
        busy = {m.src.id for m in self.active.values()} | {m.dst.id for m in self.active.values()}

        def need(iid: int) -> int | None:
            seq = candidate(instances[iid])
            return None if seq is None else -(-seq.num_tokens // self.page_size) + 1

        choice = choose_migration(loads, need, busy)
        if choice is None:
            return
        src, dst = instances[choice[0]], instances[choice[1]]
        seq = candidate(src)
        if seq is None or [m.layers for m in src.members] != [m.layers for m in dst.members]:
            return
        mig = Migration(self._new_id(), seq, src, dst, f"{seq.seq_id}@migrating")
        self.active[mig.id] = mig
        log.info("migrating %s from instance %d to %d (%d tokens)", seq.seq_id, src.id, dst.id, seq.num_tokens)
        self._stage(mig)

    # ------------------------------------------------------------------ moving

    def advance(self) -> None:
        """Start the next stage of each migration whose copies have all landed."""
        for mig in list(self.active.values()):
            if mig.pending:
                continue
            if mig.aborting is not None:
                self._finish_abort(mig)
            elif mig.seq.is_finished or mig.seq not in mig.src.scheduler.running:
                self.abort(mig, ENDED_AT_SOURCE)
            elif mig.final:
                if mig.copied >= self._blocks(mig.seq, final=True):
                    self._commit(mig)
                elif not mig.seq.in_flight:
                    self._stage(mig)
            else:
                self._stage(mig)

    def _blocks(self, seq: Sequence, final: bool) -> int:
        """Blocks whose KV can be copied: full ones while it runs, all of them once paused."""
        n = seq.num_computed_tokens
        return -(-n // self.page_size) if final else n // self.page_size

    def _stage(self, mig: Migration) -> None:
        seq = mig.seq
        if not mig.final:
            left = self._blocks(seq, final=True) - mig.copied
            if left <= FINAL_BLOCKS or mig.stages >= MAX_STAGES:
                mig.final, seq.paused, mig.paused_at = True, True, self.clock.now()
                if seq.in_flight:
                    return  # its step commits first; advance() copies the rest then
        upto = self._blocks(seq, final=mig.final)
        if upto <= mig.copied:
            return
        tokens = upto * self.page_size
        if not mig.dst.kv.can_allocate(mig.reserve_id, tokens):
            self.abort(mig, "the destination ran out of room")
            return
        mig.dst.kv.allocate(mig.reserve_id, tokens)
        for s, d in zip(mig.src.members, mig.dst.members):
            src_pages = [p for b in s.kv.tables[seq.seq_id][mig.copied:upto] for _, p in s.kv.pages_of(b)]
            dst_pages = [p for b in d.kv.tables[mig.reserve_id][mig.copied:upto] for _, p in d.kv.pages_of(b)]
            tid = self._new_id()
            mig.pending.add(tid)
            self._by_transfer[tid] = (mig, d.rank)
            if not (self.send(s.rank, SendPages(tid, d.rank, src_pages))
                    and self.send(d.rank, RecvPages(tid, s.rank, dst_pages))):
                self.abort(mig, "a side cannot be reached")
        mig.stages += 1
        mig.upto = upto

    def on_transfer(self, msg: TransferDone | TransferFailed) -> None:
        """A side reports a copy. It is over when the receiver reports (its pages are written,
        or will never be), or when the sender reports a failure (nothing is sent)."""
        entry = self._by_transfer.get(msg.transfer_id)
        if entry is None:
            return
        mig, receiver = entry
        if isinstance(msg, TransferFailed):
            if msg.rank == receiver:
                self._resolve(msg.transfer_id)
            self.abort(mig, f"a copy failed: {msg.message}")
            return
        if msg.rank == receiver:
            mig.num_bytes += msg.num_bytes
            self._resolve(msg.transfer_id)
            if not mig.pending and mig.aborting is None:
                mig.copied = mig.upto

    def _resolve(self, tid: int) -> None:
        entry = self._by_transfer.pop(tid, None)
        if entry is not None:
            entry[0].pending.discard(tid)

    def _commit(self, mig: Migration) -> None:
        seq, src, dst = mig.seq, mig.src, mig.dst
        for m in dst.members:
            m.kv.rename(mig.reserve_id, seq.seq_id)
        src.scheduler.detach(seq)
        seq.paused = False
        dst.scheduler.attach(seq)
        del self.active[mig.id]
        self.moved.append((seq.request_id, dst.id))
        self.num_done += 1
        self.bytes_moved += mig.num_bytes
        self.pause_seconds += self.clock.now() - (mig.paused_at or self.clock.now())
        log.info("migrated %s to instance %d: %d stages, %d bytes", seq.seq_id, dst.id, mig.stages, mig.num_bytes)
        self.events.append(ClusterEvent(self.clock.wall(), "migration", src.id,
                                        f"{seq.seq_id} to instance {dst.id}, {mig.num_bytes} bytes"))

    # ------------------------------------------------------------------ giving up

    def abort(self, mig: Migration, why: str) -> None:
        """Give up; the reservation is freed once no copy into it can still land."""
        if mig.aborting is None:
            # A request that ends while it moves is the normal race, not a fault.
            (log.info if why == ENDED_AT_SOURCE else log.warning)("migration of %s aborted: %s", mig.seq.seq_id, why)
            mig.aborting = why
        if not mig.pending:
            self._finish_abort(mig)

    def _finish_abort(self, mig: Migration) -> None:
        for m in mig.dst.members:
            if mig.reserve_id in m.kv.tables:
                m.kv.free(mig.reserve_id)
        mig.seq.paused = False
        self.active.pop(mig.id, None)
        self.num_aborted += 1
        self.events.append(ClusterEvent(self.clock.wall(), "migration_aborted", mig.src.id,
                                        f"{mig.seq.seq_id}: {mig.aborting}"))

    def on_death(self, rank: int) -> None:
        """A worker died: the migrations touching it end. Its own receives will never report;
        a live receiver of its sends reports a failure (or a copy that landed) itself."""
        for tid, (mig, receiver) in list(self._by_transfer.items()):
            if receiver == rank:
                self._resolve(tid)
        for mig in list(self.active.values()):
            if rank in [m.rank for m in mig.src.members] + [m.rank for m in mig.dst.members]:
                self.abort(mig, f"worker {rank} died")

    def take_events(self) -> list[ClusterEvent]:
        out, self.events = self.events, []
        return out

    def abort_all(self, why: str) -> None:
        for mig in list(self.active.values()):
            self.abort(mig, why)

    @property
    def idle(self) -> bool:
        """No migration and no copy in flight."""
        return not self.active and not self._by_transfer

