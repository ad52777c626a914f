"""The KV accounting of one instance: the block managers of its members, seen as one.

A replica has one member; a pipeline group has one per stage, each over the pages of its own
device and the layers that device holds. The scheduler talks to this object exactly as it
would to a single `BlockManager`; every call goes to the members that hold (or, for a new
sequence, will hold) the sequence.

Invariants:
    a sequence admitted into the group has a table on every member, each covering that
    member's layers, with the same number of blocks (all members see the same token counts);
    a sequence that joined the group with its KV on one device (a replica merged into a
    pipeline) has a table only on the members that hold some of its KV;
    the group can allocate only if every member that must can: "no room" anywhere is "no room".
Block ids are per member; `fork` returns (member, src, dst) block copies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kunlite.engine.block_manager import BlockManager

MemberBlocks = list[list[int]]  # per member, prefix-cache hits (block ids of that member)


class _Tables:
    """Membership only: `seq_id in group.tables` when any member holds the sequence."""

    def __init__(self, members: list[BlockManager]) -> None:
        self._members = members

    def __contains__(self, seq_id: object) -> bool:
        return any(seq_id in m.tables for m in self._members)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for m in self._members:
            for sid in m.tables:
                if sid not in seen:
                    seen.add(sid)
                    yield sid

    def __len__(self) -> int:
        return sum(1 for _ in self)


class GroupKV:
    def __init__(self, members: list[BlockManager]) -> None:
        if not members or len({m.page_size for m in members}) != 1:
            raise ValueError("a group needs members with one page size")
        self.members = members
        self.page_size = members[0].page_size
        self.tables = _Tables(members)

    def _holding(self, seq_id: str) -> list[int]:
        """Members that hold the sequence, or all of them for a sequence not yet admitted."""
        held = [i for i, m in enumerate(self.members) if seq_id in m.tables]
        return held or list(range(len(self.members)))

    # ------------------------------------------------------------------ accounting

    @property
    def enable_prefix_caching(self) -> bool:
        """Whether any member caches prefixes."""
        return any(m.enable_prefix_caching for m in self.members)

    @property
    def num_free_blocks(self) -> int:
        return min(m.num_free_blocks for m in self.members)

    @property
    def num_total_blocks(self) -> int:
        return min(m.num_total_blocks for m in self.members)

    @property
    def num_used_blocks(self) -> int:
        return max(m.num_used_blocks for m in self.members)

    def check(self) -> None:
        for m in self.members:
            m.check()

    # ------------------------------------------------------------------ the BlockManager calls

    def get_computed_blocks(self, seq_id: str, token_ids: Sequence[int]) -> tuple[MemberBlocks, int]:
        """Prefix-cache hits that every member has: the shortest of the members' runs."""
        hits = [m.get_computed_blocks(seq_id, token_ids)[0] for m in self.members]
        k = min(len(h) for h in hits)
        return [h[:k] for h in hits], k * self.page_size

    def holds(self, seq_id: str, num_tokens: int) -> bool:
        """Whether every member that holds the sequence (one at least) holds num_tokens tokens of it."""
        need = -(-num_tokens // self.page_size)  # blocks (BlockManager.holds of each, one page size)
        held = False
        for m in self.members:
            table = m.tables.get(seq_id)
            if table is not None:
                if need > len(table):
                    return False
                held = True
        return held

    def can_allocate(self, seq_id: str, num_tokens: int, computed: MemberBlocks | Sequence[int] = (),
                     extra_blocks: int = 0) -> bool:
        return all(self.members[i].can_allocate(seq_id, num_tokens, self._hits(computed, i), extra_blocks)
                   for i in self._holding(seq_id))

    def allocate(self, seq_id: str, num_tokens: int, computed: MemberBlocks | Sequence[int] = ()) -> None:
        if not computed and self.holds(seq_id, num_tokens):
            return  # every member that holds it has room already (most decode steps)
        for i in self._holding(seq_id):
            self.members[i].allocate(seq_id, num_tokens, self._hits(computed, i))

    def shrink(self, seq_id: str, num_tokens: int) -> None:
        for i in self._holding(seq_id):
            self.members[i].shrink(seq_id, num_tokens)

    def free(self, seq_id: str) -> None:
        for m in self.members:
            if seq_id in m.tables:
                m.free(seq_id)

    def forget(self, seq_id: str) -> None:
        for m in self.members:
            m.forget(seq_id)

    def cache_full_blocks(self, seq_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        for m in self.members:
            if m.enable_prefix_caching and seq_id in m.tables:
                m.cache_full_blocks(seq_id, token_ids, num_computed_tokens)

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> list[tuple[int, int, int]]:
        """(member, src block, dst block) copies to run before the child's next step."""
        return [(i, src, dst) for i, m in enumerate(self.members) if parent_id in m.tables
                for src, dst in m.fork(parent_id, child_id, num_tokens)]

    @staticmethod
    def _hits(computed: MemberBlocks | Sequence[int], i: int) -> list[int]:
        if not computed:
            return []
        return list(computed[i])  # type: ignore[arg-type]
