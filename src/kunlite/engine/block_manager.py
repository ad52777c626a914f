"""KV block manager: exact accounting of KV pages, reference counts and the prefix cache.

A *block* holds `page_size` consecutive tokens of one sequence for every local layer: it is a
row of `layers_per_block` pages, one per layer (`block_pages[block]`). Blocks are the unit of
allocation, sharing (reference counts, fork) and prefix caching. Pages that are KV but not (yet)
in a block are *spare*; there are fewer than `layers_per_block` of them at rest.

States of a block:
    used     ref_count > 0, listed in one or more block tables
    free     ref_count == 0, in `_free` (LRU order: the front is reused first); it may still
             carry a hash, so a later prompt with the same prefix can take it back (a cache hit)

Invariants, checked by `check()` and by the property tests:
    free + used == total blocks
    total_blocks * layers_per_block + spare pages == KV pages handed to the manager
    no page is in two blocks, or in a block and in spare

"No room" is a value (`can_*` returns False); misuse (a double free, an unknown sequence) raises.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

BlockHash = bytes


class BlockManagerError(RuntimeError):
    """Called wrongly: a bug in the caller, never a full cache."""


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash of a full block, chained on its parent so equal hashes mean equal prefixes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class BlockManager:
    def __init__(
        self,
        *,
        page_size: int,
        layers_per_block: int,
        pages: Iterable[int],
        enable_prefix_caching: bool = True,
    ) -> None:
        self.page_size = page_size
        self.layers_per_block = layers_per_block
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pages = np.zeros((0, layers_per_block), dtype=np.int32)  # (capacity, L) page ids
        self._ref: dict[int, int] = {}  # block id -> reference count, for every live block
        self._hash: dict[int, BlockHash] = {}  # block id -> hash, for cached blocks
        self._cached: dict[BlockHash, int] = {}  # hash -> block id
        self._free: OrderedDict[int, None] = OrderedDict()
        self._spare: list[int] = []
        self._recycled_ids: list[int] = []
        self.tables: dict[str, list[int]] = {}  # sequence id -> block ids, in token order
        self._seq_hashes: dict[str, list[BlockHash]] = {}  # hashes of the sequence's full blocks
        self.add_pages(pages)

    # ------------------------------------------------------------------ accounting

    @property
    def num_total_blocks(self) -> int:
        return len(self._ref)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._ref) - len(self._free)

    @property
    def num_kv_pages(self) -> int:
        return len(self._ref) * self.layers_per_block + len(self._spare)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_total_blocks if self._ref else 0.0

    def check(self) -> None:
        """Raise if an invariant is broken (tests call this after every operation)."""
        used = sum(1 for r in self._ref.values() if r > 0)
        if used + len(self._free) != len(self._ref):
            raise BlockManagerError(f"used {used} + free {len(self._free)} != total {len(self._ref)}")
        if any(self._ref[b] != 0 for b in self._free):
            raise BlockManagerError("a block in the free list is referenced")
        refs: dict[int, int] = {}
        for table in self.tables.values():
            for b in table:
                refs[b] = refs.get(b, 0) + 1
        if any(self._ref.get(b, -1) != n for b, n in refs.items()) or used != len(refs):
            raise BlockManagerError("reference counts disagree with the block tables")
        pages = [int(p) for b in self._ref for p in self.block_pages[b]] + self._spare
        if len(pages) != len(set(pages)):
            raise BlockManagerError("a page is in two places")
        if any(self._cached.get(h) not in self._ref for h in self._cached):
            raise BlockManagerError("the prefix cache points at a dead block")

    # ------------------------------------------------------------------ prefix cache

    def get_computed_blocks(self, seq_id: str, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Longest run of cached full blocks that prefixes `token_ids`, and the tokens they hold.
        At least one token is always left to compute, so the caller gets logits to sample."""
        if not self.enable_prefix_caching:
            return [], 0
        hashes = self._hashes_for(seq_id, token_ids, (len(token_ids) - 1) // self.page_size)
        blocks: list[int] = []
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks, len(blocks) * self.page_size

    def _hashes_for(self, seq_id: str, token_ids: Sequence[int], n_blocks: int) -> list[BlockHash]:
        """Hashes of the first n_blocks full blocks of the sequence, extending its memo."""
        hashes = self._seq_hashes.setdefault(seq_id, [])
        ps = self.page_size
        while len(hashes) < n_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, token_ids[i * ps : (i + 1) * ps]))
        return hashes[:n_blocks]

    def cache_full_blocks(self, seq_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the sequence's blocks that are full once `num_computed_tokens` are computed."""
        if not self.enable_prefix_caching:
            return
        table = self._table(seq_id)
        n_full = min(num_computed_tokens // self.page_size, len(table))
        for i, h in enumerate(self._hashes_for(seq_id, token_ids, n_full)):
            b = table[i]
            if b not in self._hash and h not in self._cached:
                self._hash[b] = h
                self._cached[h] = b

    # ------------------------------------------------------------------ allocation

    def blocks_needed(self, seq_id: str, num_tokens: int, computed_blocks: Sequence[int] = ()) -> int:
        """Free blocks that allocate() would consume to hold num_tokens tokens."""
        have = len(self.tables.get(seq_id, ())) + len(computed_blocks)
        revived = sum(1 for b in computed_blocks if self._ref[b] == 0)
        return max(0, -(-num_tokens // self.page_size) - have) + revived

    def can_allocate(self, seq_id: str, num_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        return self.blocks_needed(seq_id, num_tokens, computed_blocks) <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int, computed_blocks: Sequence[int] = ()) -> list[int]:
        """Grow the sequence's table to hold num_tokens tokens, first taking `computed_blocks`
        (prefix-cache hits, only for a sequence with no blocks yet). Returns the new blocks."""
        if not self.can_allocate(seq_id, num_tokens, computed_blocks):
            raise BlockManagerError(f"allocate for {seq_id!r} without room; ask can_allocate first")
        table = self.tables.setdefault(seq_id, [])
        if computed_blocks:
            if table:
                raise BlockManagerError("prefix-cache blocks can only start a table")
            for b in computed_blocks:
                self._take(b)
            table.extend(computed_blocks)
        new = [self._pop_free() for _ in range(-(-num_tokens // self.page_size) - len(table))]
        table.extend(new)
        return new

    def free(self, seq_id: str) -> None:
        """Release the sequence's blocks. Its last blocks go to the back of the free list, so
        shared prefixes (at the front of a table) stay cached longest."""
        table = self.tables.pop(seq_id, None)
        if table is None:
            raise BlockManagerError(f"free of unknown sequence {seq_id!r}")
        self._seq_hashes.pop(seq_id, None)
        for b in reversed(table):
            self._release(b)

    def forget(self, seq_id: str) -> None:
        """Drop the hash memo of a sequence that holds no blocks (e.g. aborted while waiting)."""
        if seq_id in self.tables:
            raise BlockManagerError(f"{seq_id!r} still holds blocks; free it")
        self._seq_hashes.pop(seq_id, None)

    def can_fork(self, parent_id: str, num_tokens: int) -> bool:
        return (num_tokens % self.page_size != 0) <= len(self._free)

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> list[tuple[int, int]]:
        """Give child_id the parent's first num_tokens tokens of KV. Full blocks are shared; a
        partial last block is copied into a fresh block. Returns the (src, dst) block copies the
        caller must perform on the pool before the child's next step."""
        if child_id in self.tables:
            raise BlockManagerError(f"fork into existing sequence {child_id!r}")
        if not self.can_fork(parent_id, num_tokens):
            raise BlockManagerError("fork without room; ask can_fork first")
        n_blocks = -(-num_tokens // self.page_size)
        parent = self._table(parent_id)[:n_blocks]
        n_full = num_tokens // self.page_size
        child = list(parent[:n_full])
        for b in child:
            self._ref[b] += 1
        copies: list[tuple[int, int]] = []
        if n_full < n_blocks:
            dst = self._pop_free()
            copies.append((parent[n_full], dst))
            child.append(dst)
        self.tables[child_id] = child
        self._seq_hashes[child_id] = list(self._seq_hashes.get(parent_id, [])[:n_full])
        return copies

    def page_copies(self, block_copies: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Source and destination pages (each (N * L,)) of a list of block copies."""
        if not block_copies:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        src, dst = zip(*block_copies)
        return self.block_pages[list(src)].reshape(-1), self.block_pages[list(dst)].reshape(-1)

    # ------------------------------------------------------------------ pages in and out

    def add_pages(self, pages: Iterable[int]) -> None:
        """Take more KV pages (pool start-up, or a dropped parameter group)."""
        self._spare.extend(int(p) for p in pages)
        self._regroup()

    def can_reclaim(self, pages: Sequence[int]) -> bool:
        """Whether the used blocks still fit once these pages leave the KV side."""
        return self.num_used_blocks * self.layers_per_block <= self.num_kv_pages - len(set(pages))

    def reclaim(self, pages: Sequence[int]) -> list[tuple[int, int]]:
        """Take these pages out of the KV side (a parameter group is being restored).
        Free blocks that touch them are dissolved; a used block moves its KV from a reclaimed
        page to a spare one. Returns (src_page, dst_page) moves the caller must copy before the
        pages are overwritten. No dst page is ever a src page."""
        want = {int(p) for p in pages}
        if not self.can_reclaim(list(want)):
            raise BlockManagerError("reclaim without room; ask can_reclaim first")
        where = {int(p): (b, i) for b in self._ref for i, p in enumerate(self.block_pages[b])}
        missing = [p for p in want if p not in where and p not in self._spare]
        if missing:
            raise BlockManagerError(f"pages {missing[:5]} are not KV pages")
        for b in {where[p][0] for p in want if p in where and self._ref[where[p][0]] == 0}:
            self._dissolve(b)
        self._spare = [p for p in self._spare if p not in want]
        moves: list[tuple[int, int]] = []
        for p in sorted(want):
            if p not in where or where[p][0] not in self._ref:
                continue
            b, i = where[p]
            if not self._spare:
                self._dissolve(next(iter(self._free)))
                self._spare = [q for q in self._spare if q not in want]
            dst = self._spare.pop()
            self.block_pages[b, i] = dst
            moves.append((p, dst))
        self._regroup()
        return moves

    # ------------------------------------------------------------------ internals

    def _table(self, seq_id: str) -> list[int]:
        if seq_id not in self.tables:
            raise BlockManagerError(f"unknown sequence {seq_id!r}")
        return self.tables[seq_id]

    def _pop_free(self) -> int:
        b, _ = self._free.popitem(last=False)
        self._evict_hash(b)
        self._ref[b] = 1
        return b

    def _take(self, b: int) -> None:
        if self._ref[b] == 0:
            del self._free[b]
        self._ref[b] += 1

    def _release(self, b: int) -> None:
        if self._ref[b] <= 0:
            raise BlockManagerError(f"double free of block {b}")
        self._ref[b] -= 1
        if self._ref[b] == 0:
            self._free[b] = None

    def _evict_hash(self, b: int) -> None:
        h = self._hash.pop(b, None)
        if h is not None and self._cached.get(h) == b:
            del self._cached[h]

    def _dissolve(self, b: int) -> None:
        """Turn a free block back into spare pages."""
        self._evict_hash(b)
        del self._free[b]
        del self._ref[b]
        self._spare.extend(int(p) for p in self.block_pages[b])
        self._recycled_ids.append(b)

    def _regroup(self) -> None:
        """Form blocks from spare pages. New empty blocks go to the front of the free list:
        they are reused before any block that still holds a cached prefix."""
        L = self.layers_per_block
        new_ids: list[int] = []
        while len(self._spare) >= L:
            pages, self._spare = self._spare[:L], self._spare[L:]
            if self._recycled_ids:
                b = self._recycled_ids.pop()
            else:
                b = len(self.block_pages)
                grown = np.zeros((max(16, 2 * len(self.block_pages)), L), dtype=np.int32)
                grown[: len(self.block_pages)] = self.block_pages
                self.block_pages = grown
                self._recycled_ids.extend(range(len(self.block_pages) - 1, b, -1))
            self.block_pages[b] = pages
            self._ref[b] = 0
            self._free[b] = None
            new_ids.append(b)
        for b in reversed(new_ids):  # keep their own order (lowest pages first)
            self._free.move_to_end(b, last=False)
