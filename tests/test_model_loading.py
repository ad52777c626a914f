"""Loading: sharded checkpoints, clear errors, and the layer-range runner.

Two runners over [0, k) and [k, L), chained by hand (hidden states out of the first, in to the
second), must produce the logits of one runner over [0, L).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kunlite.config import ConfigError, SchedulerConfig
from kunlite.engine.args import EngineOptions
from kunlite.engine.block_manager import BlockManager
from kunlite.engine.instance import Instance, Member
from kunlite.engine.messages import EngineRequest
from kunlite.engine.preemption import RecomputePolicy
from kunlite.engine.runner import ModelRunner
from kunlite.engine.work import StageWork
from kunlite.sampling_params import SamplingParams
from tiny_models import hf_model, make_tiny_model


def config(path: Path, **kw):
    opts = dict(model=str(path), device_memory="16MiB", page_size=4, dtype="float32")
    opts.update(kw)
    return EngineOptions(**opts).build()


def test_sharded_checkpoint_with_index_loads_the_same_weights(tiny_root: Path, tmp_path: Path) -> None:
    src = make_tiny_model(tiny_root, "llama-mha-untied")
    model = hf_model(src)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a, b = ModelRunner(config(src)), ModelRunner(config(sharded))
    assert torch.equal(a.pool.storage[: a.pool.param_pages * a.pool.elems_per_page],
                       b.pool.storage[: b.pool.param_pages * b.pool.elems_per_page])


def test_missing_unexpected_and_unsupported_are_named(tiny_root: Path, tmp_path: Path) -> None:
    src = make_tiny_model(tiny_root, "llama-gqa-tied")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ConfigError, match="model.layers.1.mlp.up_proj.weight"):
        ModelRunner(config(bad))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(112, 64)
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(3)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ConfigError, match="unexpected tensor 'model.layers.1.mlp.extra.weight'"):
        ModelRunner(config(bad))
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported architecture 'GPT2LMHeadModel'"):
        config(bad)


def test_a_sliding_window_caps_the_model_length(tiny_root: Path, tmp_path: Path) -> None:
    """Full attention equals sliding-window attention only within the window."""
    windowed = tmp_path / "windowed"
    shutil.copytree(make_tiny_model(tiny_root, "llama-gqa-tied"), windowed)
    cfg = json.loads((windowed / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=40)
    (windowed / "config.json").write_text(json.dumps(cfg))
    assert cfg["max_position_embeddings"] > 40
    assert config(windowed).max_model_len == 40
    assert config(windowed, max_model_len=32).max_model_len == 32
    with pytest.raises(ConfigError, match="sliding window 40"):
        config(windowed, max_model_len=41)


@pytest.mark.parametrize("split", [1, 2])
def test_two_layer_ranges_chained_equal_the_whole_model(tiny_root: Path, split: int) -> None:
    path = make_tiny_model(tiny_root, "llama-mha-untied")
    whole = ModelRunner(config(path))
    first = ModelRunner(config(path, layer_range=(0, split)))
    second = ModelRunner(config(path, layer_range=(split, 3)))
    assert "head" not in first.pool.layouts and "embed" not in second.pool.layouts
    assert first.pool.param_pages + second.pool.param_pages <= whole.pool.param_pages + 2

    prompt = [5, 17, 33, 2, 90, 11, 7]

    def plan(members: list[Member]) -> list[StageWork]:
        inst = Instance(0, members, SchedulerConfig(max_model_len=64), RecomputePolicy(), frozenset(), 64)
        inst.add_request(EngineRequest("s", prompt, SamplingParams(temperature=0.0), time.time()))
        works = inst.plan()
        assert works is not None
        return works

    (alone,) = plan([Member(0, (0, 3), whole.new_block_manager())])
    w1, w2 = plan([Member(1, (0, split), first.new_block_manager()), Member(2, (split, 3), second.new_block_manager())])
    assert (w1.next_rank, w2.prev_rank, w1.samples, len(w2.samples)) == (2, 1, [], 1)
    want = whole.forward(whole.prepare(alone))  # (1, V)
    hidden = first.forward(first.prepare(w1))  # (T, h)
    got = second.forward(second.prepare(w2), hidden)  # (1, V)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_block_manager_of_a_stage_has_one_page_per_local_layer(tiny_root: Path) -> None:
    path = make_tiny_model(tiny_root, "llama-gqa-tied")
    stage = ModelRunner(config(path, layer_range=(1, 3)))
    kv: BlockManager = stage.new_block_manager()
    assert kv.layers_per_block == 2
