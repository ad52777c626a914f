"""KV block manager of one device: exact accounting of KV pages, reference counts and the
prefix cache.

A *block* holds `page_size` consecutive tokens of one sequence for a contiguous range of layers
[lo, hi): one page per layer. `block_pages[block, layer]` is indexed by the model's *global*
layer number and holds -1 outside the block's range (`block_range[block]`). Blocks are the unit
of allocation, sharing (reference counts, fork) and prefix caching. Pages that are KV but not
(yet) in a block are *spare*.

New blocks cover the device's current layer range (`layers`). The range changes when the device
drops or restores layers (a pipeline group forms or splits): blocks allocated before the change
keep their rows, so a request admitted before a drop still has KV for every layer it had, and
one admitted after holds pages only for the layers this device now runs. All blocks of one
sequence cover the same range, except that `trim` may narrow a sequence's unshared blocks once
another device holds the KV of the layers it drops.

States of a block:
    used     ref_count > 0, listed in one or more block tables
    free     ref_count == 0, in `_free` (LRU order: the front is reused first); it may still
             carry a hash, so a later prompt with the same prefix can take it back (a cache hit).
             Only blocks of the current range are ever free: a block of another range becomes
             spare pages as soon as nobody uses it.

Invariants, checked by `check()` and by the property tests:
    free + used == total blocks
    sum of the blocks' widths + spare pages == KV pages handed to the manager
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
        pages: Iterable[int],
        layers: tuple[int, int] | None = None,
        num_layers: int | None = None,
        layers_per_block: int | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        """`layers`: the global layer range of new blocks (`layers_per_block=n` means (0, n));
        `num_layers`: the model's layer count, the width of `block_pages` (default: layers[1])."""
        if layers is None:
            if layers_per_block is None:
                raise BlockManagerError("give layers or layers_per_block")
            layers = (0, layers_per_block)
        self.page_size = page_size
        self.layers = (int(layers[0]), int(layers[1]))
        self.num_layers = num_layers if num_layers is not None else self.layers[1]
        if not 0 <= self.layers[0] < self.layers[1] <= self.num_layers:
            raise BlockManagerError(f"layer range {layers} is not inside [0, {self.num_layers})")
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pages = np.full((0, self.num_layers), -1, dtype=np.int32)  # (capacity, L_total) page ids
        self.block_range = np.zeros((0, 2), dtype=np.int32)  # (capacity, 2) [lo, hi) of each block
        self._ref: dict[int, int] = {}  # block id -> reference count, for every live block
        self._hash: dict[int, BlockHash] = {}  # block id -> hash, for cached blocks
        self._cached: dict[BlockHash, int] = {}  # hash -> block id
        self._free: OrderedDict[int, None] = OrderedDict()
        self._spare: list[int] = []
        self._recycled_ids: list[int] = []
        self.tables: dict[str, list[int]] = {}  # sequence id -> block ids, in token order
        self._seq_hashes: dict[str, list[BlockHash]] = {}  # hashes of the sequence's full blocks
        self._block_page_count = 0  # sum of the widths of all blocks
        self._used_page_count = 0  # sum of the widths of used blocks
        # Invariant while True: every block is of the current range. A block of another range
        # comes only from a change of range or a narrowed block: then it is False for good.
        self._one_range = True
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
    def layers_per_block(self) -> int:
        """Pages in a new block: one per layer of the current range."""
        return self.layers[1] - self.layers[0]

    def width(self, b: int) -> int:
        lo, hi = self.block_range[b].tolist()
        return hi - lo

    def pages_of(self, b: int) -> list[tuple[int, int]]:
        """(global layer, page) of every page of block b."""
        lo, hi = (int(x) for x in self.block_range[b])
        return [(layer, int(self.block_pages[b, layer])) for layer in range(lo, hi)]

    @property
    def num_kv_pages(self) -> int:
        return self._block_page_count + len(self._spare)

    @property
    def num_used_pages(self) -> int:
        """Pages in used blocks (blocks of another range count their own width)."""
        return self._used_page_count

    def covers(self, seq_id: str, layers: tuple[int, int]) -> bool:
        """Whether every block of the sequence holds pages for all of `layers`."""
        table = self._table(seq_id)
        if not table:
            return True
        r = self.block_range[table]  # (n, 2)
        return bool(r[:, 0].max() <= layers[0] and layers[1] <= r[:, 1].min())

    def covers_many(self, seq_ids: Sequence[str], layers: tuple[int, int]) -> np.ndarray:
        """(n,) bool: covers() of each sequence, False for one this manager holds nothing of;
        one lookup for all (a pipeline stage asks this of every sequence of every step)."""
        held = [i for i, sid in enumerate(seq_ids) if sid in self.tables]
        out = np.zeros(len(seq_ids), dtype=bool)  # (n,)
        tables = [self.tables[seq_ids[i]] for i in held]
        lengths = np.array([len(t) for t in tables], dtype=np.int64)  # (h,)
        full = lengths > 0
        out[[i for i, f in zip(held, full) if not f]] = True  # no blocks: nothing to miss
        if full.any():
            r = self.block_range[[b for t in tables for b in t]]  # (sum of lengths, 2)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])[full]  # (f,) first row of each table
            lo = np.maximum.reduceat(r[:, 0], starts)  # (f,) the highest first layer of its blocks
            hi = np.minimum.reduceat(r[:, 1], starts)  # (f,) the lowest end
            out[[i for i, f in zip(held, full) if f]] = (lo <= layers[0]) & (layers[1] <= hi)
        return out

    def seq_range(self, seq_id: str) -> tuple[int, int] | None:
        """The layers every block of the sequence holds (their intersection); None if no blocks."""
        table = self._table(seq_id)
        if not table:
            return None
        r = self.block_range[table]  # (n, 2)
        return int(r[:, 0].max()), int(r[:, 1].min())

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
        pages = [p for b in self._ref for _, p in self.pages_of(b)] + self._spare
        if len(pages) != len(set(pages)) or min(pages, default=0) < 0:
            raise BlockManagerError("a page is in two places")
        if not all(self._current(b) for b in self._free):
            raise BlockManagerError("a free block is not of the current layer range")
        if self._one_range and not all(self._current(b) for b in self._ref):
            raise BlockManagerError("a block is of another layer range, and _one_range says none is")
        if (self._block_page_count, self._used_page_count) != (
                sum(self.width(b) for b in self._ref), sum(self.width(b) for b, r in self._ref.items() if r > 0)):
            raise BlockManagerError("page counters disagree with the blocks")
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
            if b is None or not self._current(b):
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
            if b not in self._hash and h not in self._cached and self._current(b):
                self._hash[b] = h
                self._cached[h] = b

    # ------------------------------------------------------------------ allocation

    def blocks_needed(self, seq_id: str, num_tokens: int, computed_blocks: Sequence[int] = ()) -> int:
        """Blocks that allocate() would take (new ones, and free cached ones it revives) to hold
        num_tokens tokens."""
        have = len(self.tables.get(seq_id, ())) + len(computed_blocks)
        revived = sum(1 for b in computed_blocks if self._ref[b] == 0)
        return max(0, -(-num_tokens // self.page_size) - have) + revived

    def holds(self, seq_id: str, num_tokens: int) -> bool:
        """Whether the sequence's blocks hold num_tokens tokens already (allocate() would do nothing)."""
        table = self.tables.get(seq_id)
        return table is not None and -(-num_tokens // self.page_size) <= len(table)

    def can_allocate(self, seq_id: str, num_tokens: int, computed_blocks: Sequence[int] = (),
                     extra_blocks: int = 0) -> bool:
        """Whether allocate() can grow the sequence to num_tokens tokens, with `extra_blocks`
        more blocks of the current range left over (for forks in the same step)."""
        need = self.blocks_needed(seq_id, num_tokens, computed_blocks)
        if need == 0 and extra_blocks == 0:
            return True  # most decode steps: the last block has room
        rng = self._alloc_range(seq_id)
        if rng == self.layers:
            return need + extra_blocks <= len(self._free)
        # Blocks of an older range are formed from spare pages and from dissolved free blocks.
        pages = need * (rng[1] - rng[0]) + extra_blocks * self.layers_per_block
        return pages <= len(self._free) * self.layers_per_block + len(self._spare)

    def allocate(self, seq_id: str, num_tokens: int, computed_blocks: Sequence[int] = ()) -> list[int]:
        """Grow the sequence's table to hold num_tokens tokens, first taking `computed_blocks`
        (prefix-cache hits, only for a sequence with no blocks yet). New blocks cover the layers
        of the sequence's existing blocks, or the current range for a new sequence. Returns the
        new blocks."""
        table = self.tables.get(seq_id)
        need = -(-num_tokens // self.page_size)
        if table is not None and not computed_blocks and need <= len(table):
            return []  # it holds them already
        rng = self._alloc_range(seq_id)
        # can_allocate's answer where it is plain: more blocks of the current range for a table
        growing = bool(table) and not computed_blocks and rng == self.layers
        if not (growing and need - len(table) <= len(self._free)) and \
                not self.can_allocate(seq_id, num_tokens, computed_blocks):
            raise BlockManagerError(f"allocate for {seq_id!r} without room; ask can_allocate first")
        table = self.tables.setdefault(seq_id, [])
        if computed_blocks:
            if table:
                raise BlockManagerError("prefix-cache blocks can only start a table")
            for b in computed_blocks:
                self._take(b)
            table.extend(computed_blocks)
        n_new = need - len(table)
        new = self._pop_free(n_new) if rng == self.layers else [self._new_block(rng) for _ in range(n_new)]
        table.extend(new)
        return new

    def _alloc_range(self, seq_id: str) -> tuple[int, int]:
        table = self.tables.get(seq_id)
        if not table or self._one_range:
            return self.layers
        lo, hi = self.block_range[table[-1]].tolist()
        return lo, hi

    def _new_block(self, rng: tuple[int, int]) -> int:
        """A used block of a range other than the current one, from spare pages (dissolving the
        free blocks reused first when there are too few)."""
        lo, hi = rng
        while len(self._spare) < hi - lo:
            self._dissolve(next(iter(self._free)))
        pages, self._spare = self._spare[: hi - lo], self._spare[hi - lo :]
        b = self._recycled_ids.pop() if self._recycled_ids else self._grow()
        self.block_pages[b, lo:hi] = pages
        self.block_range[b] = rng
        self._block_page_count += hi - lo
        self._used_page_count += hi - lo
        self._ref[b] = 1
        self._regroup()
        return b

    def free(self, seq_id: str) -> None:
        """Release the sequence's blocks. Its last blocks go to the back of the free list, so
        shared prefixes (at the front of a table) stay cached longest."""
        table = self.tables.pop(seq_id, None)
        if table is None:
            raise BlockManagerError(f"free of unknown sequence {seq_id!r}")
        self._seq_hashes.pop(seq_id, None)
        self._release_all(table[::-1])

    def shrink(self, seq_id: str, num_tokens: int) -> None:
        """Release the blocks past the first num_tokens tokens (KV allocated ahead and not
        used: the simulator's fast-forward cut short)."""
        table = self._table(seq_id)
        keep = -(-num_tokens // self.page_size)
        self._release_all(table[keep:][::-1])
        del table[keep:]

    def rename(self, old: str, new: str) -> None:
        """Hand a table to another sequence id (a migration's reservation becomes the request)."""
        if new in self.tables:
            raise BlockManagerError(f"rename onto existing sequence {new!r}")
        self.tables[new] = self._table(old)
        del self.tables[old]
        self._seq_hashes.pop(old, None)

    def forget(self, seq_id: str) -> None:
        """Drop the hash memo of a sequence that holds no blocks (e.g. aborted while waiting)."""
        if seq_id in self.tables:
            raise BlockManagerError(f"{seq_id!r} still holds blocks; free it")
        self._seq_hashes.pop(seq_id, None)

    def can_fork(self, parent_id: str, num_tokens: int) -> bool:
        if num_tokens % self.page_size == 0:
            return True
        lo, hi = (int(x) for x in self.block_range[self._table(parent_id)[num_tokens // self.page_size]])
        if (lo, hi) == self.layers:
            return len(self._free) >= 1
        return hi - lo <= len(self._free) * self.layers_per_block + len(self._spare)

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> list[tuple[int, int]]:
        """Give child_id the parent's first num_tokens tokens of KV. Full blocks are shared; a
        partial last block is copied into a fresh block of the same layers. Returns the
        (src, dst) block copies the caller must perform on the pool before the child's next
        step."""
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
            src = parent[n_full]
            rng = (int(self.block_range[src, 0]), int(self.block_range[src, 1]))
            dst = self._pop_free(1)[0] if rng == self.layers else self._new_block(rng)
            copies.append((src, dst))
            child.append(dst)
        self.tables[child_id] = child
        self._seq_hashes[child_id] = list(self._seq_hashes.get(parent_id, [])[:n_full])
        return copies

    def page_copies(self, block_copies: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Source and destination pages (each (N,), every layer of each pair) of a list of copies
        between blocks of the same range."""
        src = [p for s, _ in block_copies for _, p in self.pages_of(s)]
        dst = [p for _, d in block_copies for _, p in self.pages_of(d)]
        return np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)

    def page_table(self, block_ids: np.ndarray, layers: tuple[int, int]) -> np.ndarray:
        """Pages of the given blocks for the given layers: (B, max_blocks) block ids, padded with
        any valid block -> (L, B, max_blocks) page ids. Every real entry must cover `layers`."""
        lo, hi = layers
        return self.block_pages[block_ids, lo:hi].transpose(2, 0, 1)  # (L, B, max_blocks)

    # ------------------------------------------------------------------ layer ranges

    def set_layers(self, layers: tuple[int, int]) -> None:
        """From now on new blocks cover `layers` (the device dropped or restored layers). Free
        blocks of the old range become spare pages (their cached prefixes are forgotten) and
        spare pages form blocks of the new range; used blocks keep their rows."""
        lo, hi = int(layers[0]), int(layers[1])
        if not 0 <= lo < hi <= self.num_layers:
            raise BlockManagerError(f"layer range {layers} is not inside [0, {self.num_layers})")
        if (lo, hi) == self.layers:
            return
        self.layers = (lo, hi)
        self._one_range = False
        self._dissolve_free()
        self._regroup()

    def trim(self, seq_id: str, layers: tuple[int, int]) -> int:
        """Narrow the sequence's blocks to `layers` (another device now holds the KV of the rest).
        Blocks shared with another sequence keep all their pages until the last user narrows or
        frees them. Returns the pages given back."""
        lo, hi = layers
        freed = 0
        for b in self._table(seq_id):
            blo, bhi = (int(x) for x in self.block_range[b])
            if self._ref[b] != 1 or (blo, bhi) == (lo, hi):
                continue
            if not blo <= lo < hi <= bhi:
                raise BlockManagerError(f"cannot trim block {b} [{blo}, {bhi}) to [{lo}, {hi})")
            for layer in [*range(blo, lo), *range(hi, bhi)]:
                self._spare.append(int(self.block_pages[b, layer]))
                self.block_pages[b, layer] = -1
                freed += 1
                self._block_page_count -= 1
                self._used_page_count -= 1
            self.block_range[b] = (lo, hi)
            self._one_range = False
            self._evict_hash(b)
        self._regroup()
        return freed

    # ------------------------------------------------------------------ pages in and out

    def add_pages(self, pages: Iterable[int]) -> None:
        """Take more KV pages (pool start-up, or a dropped parameter group)."""
        self._regroup(np.asarray(pages if isinstance(pages, np.ndarray) else list(pages), dtype=np.int64))

    def can_reclaim(self, pages: Sequence[int]) -> bool:
        """Whether the used blocks still fit once these pages leave the KV side."""
        return self.num_used_pages <= self.num_kv_pages - len(set(pages))

    def reclaim(self, pages: Sequence[int]) -> list[tuple[int, int]]:
        """Take these pages out of the KV side (a parameter group is being restored).
        Free blocks that touch them are dissolved; a used block moves its KV from a reclaimed
        page to a spare one. Returns (src_page, dst_page) moves the caller must copy before the
        pages are overwritten. No dst page is ever a src page."""
        want = {int(p) for p in pages}
        if not self.can_reclaim(list(want)):
            raise BlockManagerError("reclaim without room; ask can_reclaim first")
        where = {p: (b, layer) for b in self._ref for layer, p in self.pages_of(b)}
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
            b, layer = where[p]
            if not self._spare:
                self._dissolve(next(iter(self._free)))
                self._spare = [q for q in self._spare if q not in want]
            dst = self._spare.pop()
            self.block_pages[b, layer] = dst
            moves.append((p, dst))
        self._regroup()
        return moves

    # ------------------------------------------------------------------ internals

    def _table(self, seq_id: str) -> list[int]:
        if seq_id not in self.tables:
            raise BlockManagerError(f"unknown sequence {seq_id!r}")
        return self.tables[seq_id]

    def _pop_free(self, n: int) -> list[int]:
        """The first n blocks of the free list, each now with one reference (their cached
        prefixes forgotten)."""
        pop = self._free.popitem
        if n == 1:  # (a decode's next block: most calls)
            new = [pop(False)[0]]
            self._ref[new[0]] = 1
        else:
            new = [pop(False)[0] for _ in range(n)]
            self._ref.update(dict.fromkeys(new, 1))
        if self._hash:
            for b in new:
                self._evict_hash(b)
        lo, hi = self.layers
        self._used_page_count += n * (hi - lo)  # a free block is of the current range (check())
        return new

    def _take(self, b: int) -> None:
        if self._ref[b] == 0:
            del self._free[b]
            self._used_page_count += self.width(b)
        self._ref[b] += 1

    def _release_all(self, blocks: list[int]) -> None:
        """Drop a reference to each block, in this order; a block nobody references goes to
        the back of the free list, or is dissolved if it is not of the current range. Their
        ranges are read at once: releasing one block changes no other's while it is still
        referenced."""
        if not blocks:
            return
        lo0, hi0 = self.layers
        ref, free = self._ref, self._free
        if list(map(ref.__getitem__, blocks)).count(1) == len(blocks) and self._one_range:
            # the common case, in bulk: each block's last reference, each of the current range
            ref.update(dict.fromkeys(blocks, 0))
            for b in blocks:  # (OrderedDict.update is slower than this loop)
                free[b] = None
            self._used_page_count -= len(blocks) * (hi0 - lo0)
            return
        for b, (lo, hi) in zip(blocks, self.block_range[blocks].tolist()):
            if ref[b] <= 0:
                raise BlockManagerError(f"double free of block {b}")
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None
                self._used_page_count -= hi - lo
                if lo != lo0 or hi != hi0:
                    self._dissolve(b)  # nobody can use a block of another range
                    self._regroup()

    def _current(self, b: int) -> bool:
        """Whether block b covers exactly the current layer range."""
        lo, hi = self.block_range[b].tolist()
        return lo == self.layers[0] and hi == self.layers[1]

    def _evict_hash(self, b: int) -> None:
        h = self._hash.pop(b, None)
        if h is not None and self._cached.get(h) == b:
            del self._cached[h]

    def _dissolve_free(self) -> None:
        """`_dissolve` every free block, at once (a drop frees thousands of them)."""
        ids = list(self._free)
        if not ids:
            return
        rows = self.block_pages[ids]  # (F, num_layers); -1 outside each block's range
        pages = rows[rows >= 0]  # (P,) block by block, layers ascending: the order _dissolve gives
        for b in ids:
            self._evict_hash(b)
            del self._ref[b]
        self._free.clear()
        self._block_page_count -= int(pages.size)
        self._spare.extend(pages.tolist())
        self.block_pages[ids] = -1
        self._recycled_ids.extend(ids)

    def _dissolve(self, b: int) -> None:
        """Turn a free block back into spare pages."""
        self._evict_hash(b)
        del self._free[b]
        del self._ref[b]
        self._block_page_count -= self.width(b)
        self._spare.extend(p for _, p in self.pages_of(b))
        self.block_pages[b] = -1
        self._recycled_ids.append(b)

    def _grow(self, at_least: int = 1) -> int:
        """Double the block arrays (or more, to take `at_least` new blocks); returns the first
        new id (the others are recycled ids)."""
        b = len(self.block_pages)
        cap = max(16, 2 * b, b + at_least)
        grown = np.full((cap, self.num_layers), -1, dtype=np.int32)
        grown[:b] = self.block_pages
        ranges = np.zeros((cap, 2), dtype=np.int32)
        ranges[:b] = self.block_range
        self.block_pages, self.block_range = grown, ranges
        self._recycled_ids.extend(range(cap - 1, b, -1))
        return b

    def _regroup(self, more: np.ndarray | None = None) -> None:
        """Form blocks of the current range from spare pages, `more` (P,) after the others. New
        empty blocks go to the front of the free list: they are reused before any block that
        still holds a cached prefix."""
        lo, hi = self.layers
        width = hi - lo
        spare = self._spare
        whole = (len(spare) + (len(more) if more is not None else 0)) // width
        if not whole:
            if more is not None:
                spare.extend(more.tolist())
            return
        # All at once, not a page or a block at a time: a GPU pool has 10^5 pages and more
        pages = np.asarray(spare, dtype=np.int64)  # (S,)
        if more is not None:
            pages = np.concatenate((pages, more))  # (S + P,) in order
        self._spare = pages[whole * width:].tolist()
        recycled = self._recycled_ids
        k = min(whole, len(recycled))
        new_ids = [recycled.pop() for _ in range(k)]
        if k < whole:  # then ids from the grown arrays, in increasing order
            new_ids.append(self._grow(whole - k))
            new_ids += [recycled.pop() for _ in range(whole - k - 1)]
        rows = np.asarray(new_ids, dtype=np.int64)  # (whole,)
        self.block_pages[rows, lo:hi] = pages[:whole * width].reshape(whole, width)
        self.block_range[rows] = (lo, hi)
        self._block_page_count += width * whole
        self._ref.update(dict.fromkeys(new_ids, 0))
        free = self._free
        for b in new_ids:
            free[b] = None
        for b in reversed(new_ids):  # keep their own order (lowest pages first)
            free.move_to_end(b, last=False)
