"""The parameter-centric trigger and planner, on plain numbers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kunlite.engine.plan import (CalmWatch, Group, KVLoad, ModelBytes, TriggerConfig, balanced_ranges, group_bytes,
                                 plan_merge, plan_split, throttled)

MODEL = ModelBytes(layers=(10,) * 30, embed=7, head=3, tied=False)  # a replica holds 310 bytes


def test_throttled_needs_a_full_kv_and_a_queue_that_cannot_fit() -> None:
    cfg = TriggerConfig()
    assert throttled(KVLoad(used=96, total=100, waiting_need=4, waiting=1), cfg)
    assert not throttled(KVLoad(used=96, total=100, waiting_need=3, waiting=1), cfg)  # it fits
    assert not throttled(KVLoad(used=94, total=100, waiting_need=50, waiting=2), cfg)  # under 95%
    assert not throttled(KVLoad(used=100, total=100, waiting_need=0, waiting=0), cfg)  # nothing waits


def test_calm_needs_low_use_no_queue_and_a_window_without_growth() -> None:
    watch = CalmWatch(TriggerConfig(calm_window_s=5.0))
    low = KVLoad(used=40, total=200, waiting_need=0, waiting=0)
    assert not watch.observe(0.0, low, undropped_total=100)  # the window has not passed
    assert not watch.observe(3.0, low, undropped_total=100)
    assert watch.observe(5.0, low, undropped_total=100)
    assert not watch.observe(6.0, KVLoad(used=45, total=200, waiting_need=0, waiting=0), 100)  # rose
    assert not watch.observe(12.0, KVLoad(used=60, total=200, waiting_need=0, waiting=0), 100)  # >= half
    assert not watch.observe(20.0, KVLoad(used=10, total=200, waiting_need=5, waiting=1), 100)  # a queue


def test_two_replicas_merge_into_two_balanced_stages() -> None:
    plan = plan_merge([Group(0, (0,)), Group(1, (1,))], deficit_bytes=100, model=MODEL)
    [merge] = plan.merges
    assert merge.ranks == (0, 1) and merge.layers == ((0, 15), (15, 30))
    # Stage 0 keeps layers 0-14 and the embedding, stage 1 layers 15-29 and the head.
    assert plan.freed_bytes == 2 * 310 - (150 + 7) - (150 + 3) and plan.covers
    assert plan_split(merge) == (Group(0, (0,)), Group(1, (1,)))


def test_no_merge_when_none_is_needed_and_no_more_than_needed() -> None:
    groups = [Group(i, (i,)) for i in range(8)]
    assert plan_merge(groups, 0, MODEL).merges == ()
    one = plan_merge(groups, 150, MODEL)  # one pair frees 310 - 0 ... enough
    assert len(one.merges) == 1 and one.merges[0].ranks == (0, 1)
    all_in = plan_merge(groups, 10**9, MODEL)  # cannot cover: everything merged
    assert not all_in.covers and [m.ranks for m in all_in.merges] == [tuple(range(8))]


@given(st.integers(2, 12), st.integers(0, 3000), st.integers(4, 40), st.booleans())
def test_merge_plans_are_valid_minimal_and_inverted_by_their_split(n: int, deficit: int, layers: int,
                                                                   tied: bool) -> None:
    model = ModelBytes(layers=(10,) * layers, embed=5, head=2, tied=tied)
    groups = [Group(i, (i,)) for i in range(n)]
    plan = plan_merge(groups, deficit, model)
    placed = [r for m in plan.merges for r in m.ranks]
    assert len(placed) == len(set(placed))  # a device is in one group
    for m in plan.merges:
        # Every layer once per group, contiguous, balanced shares.
        assert m.layers[0][0] == 0 and m.layers[-1][1] == layers
        assert all(a[1] == b[0] for a, b in zip(m.layers, m.layers[1:]))
        sizes = [hi - lo for lo, hi in m.layers]
        assert max(sizes) - min(sizes) <= 1
        # The restore plan gives back exactly the groups that merged.
        assert sorted(r for g in plan_split(m) for r in g.ranks) == sorted(m.ranks)
    # Freed bytes are what the merged groups no longer hold twice.
    untouched = n - len(placed)
    held = sum(group_bytes(model, len(m.ranks)) for m in plan.merges) + untouched * model.replica_bytes()
    assert plan.freed_bytes == n * model.replica_bytes() - held
    if deficit <= 0:
        assert plan.merges == ()
    elif plan.covers:
        # Minimal: one merge fewer would not have freed enough.
        assert plan_merge(groups, deficit, model, max_merges=plan.num_merges - 1).freed_bytes < deficit
        # Fewest stages: merging the smallest first keeps the groups within a factor 2 in size.
        stages = max(len(m.ranks) for m in plan.merges)
        assert all(len(m.ranks) * 2 >= stages for m in plan.merges)


def test_balanced_ranges_refuse_impossible_splits() -> None:
    assert balanced_ranges(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(ValueError):
        balanced_ranges(2, 3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 3.0), st.integers(0, 50)), min_size=1, max_size=60))
def test_calm_watch_keeps_falling_as_the_window_scan_would(samples: list[tuple[float, int]]) -> None:
    """The watch counts rises as samples come and go instead of scanning its window: it must
    answer as the scan does, sample after sample."""
    cfg = TriggerConfig(calm_window_s=2.0)
    watch, now = CalmWatch(cfg), 0.0
    for gap, used in samples:
        now += gap
        calm = watch.observe(now, KVLoad(used, 1000, 0, 0), 10_000)
        h = list(watch.history)
        falling = all(b[1] <= a[1] for a, b in zip(h, h[1:]))
        assert calm == (falling and h[0][0] <= now - cfg.calm_window_s and used < cfg.calm_fraction * 10_000)
