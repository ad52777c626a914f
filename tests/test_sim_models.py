"""The simulator's built-in model configs: they parse, resolve by name, and have the published
parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kunlite.engine.sizing import model_params, pool_sizing
from kunlite.sim.model_configs import HF_IDS, PUBLISHED_PARAMS, builtin_config_dict, load_model_config


@pytest.mark.parametrize("name", sorted(HF_IDS))
def test_parameter_counts_match_the_model_cards(name: str) -> None:
    cfg = load_model_config(name)
    assert model_params(cfg) == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)


@pytest.mark.parametrize("name", sorted(HF_IDS))
def test_names_ids_and_files_resolve_to_the_same_config(name: str, tmp_path: Path) -> None:
    file = tmp_path / "config.json"
    file.write_text(json.dumps(builtin_config_dict(name)))
    cfg = load_model_config(name)
    assert load_model_config(HF_IDS[name]) == cfg == load_model_config(HF_IDS[name].upper())
    assert load_model_config(str(file)) == cfg == load_model_config(str(tmp_path))
    assert cfg.sliding_window is None  # use_sliding_window is false in the Qwen configs


def test_shapes_by_hand() -> None:
    q72, l70 = load_model_config("qwen2.5-72b"), load_model_config("llama-3-70b")
    assert (q72.num_layers, q72.hidden_size, q72.num_kv_heads, q72.head_dim, q72.attention_bias) == (80, 8192, 8, 128, True)
    assert (l70.num_layers, l70.intermediate_size, l70.vocab_size, l70.attention_bias) == (80, 28672, 128256, False)
    # Llama-3-70B in bf16 does not fit one 80 GiB device; half of it does, with KV to spare.
    assert not pool_sizing(l70, (0, 80), elem_bytes=2, page_size=16, device_memory=80 << 30).fits
    half = pool_sizing(l70, (0, 40), elem_bytes=2, page_size=16, device_memory=80 << 30)
    assert half.fits and 90_000 < half.kv_tokens < 100_000  # 14 GiB of KV at 160 KiB a token


def test_unknown_name_is_an_error() -> None:
    with pytest.raises(ValueError):
        load_model_config("no-such-model")
    with pytest.raises(ValueError):
        builtin_config_dict("gpt-5")
