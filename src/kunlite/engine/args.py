"""Engine options: one set of command-line flags (shared by generate, serve and bench) and one
keyword API (the offline LLM), both ending in a frozen EngineConfig."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, fields

from kunlite.config import (CacheConfig, ConfigError, DeviceConfig, EngineConfig, ModelConfig,
                            SchedulerConfig, parse_size)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    model: str | None = None  # None: the default model (SmolLM2-135M-Instruct), pulled on first use
    device: str = "cpu"
    dtype: str = "auto"
    threads: int | None = None
    attention_backend: str = "auto"
    page_size: int = 16
    device_memory: str | int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 64
    max_model_len: int | None = None
    preemption_mode: str = "recompute"
    seed: int = 0
    layer_range: tuple[int, int] | None = None  # a pipeline stage's layers; None: the whole model

    def build(self) -> EngineConfig:
        from kunlite.engine.pull import resolve_model

        model_dir = resolve_model(self.model)
        model = ModelConfig.from_pretrained(model_dir)
        max_len = min(self.max_model_len or model.max_position_embeddings, model.max_position_embeddings)
        if self.max_model_len and self.max_model_len > model.max_position_embeddings:
            raise ConfigError(f"--max-model-len {self.max_model_len} exceeds the model's "
                              f"max_position_embeddings {model.max_position_embeddings}")
        window = model.sliding_window
        if window is not None and max_len > window:
            # Attention here is full attention, which equals sliding-window attention while a
            # sequence fits the window: so sequences are kept within it (older vLLM did the same).
            if self.max_model_len:
                raise ConfigError(f"--max-model-len {self.max_model_len} exceeds the model's sliding window "
                                  f"{window}, which kunlite does not implement; use at most {window}")
            log.warning("max model len capped to the model's sliding window, %d tokens (sliding-window "
                        "attention is not implemented)", window)
            max_len = window
        if self.layer_range is not None:
            l0, l1 = self.layer_range
            if not 0 <= l0 < l1 <= model.num_layers:
                raise ConfigError(f"layer range {self.layer_range} is not inside [0, {model.num_layers})")
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = 512 if self.enable_chunked_prefill else max_len
        return EngineConfig(
            model_dir=str(model_dir), model=model, seed=self.seed, layer_range=self.layer_range,
            cache=CacheConfig(page_size=self.page_size,
                              device_memory=parse_size(self.device_memory) if self.device_memory else None,
                              enable_prefix_caching=self.enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=self.max_num_seqs,
                                      max_model_len=max_len, enable_chunked_prefill=self.enable_chunked_prefill,
                                      preemption_mode=self.preemption_mode),
            device=DeviceConfig(device=self.device, dtype=self.dtype, threads=self.threads,
                                attention_backend=self.attention_backend))


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF model directory, or 'smollm2' (default)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA and on CPUs with bf16 units, else fp32), "
                   "float32, bfloat16, float16")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for the engine worker")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    g.add_argument("--device-memory", default=None, help="bytes for the unified pool, e.g. 4GiB")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--preemption-mode", default="recompute", choices=["recompute"])
    g.add_argument("--seed", type=int, default=0)


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    return EngineOptions(**{f.name: getattr(args, f.name) for f in fields(EngineOptions) if hasattr(args, f.name)})
