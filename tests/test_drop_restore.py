"""Drop and restore on a real engine: generation is unchanged.

Mid-generation, a range of layers is dropped: its parameter pages become KV. A foreign sequence
(standing for KV that another stage sends here) takes blocks on those very pages and fills them.
Restore must then move that live KV elsewhere, byte for byte, reload the weights from the
safetensors files, and leave every page accounted for; the paused requests then finish with the
same tokens as a run that never dropped anything.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kunlite.engine.args import EngineOptions
from kunlite.engine.core import EngineCore
from kunlite.engine.memory import PoolError
from kunlite.engine.messages import EngineRequest
from kunlite.engine.model import LayerDroppedError
from kunlite.sampling_params import SamplingParams
from tiny_models import make_tiny_model

PROMPTS = [[5, 9, 11, 30, 31, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [3]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def new_core(path: Path) -> EngineCore:
    core = EngineCore(EngineOptions(model=str(path), device_memory="8MiB", page_size=4, dtype="float32",
                                    max_num_batched_tokens=8).build())
    for i, p in enumerate(PROMPTS):
        core.add_request(EngineRequest(f"r{i}", p, GREEDY, time.time()))
    return core


def finish(core: EngineCore, tokens: dict[str, list[int]]) -> dict[str, list[int]]:
    while core.has_unfinished:
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


@settings(max_examples=6, deadline=None)
@given(drop_after=st.integers(0, 6), first=st.integers(0, 2), count=st.integers(1, 3), extra=st.integers(0, 3))
def test_drop_then_restore_leaves_generation_unchanged(tiny_root: Path, drop_after: int, first: int,
                                                        count: int, extra: int) -> None:
    path = make_tiny_model(tiny_root, "llama-gqa-tied")
    layers = range(first, min(first + count, 3))
    want = finish(new_core(path), {})

    core = new_core(path)
    runner, kv, pool = core.runner, core.kv, core.runner.pool
    params0, kv_pages0, blocks0 = pool.param_pages, kv.num_kv_pages, kv.num_total_blocks
    got: dict[str, list[int]] = {}
    for _ in range(drop_after):
        for out in core.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)

    freed = runner.drop_layers(layers, kv)
    assert pool.param_pages == params0 - freed and kv.num_kv_pages == kv_pages0 + freed
    dropped = {p for i in layers for p in pool.group_pages(f"layer.{i}")}

    # A foreign sequence lands on the dropped pages (new blocks are used first) and fills them.
    n_blocks = freed // kv.layers_per_block + extra
    assert kv.can_allocate("foreign", n_blocks * kv.page_size)
    kv.allocate("foreign", n_blocks * kv.page_size)
    foreign_pages = kv.block_pages[kv.tables["foreign"]]  # (n_blocks, L)
    assert dropped & {int(p) for p in foreign_pages.flat}
    noise = torch.randn(pool.kv_cache[torch.from_numpy(foreign_pages.reshape(-1).astype("int64"))].shape)
    pool.kv_cache[torch.from_numpy(foreign_pages.reshape(-1).astype("int64"))] = noise
    kv.check()

    assert runner.can_restore(layers, kv)
    moved = runner.restore_layers(layers, kv)
    assert moved > 0
    after = kv.block_pages[kv.tables["foreign"]]  # (n_blocks, L)
    assert not dropped & {int(p) for p in after.flat}
    assert torch.equal(pool.kv_cache[torch.from_numpy(after.reshape(-1).astype("int64"))], noise)
    kv.free("foreign")
    kv.check()
    assert (pool.param_pages, kv.num_kv_pages, kv.num_total_blocks) == (params0, kv_pages0, blocks0)

    assert finish(core, got) == want
    assert kv.num_used_blocks == 0


def test_a_dropped_layer_is_never_run_nor_reloaded_over_kv(tiny_root: Path) -> None:
    """After a drop, the layer's pages belong to the KV side: a step that would run the layer
    is refused with a clear error, and reloading the weights leaves those pages alone."""
    path = make_tiny_model(tiny_root, "llama-gqa-tied")
    core = new_core(path)
    runner, kv, pool = core.runner, core.kv, core.runner.pool
    core.step()
    runner.drop_layers(range(1, 2), kv)
    dropped = torch.from_numpy(np.asarray(pool.group_pages("layer.1"), dtype=np.int64))
    pool.kv_cache[dropped] = 7.0  # KV written into the freed pages
    with pytest.raises(LayerDroppedError, match="layer.1"):
        core.step()
    runner.loader.load(pool)  # every resident group: not layer.1
    assert bool((pool.kv_cache[dropped] == 7.0).all())
    with pytest.raises(PoolError, match="layer.1"):
        runner.loader.load(pool, ["layer.1"])
    assert bool((pool.kv_cache[dropped] == 7.0).all())
