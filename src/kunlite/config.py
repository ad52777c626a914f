"""Frozen configuration dataclasses, composed; derived values are properties.

`ModelConfig` describes the architecture (read from a Hugging Face config.json).
`CacheConfig`, `SchedulerConfig` and `DeviceConfig` hold the engine's knobs, and
`EngineConfig` composes them. Nothing here touches tensors or processes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ConfigError(ValueError):
    """A model directory or an option that kunlite cannot use; the message names what."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency-dependent rope scaling (rope_type == "llama3") or linear."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    sliding_window: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else cfg.get("model_type", "?")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch!r}; kunlite runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
            rope_type = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
            if rope_type not in ("default", "llama3", "linear"):
                raise ConfigError(f"unsupported rope_scaling type {rope_type!r}")
            scaling = RopeScaling(
                rope_type=rope_type,
                factor=float(rs.get("factor", 1.0)),
                low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
            )
            rope_theta = cfg.get("rope_theta")
            if rope_theta is None:
                rope_theta = (rs or {}).get("rope_theta", 10000.0)
            sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "MistralForCausalLM") else None
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
                rope_scaling=scaling,
                sliding_window=int(sliding) if sliding else None,
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{model_dir} has no config.json")
        return cls.from_dict(json.loads(path.read_text()))


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'4GiB' -> 4 * 2**30, '512MB' -> 512e6, 1234 -> 1234."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"cannot read the size {text!r} (examples: 4GiB, 512MiB, 2GB)")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3)) or m.group(2) == ""
    power = "KMGT".find(unit) + 1 if unit else 0
    return int(value * (1024 if binary else 1000) ** power)


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16  # tokens per KV page
    device_memory: int | None = None  # bytes for the unified pool; None picks a default per device
    enable_prefix_caching: bool = True
    swap_space: int = 0  # bytes of host memory per device for swapped-out KV (the swap policy)

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"--page-size must be a power of two, got {self.page_size}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    preemption_mode: str = "recompute"

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ConfigError("--max-num-batched-tokens and --max-num-seqs must be positive")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                "without chunked prefill, --max-num-batched-tokens must be at least --max-model-len "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"  # "cpu" or "cuda[:i]"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    threads: int | None = None  # CPU threads for the worker; None keeps torch's default
    attention_backend: str = "auto"  # auto | torch | triton

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            if self.is_cuda:
                return torch.bfloat16
            return torch.bfloat16 if _cpu_has_bf16() else torch.float32
        table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if self.dtype not in table:
            raise ConfigError(f"unknown --dtype {self.dtype!r} (auto, float32, bfloat16, float16)")
        return table[self.dtype]

    @property
    def backend_name(self) -> str:
        if self.attention_backend == "auto":
            return "triton" if self.is_cuda else "torch"
        if self.attention_backend not in ("torch", "triton"):
            raise ConfigError(f"unknown --attention-backend {self.attention_backend!r} (auto, torch, triton)")
        return self.attention_backend


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    seed: int = 0
    layer_range: tuple[int, int] | None = None  # None: the whole model [0, L)

    @property
    def layers(self) -> tuple[int, int]:
        return self.layer_range or (0, self.model.num_layers)

    @property
    def max_model_len(self) -> int:
        return min(self.scheduler.max_model_len, self.model.max_position_embeddings)
