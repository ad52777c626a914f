"""Block manager: exact block ids on tiny pools, and a hypothesis state machine over allocate,
append, fork, free, preempt, drop, restore, changes of the local layer range and trims.

The state machine keeps a model of what every page holds. The "KV" a block must hold is a pure
function of the sequence's tokens up to the end of that block and of the layer, so a prefix-cache
hit, a fork, or a relocation during restore is right exactly when every page a sequence points
at still holds the value its tokens imply.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kunlite.engine.block_manager import BlockManager, BlockManagerError

PS, L = 4, 3


def manager(n_pages: int, **kw) -> BlockManager:
    return BlockManager(page_size=PS, layers_per_block=L, pages=range(n_pages), **kw)


# ---------------------------------------------------------------- exact ids on tiny pools


def test_allocation_order_and_exact_pages() -> None:
    kv = manager(13)  # 4 blocks of 3 pages, 1 spare page
    assert kv.num_total_blocks == 4 and kv.num_kv_pages == 13
    assert kv.allocate("a", 5) == [0, 1]  # 5 tokens -> 2 blocks, lowest ids first
    assert kv.block_pages[0].tolist() == [0, 1, 2] and kv.block_pages[1].tolist() == [3, 4, 5]
    assert kv.allocate("b", 4) == [2]
    assert not kv.can_allocate("c", 9)  # needs 3 blocks, 1 free
    assert kv.can_allocate("a", 8)  # a grows into its second block: nothing new
    kv.free("a")
    assert kv.num_free_blocks == 3 and kv.num_used_blocks == 1
    kv.check()


def test_prefix_cache_hit_and_lru_eviction_order() -> None:
    kv = manager(4 * L)  # 4 blocks
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert kv.get_computed_blocks("a", prompt) == ([], 0)
    kv.allocate("a", 10)
    kv.cache_full_blocks("a", prompt, 10)
    kv.free("a")  # freed tail first: block 2, then 1, then 0 at the back of the free list
    blocks, n = kv.get_computed_blocks("b", prompt + [99])
    assert (blocks, n) == ([0, 1], 8)
    kv.allocate("b", 11, blocks)
    assert kv.tables["b"] == [0, 1, 3]  # the never-used block 3 goes before cached block 2
    kv.check()
    # A whole-prompt hit still leaves the last token to compute.
    assert kv.get_computed_blocks("c", prompt[:8]) == ([0], 4)
    # The cached block 2 (partial, never hashed) is plain free space; evicting hashed blocks
    # happens only when nothing else is free.
    kv.free("b")
    kv.allocate("d", 16)
    assert kv.get_computed_blocks("e", prompt + [99]) == ([], 0)  # evicted by d
    kv.check()


def test_a_block_cached_after_another_prefix_is_not_a_hit() -> None:
    kv = manager(8 * L)
    c = [54, 55, 56, 57, 60, 61, 62, 63, 1]  # registers block [60..63] after prefix [54..57]
    a = [50, 51, 52, 53, 60, 61, 62, 63, 1]  # same second block, other prefix: not registered
    for sid, toks in (("c", c), ("a", a)):
        kv.allocate(sid, len(toks))
        kv.cache_full_blocks(sid, toks, len(toks))
    blocks, n = kv.get_computed_blocks("b", a)
    assert blocks == kv.tables["a"][:2] and n == 8  # a's own chain, not c's second block
    kv.check()


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    kv = manager(6 * L)
    kv.allocate("p", 6)  # blocks 0 (full), 1 (2 tokens)
    copies = kv.fork("p", "p#1", 6)
    assert kv.tables["p#1"][0] == kv.tables["p"][0]
    assert copies == [(1, kv.tables["p#1"][1])]
    src, dst = kv.page_copies(copies)
    assert src.tolist() == kv.block_pages[1].tolist() and len(dst) == L
    kv.free("p")
    kv.check()
    assert kv.num_used_blocks == 2


def test_misuse_raises() -> None:
    kv = manager(2 * L)
    kv.allocate("a", 4)
    kv.free("a")
    with pytest.raises(BlockManagerError):
        kv.free("a")
    with pytest.raises(BlockManagerError):
        kv.allocate("b", 100)  # no room: the caller must ask can_allocate first
    with pytest.raises(BlockManagerError):
        kv.reclaim([10_000])


def test_reclaim_moves_live_kv_off_the_pages() -> None:
    kv = manager(4 * L)
    kv.add_pages(range(100, 100 + 2 * L))  # a dropped parameter group: 2 more blocks
    assert kv.num_total_blocks == 6
    kv.allocate("a", 4 * PS)  # takes the two new blocks first, then two old ones
    assert set(kv.block_pages[kv.tables["a"][0]].tolist()) <= set(range(100, 106))
    assert kv.can_reclaim(range(100, 106))
    moves = kv.reclaim(range(100, 106))
    assert sorted(s for s, _ in moves) == list(range(100, 106))
    assert all(d < 100 for _, d in moves)
    assert all(p < 100 for b in kv.tables["a"] for p in kv.block_pages[b])
    assert kv.num_total_blocks == 4
    kv.check()
    assert kv.num_free_blocks == 0
    assert not kv.can_reclaim(range(0, L))  # every block is used: nowhere to move


def test_a_change_of_layers_keeps_old_rows_and_new_blocks_cover_the_new_range() -> None:
    kv = manager(4 * L)  # 4 blocks of layers [0, 3)
    kv.allocate("old", 2 * PS)  # blocks 0, 1: pages 0..5
    kv.set_layers((0, 2))  # this device now runs layers 0 and 1 only
    # The two free blocks (pages 6..11) became three blocks of two pages.
    assert kv.num_free_blocks == 3 and kv.layers_per_block == 2
    assert [kv.pages_of(b) for b in kv.tables["old"]] == [[(0, 0), (1, 1), (2, 2)], [(0, 3), (1, 4), (2, 5)]]
    new = kv.allocate("new", PS)
    assert kv.pages_of(new[0]) == [(0, 6), (1, 7)] and kv.block_pages[new[0], 2] == -1
    # The old sequence keeps growing in its own range, from spare pages and dissolved free blocks.
    assert kv.can_allocate("old", 3 * PS)
    grown = kv.allocate("old", 3 * PS)
    assert kv.width(grown[0]) == 3 and kv.seq_range("old") == (0, 3)
    kv.check()
    # Once another device holds layer 2, the old rows give that page back.
    assert kv.trim("old", (0, 2)) == 3
    assert kv.seq_range("old") == (0, 2) and kv.num_kv_pages == 4 * L
    kv.check()
    kv.free("old")
    kv.free("new")
    assert kv.num_used_pages == 0 and kv.num_free_blocks == 6
    kv.check()


def test_trim_leaves_shared_blocks_whole() -> None:
    kv = manager(4 * L)
    kv.allocate("a", 2 * PS)
    kv.fork("a", "b", 2 * PS)  # both blocks shared
    kv.set_layers((1, 3))
    assert kv.trim("a", (1, 3)) == 0  # still needed by b
    kv.free("b")
    assert kv.trim("a", (1, 3)) == 2
    assert kv.seq_range("a") == (1, 3)
    with pytest.raises(BlockManagerError):
        kv.trim("a", (0, 3))  # widening is not trimming
    kv.check()


def test_a_table_trimmed_under_the_current_range_grows_in_its_own() -> None:
    kv = manager(4 * L)  # layers [0, 3)
    kv.allocate("a", PS)
    assert kv.trim("a", (1, 3)) == 1  # another device holds layer 0 of it; new blocks still cover [0, 3)
    grown = kv.allocate("a", 2 * PS)
    assert kv.width(grown[0]) == 2 and kv.seq_range("a") == (1, 3)
    kv.check()
    kv.free("a")
    assert kv.num_used_pages == 0
    kv.check()


# ---------------------------------------------------------------- the state machine

# Shared prefixes (hits), and an identical block after different prefixes (must not hit).
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 10, 11], [20, 21, 22],
           [50, 51, 52, 53, 60, 61, 62, 63, 1], [54, 55, 56, 57, 60, 61, 62, 63, 1]]


def kv_value(tokens: list[int], layer: int) -> tuple:
    return (tuple(tokens), layer)


class BlockMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.groups = {"g0": list(range(200, 200 + 2 * L)), "g1": list(range(300, 300 + L + 1))}
        self.kv = manager(7 * L + 1)
        self.dropped: set[str] = set()
        self.content: dict[int, object] = {}  # page -> what it holds
        self.seqs: dict[str, dict] = {}  # id -> {"tokens", "computed"}
        self.n = 0

    # -- the simulated forward pass: write the KV of tokens [old, new) into their pages
    def _compute(self, sid: str, new_computed: int) -> None:
        s = self.seqs[sid]
        table = self.kv.tables[sid]
        for i in range(s["computed"] // PS, -(-new_computed // PS)):
            upto = min(new_computed, (i + 1) * PS)
            for layer, page in self.kv.pages_of(table[i]):
                self.content[page] = kv_value(s["tokens"][:upto], layer)
        s["computed"] = new_computed
        self.kv.cache_full_blocks(sid, s["tokens"], new_computed)

    @rule(prompt=st.sampled_from(PROMPTS), extra=st.lists(st.integers(30, 33), max_size=6))
    def new_sequence(self, prompt: list[int], extra: list[int]) -> None:
        sid = f"s{self.n}"
        self.n += 1
        tokens = prompt + extra
        hits, cached = self.kv.get_computed_blocks(sid, tokens)
        if not self.kv.can_allocate(sid, len(tokens), hits):
            self.kv.forget(sid)
            return
        self.kv.allocate(sid, len(tokens), hits)
        self.seqs[sid] = {"tokens": tokens, "computed": cached}
        self._compute(sid, len(tokens))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), k=st.integers(1, 6))
    def append(self, data, k: int) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        s = self.seqs[sid]
        if not self.kv.can_allocate(sid, len(s["tokens"]) + k):
            return
        s["tokens"] = s["tokens"] + [40 + (len(s["tokens"]) + j) % 3 for j in range(k)]
        self.kv.allocate(sid, len(s["tokens"]))
        self._compute(sid, len(s["tokens"]))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        n_tok = self.seqs[sid]["computed"]
        if not self.kv.can_fork(sid, n_tok):
            return
        child = f"{sid}#{self.n}"
        self.n += 1
        for src, dst in zip(*self.kv.page_copies(self.kv.fork(sid, child, n_tok))):
            self.content[int(dst)] = self.content.get(int(src))
        self.seqs[child] = {"tokens": list(self.seqs[sid]["tokens"][:n_tok]), "computed": n_tok}

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), preempt=st.booleans())
    def free_or_preempt(self, data, preempt: bool) -> None:
        # With recompute, a preemption is a free; the sequence comes back as a new one.
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.kv.free(sid)
        del self.seqs[sid]

    @rule(group=st.sampled_from(["g0", "g1"]))
    def drop(self, group: str) -> None:
        if group in self.dropped:
            return
        self.dropped.add(group)
        for p in self.groups[group]:
            self.content[p] = "weights"
        self.kv.add_pages(self.groups[group])

    @rule(group=st.sampled_from(["g0", "g1"]))
    def restore(self, group: str) -> None:
        if group not in self.dropped or not self.kv.can_reclaim(self.groups[group]):
            return
        for src, dst in self.kv.reclaim(self.groups[group]):
            assert dst not in self.groups[group]
            self.content[dst] = self.content.get(src)
        for p in self.groups[group]:
            self.content[p] = "weights"
        self.dropped.discard(group)

    @rule(layers=st.sampled_from([(0, 3), (0, 2), (1, 3), (2, 3)]))
    def change_layers(self, layers: tuple[int, int]) -> None:
        self.kv.set_layers(layers)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def trim(self, data) -> None:
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        rng, cur = self.kv.seq_range(sid), self.kv.layers
        if rng is not None and rng[0] <= cur[0] and cur[1] <= rng[1]:
            self.kv.trim(sid, cur)

    @invariant()
    def accounting_is_exact(self) -> None:
        kv = self.kv
        kv.check()
        assert kv.num_free_blocks + kv.num_used_blocks == kv.num_total_blocks
        base = 7 * L + 1 + sum(len(self.groups[g]) for g in self.dropped)
        assert kv.num_kv_pages == base
        assert set(kv.tables) == set(self.seqs)

    @invariant()
    def every_sequence_reads_its_own_kv(self) -> None:
        for sid, s in self.seqs.items():
            table = self.kv.tables[sid]
            for i in range(-(-s["computed"] // PS)):
                upto = min(s["computed"], (i + 1) * PS)
                for layer, page in self.kv.pages_of(table[i]):
                    assert self.content.get(page) == kv_value(s["tokens"][:upto], layer), (sid, i, layer)
            for b in table:
                for _, page in self.kv.pages_of(b):
                    assert not any(int(page) in self.groups[g] for g in set(self.groups) - self.dropped)


TestBlockMachine = BlockMachine.TestCase
TestBlockMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_covers_many_agrees_with_covers_one_by_one() -> None:
    """A pipeline stage asks covers() of every sequence at once; the answers must be the ones
    asked one at a time, over blocks of several ranges, empty tables and unknown sequences."""
    rng = np.random.default_rng(3)
    bm = BlockManager(num_layers=6, layers=(0, 6), pages=range(600), page_size=4, enable_prefix_caching=False)
    for i in range(8):
        bm.allocate(f"s{i}", int(rng.integers(1, 30)))
    bm.allocate("parent", 10)
    bm.fork("parent", "child", 10)
    bm.allocate("child", 24)
    bm.trim("child", (3, 6))  # its own blocks narrow, the shared ones keep [0, 6): a mixed table
    bm.set_layers((0, 3))
    for i in range(8):  # half of them grow blocks of the old range, some new ones of the new
        if i % 2:
            bm.allocate(f"s{i}", len(bm.tables[f"s{i}"]) * 4 + int(rng.integers(1, 9)))
    for i in range(8, 12):
        bm.allocate(f"s{i}", int(rng.integers(1, 20)))
    bm.allocate("empty", 0)
    assert {tuple(bm.block_range[b]) for b in bm.tables["child"]} == {(0, 6), (3, 6)}
    ids = [f"s{i}" for i in range(12)] + ["empty", "unknown", "parent", "child"]
    for layers in [(0, 3), (0, 6), (3, 6), (1, 2)]:
        want = [sid in bm.tables and bm.covers(sid, layers) for sid in ids]
        assert bm.covers_many(ids, layers).tolist() == want
