"""Load checkpoint tensors from safetensors into the pool views, by group.

Every checkpoint tensor maps to a `Target`: the pool group and parameter it fills, and the rows
of that parameter it covers (q, k and v fill three row ranges of qkv_proj; gate and up fill two
of gate_up_proj). Start-up loads every resident group; restoring a dropped layer loads just that
group, from the same memory-mapped files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from kunlite.config import ConfigError, ModelConfig
from kunlite.engine.memory import DevicePool, PoolError
from kunlite.engine.model import layer_group


@dataclass(frozen=True)
class Target:
    group: str
    param: str
    rows: tuple[int, int] | None = None  # the checkpoint tensor fills param[rows[0]:rows[1]]


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Checkpoint entries that carry nothing kunlite needs (older Llama checkpoints store these).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def checkpoint_targets(cfg: ModelConfig) -> dict[str, Target]:
    """Every checkpoint tensor name this architecture expects, and where it goes."""
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    t: dict[str, Target] = {"model.embed_tokens.weight": Target("embed", "embed_tokens.weight"),
                            "model.norm.weight": Target("head", "norm.weight")}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = Target("head", "lm_head.weight")
    for i in range(cfg.num_layers):
        g, p = layer_group(i), f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = Target(g, "input_layernorm.weight")
        t[p + "post_attention_layernorm.weight"] = Target(g, "post_attention_layernorm.weight")
        for name, rows in (("q", (0, q)), ("k", (q, q + kv)), ("v", (q + kv, q + 2 * kv))):
            t[p + f"self_attn.{name}_proj.weight"] = Target(g, "qkv_proj.weight", rows)
            if cfg.attention_bias:
                t[p + f"self_attn.{name}_proj.bias"] = Target(g, "qkv_proj.bias", rows)
        t[p + "self_attn.o_proj.weight"] = Target(g, "o_proj.weight")
        t[p + "mlp.gate_proj.weight"] = Target(g, "gate_up_proj.weight", (0, inter))
        t[p + "mlp.up_proj.weight"] = Target(g, "gate_up_proj.weight", (inter, 2 * inter))
        t[p + "mlp.down_proj.weight"] = Target(g, "down_proj.weight")
    return t


def safetensors_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, for a single model.safetensors or a sharded one with its index."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir} holds no .safetensors files")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            out.update({name: f for name in fh.keys()})
    return out


class WeightLoader:
    def __init__(self, model_dir: str | Path, cfg: ModelConfig) -> None:
        self.model_dir = Path(model_dir)
        self.cfg = cfg
        self.targets = checkpoint_targets(cfg)
        self.files = safetensors_index(self.model_dir)
        self._check_names()

    def _check_names(self) -> None:
        names = {n for n in self.files if not _IGNORED.search(n)}
        if self.cfg.tie_word_embeddings:
            names.discard("lm_head.weight")  # some tied checkpoints still store a copy
        unexpected = sorted(names - self.targets.keys())
        missing = sorted(self.targets.keys() - names)
        if unexpected:
            raise ConfigError(f"unexpected tensor {unexpected[0]!r} in {self.model_dir} "
                              f"({len(unexpected)} unexpected in all) for {self.cfg.architecture}")
        if missing:
            raise ConfigError(f"missing tensor {missing[0]!r} in {self.model_dir} "
                              f"({len(missing)} missing in all)")

    def load(self, pool: DevicePool, groups: Iterable[str] | None = None) -> None:
        """Fill the given groups (all resident ones by default) from the checkpoint. Only pages
        that hold parameters are ever written: a dropped group's pages belong to the KV side,
        and asking for one is an error."""
        wanted = {g for g in pool.layouts if pool.is_resident(g)} if groups is None else set(groups)
        dropped = sorted(g for g in wanted if g in pool.layouts and not pool.is_resident(g))
        if dropped:
            raise PoolError(f"cannot load {dropped}: dropped, their pages hold KV (restore them first)")
        by_file: dict[Path, list[str]] = {}
        for name, target in self.targets.items():
            if target.group in wanted and target.group in pool.layouts:
                by_file.setdefault(self.files[name], []).append(name)
        for path, names in by_file.items():
            with safe_open(path, framework="pt") as fh:
                for name in names:
                    self._copy(pool, name, fh.get_tensor(name))

    def _copy(self, pool: DevicePool, name: str, tensor: torch.Tensor) -> None:
        target = self.targets[name]
        dst = pool.view(target.group, target.param)
        if target.rows is not None:
            dst = dst[target.rows[0] : target.rows[1]]
        if tuple(tensor.shape) != tuple(dst.shape):
            raise ConfigError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(tensor)
