"""Preemption policies: what happens to a running sequence when KV runs out.

The scheduler picks the victim (`select_victim`) and hands it to the policy.
    recompute (vLLM's default): free the victim's blocks and send it back to the waiting queue;
              its tokens so far (prompt and output) are prefilled again later, mostly from the
              prefix cache.
    swap (InferCept): copy the victim's KV into a bounded host swap space and free its blocks;
              it comes back (before any new request is admitted) into fresh blocks, its KV
              copied in, with nothing recomputed. A full swap space falls back to recompute.
Live migration to another instance (Llumnix) is the coordinator's business: it moves a request
before a preemption is needed (`engine/cluster/migrate.py`); preemption then recomputes.

A policy sees the KV accounting only (a BlockManager, or a GroupKV over a pipeline's members);
the page moves a swap needs are handed to the devices with the step (`take_moves`), which do
them before the step's forward pass: swap-outs first, then swap-ins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from kunlite.engine.sequence import Sequence, SeqStatus
from kunlite.engine.work import HostMoves


class PreemptionPolicy(Protocol):
    name: str

    def preempt(self, seq: Sequence, kv: Any) -> bool:
        """Take `seq` off the device; afterwards it holds no blocks. True if it was swapped out
        (it keeps its computed tokens), False if it must be recomputed (it is WAITING)."""

    def can_resume(self, seq: Sequence, kv: Any, num_tokens: int) -> bool: ...

    def resume(self, seq: Sequence, kv: Any, num_tokens: int) -> None:
        """Bring a swapped-out sequence back with room for num_tokens tokens."""

    def discard(self, seq: Sequence) -> None:
        """A swapped-out sequence ended: forget its host copy."""


class RecomputePolicy:
    name = "recompute"

    def preempt(self, seq: Sequence, kv: Any) -> bool:
        kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        return False

    def can_resume(self, seq: Sequence, kv: Any, num_tokens: int) -> bool:
        return False

    def resume(self, seq: Sequence, kv: Any, num_tokens: int) -> None:
        raise RuntimeError("recompute never swaps a sequence out")

    def discard(self, seq: Sequence) -> None:
        pass


@dataclass
class _Held:
    """The host copy of a swapped-out sequence: per member, the slots of its pages (in the
    order of its blocks, then layers) and the number of blocks they fill."""

    slots: dict[int, list[int]]
    blocks: int


@dataclass
class SwapPolicy:
    """Swap to host over the members of one instance; `slots[i]` slots of host swap space on
    member i (each slot holds one page)."""

    slots: list[int]
    name: str = "swap"
    held: dict[str, _Held] = field(default_factory=dict)
    num_out: int = 0
    num_in: int = 0
    pages_out: int = 0
    pages_in: int = 0

    def __post_init__(self) -> None:
        # Free slots of member i: the returned ones, then the never used ones from _fresh[i] on
        # (a swap space of millions of slots is not listed up front).
        self._returned: list[list[int]] = [[] for _ in self.slots]
        self._fresh = [0 for _ in self.slots]
        self._out: list[HostMoves] = [HostMoves() for _ in self.slots]
        self._in: list[HostMoves] = [HostMoves() for _ in self.slots]
        self._released: list[list[int]] = [[] for _ in self.slots]  # free again after this step

    def preempt(self, seq: Sequence, kv: Any) -> bool:
        members = _members(kv)
        blocks = -(-seq.num_computed_tokens // members[0].page_size)
        pages = {i: [p for b in m.tables[seq.seq_id][:blocks] for _, p in m.pages_of(b)]
                 for i, m in enumerate(members) if seq.seq_id in m.tables}
        if not blocks or any(len(p) > self._num_free(i) for i, p in pages.items()):
            return RecomputePolicy().preempt(seq, kv)  # nothing worth saving, or no room
        slots = {}
        for i, p in pages.items():
            slots[i] = self._take(i, len(p))
            self._out[i] = HostMoves(self._out[i].pages + p, self._out[i].slots + slots[i])
            self.pages_out += len(p)
        self.held[seq.seq_id] = _Held(slots, blocks)
        kv.free(seq.seq_id)
        self.num_out += 1
        return True

    def can_resume(self, seq: Sequence, kv: Any, num_tokens: int) -> bool:
        return kv.can_allocate(seq.seq_id, num_tokens)

    def resume(self, seq: Sequence, kv: Any, num_tokens: int) -> None:
        held = self.held.pop(seq.seq_id)
        kv.allocate(seq.seq_id, num_tokens)
        members = _members(kv)
        for i, slots in held.slots.items():
            m = members[i]
            pages = [p for b in m.tables[seq.seq_id][: held.blocks] for _, p in m.pages_of(b)]
            if len(pages) != len(slots):
                raise RuntimeError(f"{seq.seq_id}: the device's layers changed while it was swapped out")
            self._in[i] = HostMoves(self._in[i].pages + pages, self._in[i].slots + slots)
            self._released[i] += slots
            self.pages_in += len(pages)
        self.num_in += 1

    def discard(self, seq: Sequence) -> None:
        held = self.held.pop(seq.seq_id, None)
        if held is not None:
            for i, slots in held.slots.items():
                self._released[i] += slots

    def take_moves(self, member: int) -> tuple[HostMoves, HostMoves]:
        """(swap-outs, swap-ins) of one member for the step being planned. Slots read by this
        step's swap-ins become free for the next step only: a swap-out in the same step runs
        first and must not overwrite them."""
        out, inn = self._out[member], self._in[member]
        self._out[member], self._in[member] = HostMoves(), HostMoves()
        self._returned[member] += self._released[member]
        self._released[member] = []
        return out, inn

    def _num_free(self, i: int) -> int:
        return len(self._returned[i]) + self.slots[i] - self._fresh[i]

    def _take(self, i: int, n: int) -> list[int]:
        k = min(n, len(self._returned[i]))
        got, self._returned[i] = self._returned[i][:k], self._returned[i][k:]
        got += list(range(self._fresh[i], self._fresh[i] + n - k))
        self._fresh[i] += n - k
        return got


POLICIES: dict[str, Any] = {"recompute": RecomputePolicy, "swap": SwapPolicy}


def _members(kv: Any) -> list[Any]:
    return list(getattr(kv, "members", [kv]))


def select_victim(running: list[Sequence]) -> Sequence:
    """The running sequence that yields first: lowest priority (largest key), latest arrival."""
    return max(running, key=Sequence.priority_key)


def make_policy(name: str, swap_slots: list[int] | None = None) -> PreemptionPolicy:
    if name == "swap":
        return SwapPolicy(list(swap_slots or [0]))
    if name not in POLICIES:
        raise ValueError(f"unknown preemption mode {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name]()
