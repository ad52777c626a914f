"""`engine/sizing.py` agrees to the page with a real `DevicePool` (and its BlockManager)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kunlite.config import ModelConfig
from kunlite.engine.block_manager import BlockManager
from kunlite.engine.memory import DevicePool, PoolError
from kunlite.engine.model import param_groups
from kunlite.engine.sizing import dropped_sizing, model_params, pool_sizing
from tiny_models import VARIANTS, make_tiny_model

DTYPES = {2: torch.bfloat16, 4: torch.float32}


def real_pool(cfg: ModelConfig, layers: tuple[int, int], elem: int, page_size: int, budget: int) -> DevicePool:
    """A pool built the way ModelRunner builds one (no weights loaded, nothing zeroed)."""
    pb = 2 * page_size * cfg.num_kv_heads * cfg.head_dim * elem
    return DevicePool(num_pages=budget // pb, page_size=page_size, num_kv_heads=cfg.num_kv_heads,
                      head_dim=cfg.head_dim, dtype=DTYPES[elem], device=torch.device("cpu"),
                      groups=param_groups(cfg, layers))


def assert_matches(cfg: ModelConfig, layers: tuple[int, int], elem: int, page_size: int, budget: int) -> None:
    s = pool_sizing(cfg, layers, elem_bytes=elem, page_size=page_size, device_memory=budget)
    try:
        pool = real_pool(cfg, layers, elem, page_size, budget)
    except PoolError:
        assert not s.fits
        return
    assert s.fits
    assert s.num_pages == pool.num_pages
    assert s.page_bytes == pool.page_bytes
    assert s.param_pages == pool.param_pages
    assert s.kv_pages == pool.kv_pages == len(pool.initial_kv_pages())
    assert [(g.name, g.pages) for g in s.groups] == [(n, g.num_pages) for n, g in pool.layouts.items()]
    kv = BlockManager(page_size=page_size, layers_per_block=layers[1] - layers[0],
                      pages=pool.initial_kv_pages(), enable_prefix_caching=False)
    assert s.kv_blocks == kv.num_total_blocks
    assert s.kv_tokens == kv.num_total_blocks * page_size
    # Dropping layers frees exactly the pages the pool hands over.
    drop = dropped_sizing(cfg, layers, elem_bytes=elem, page_size=page_size)
    assert drop.pages == sum(len(pool.drop(g)) for g in list(pool.layouts) if g.startswith("layer."))
    assert drop.bytes == drop.pages * pool.page_bytes
    assert pool.kv_pages == s.kv_pages + drop.pages


@pytest.fixture(scope="module")
def tiny_configs(tiny_root: Path) -> dict[str, ModelConfig]:
    return {v: ModelConfig.from_pretrained(make_tiny_model(tiny_root, v)) for v in VARIANTS}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_tiny_models_match_the_real_pool(tiny_configs: dict[str, ModelConfig], data: st.DataObject) -> None:
    cfg = tiny_configs[data.draw(st.sampled_from(sorted(tiny_configs)))]
    l0 = data.draw(st.integers(0, cfg.num_layers - 1))
    l1 = data.draw(st.integers(l0 + 1, cfg.num_layers))
    elem = data.draw(st.sampled_from([2, 4]))
    page_size = data.draw(st.sampled_from([1, 4, 16, 32]))
    budget = data.draw(st.integers(0, 4 << 20))
    assert_matches(cfg, (l0, l1), elem, page_size, budget)


@pytest.mark.parametrize("layers", [(0, 30), (0, 1), (0, 10), (10, 20), (29, 30), (15, 30)])
@pytest.mark.parametrize("extra", [1, 4 << 20, 37 << 20])
def test_smollm2_matches_the_real_pool(smollm2: Path, layers: tuple[int, int], extra: int) -> None:
    cfg = ModelConfig.from_pretrained(smollm2)
    need = pool_sizing(cfg, layers, elem_bytes=2, page_size=16, device_memory=0)
    budget = need.param_pages * need.page_bytes + extra  # the parameters and a few KV pages
    assert_matches(cfg, layers, 2, 16, budget)
    assert_matches(cfg, layers, 2, 16, budget - extra)  # no KV page left: refused by both


def test_smollm2_parameter_count(smollm2: Path) -> None:
    cfg = ModelConfig.from_pretrained(smollm2)
    assert model_params(cfg) == 134_515_008  # SmolLM2-135M, tied embeddings counted once


def test_pool_sizing_rejects_a_bad_range(tiny_configs: dict[str, ModelConfig]) -> None:
    cfg = tiny_configs["llama-gqa-tied"]
    with pytest.raises(ValueError):
        pool_sizing(cfg, (2, 2), elem_bytes=2, page_size=16, device_memory=1 << 20)
    with pytest.raises(ValueError):
        pool_sizing(cfg, (0, cfg.num_layers + 1), elem_bytes=2, page_size=16, device_memory=1 << 20)
