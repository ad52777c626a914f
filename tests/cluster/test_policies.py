"""The cluster's pure policies on plain numbers: dispatch by freeness, when to migrate and
where, and the layer split of a pipeline."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kunlite.engine.cluster.dispatch import InstanceLoad, blocks_for, choose_instance, freeness
from kunlite.engine.cluster.launch import balanced_ranges
from kunlite.engine.cluster.migrate import choose_migration, short_of_kv


def load(iid: int, used: int, waiting_blocks: int = 0, running: int = 1, waiting: int = 0, total: int = 100,
         serving: bool = True) -> InstanceLoad:
    return InstanceLoad(iid, serving, total, used, waiting_blocks, running, waiting)


def test_dispatch_goes_to_the_lowest_demand_per_request() -> None:
    # Instance 0 holds less KV but queues a big prompt: its demand is higher.
    a, b = load(0, used=20, waiting_blocks=60, waiting=1), load(1, used=50)
    assert freeness(a) == (100 - 20 - 60) / 3 and freeness(b) == (100 - 50) / 2
    assert choose_instance([a, b]) == 1
    # Equal demand: the lower id; an instance that does not serve is never chosen.
    assert choose_instance([load(0, 10), load(1, 10)]) == 0
    assert choose_instance([load(0, 10, serving=False), load(1, 90)]) == 1
    assert choose_instance([load(0, 10, serving=False)]) is None


@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 50), st.integers(0, 8), st.booleans()),
                min_size=1, max_size=6))
def test_dispatch_picks_a_serving_instance_with_the_most_freeness(specs: list[tuple[int, int, int, bool]]) -> None:
    loads = [load(i, used, wb, running=r, serving=s) for i, (used, wb, r, s) in enumerate(specs)]
    chosen = choose_instance(loads)
    serving = [x for x in loads if x.serving]
    if not serving:
        assert chosen is None
        return
    assert chosen is not None and loads[chosen].serving
    assert all(freeness(loads[chosen]) >= freeness(x) for x in serving)


def test_blocks_for_a_prompt_share_full_blocks_between_choices() -> None:
    assert blocks_for(32, 16) == 2 and blocks_for(33, 16) == 3
    assert blocks_for(33, 16, n=4) == 2 + 4  # each choice copies the partial last block


def test_migration_moves_from_a_short_instance_to_the_roomiest() -> None:
    short = load(0, used=90, waiting_blocks=30, waiting=2)  # its queue needs more than it has free
    roomy, fuller = load(1, used=10), load(2, used=40)
    assert short_of_kv(short) and not short_of_kv(roomy)
    assert choose_migration([short, roomy, fuller], lambda i: 20, set()) == (0, 1)
    # Nothing short: no migration; no candidate request, or no room for it: none either.
    assert choose_migration([roomy, fuller], lambda i: 20, set()) is None
    assert choose_migration([short, roomy], lambda i: None, set()) is None
    assert choose_migration([short, load(1, used=60)], lambda i: 50, set()) is None
    # An instance already migrating is left alone.
    assert choose_migration([short, roomy], lambda i: 20, {1}) is None


@given(st.integers(1, 80), st.integers(1, 8))
def test_balanced_ranges_cover_every_layer_once_contiguously(layers: int, stages: int) -> None:
    if stages > layers:
        return
    ranges = balanced_ranges(layers, stages)
    assert ranges[0][0] == 0 and ranges[-1][1] == layers
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
