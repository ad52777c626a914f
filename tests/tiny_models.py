"""Small random-weight Hugging Face models, saved as real safetensors directories.

Each variant covers an axis of the Llama family: grouped-query vs multi-head attention, tied vs
untied embeddings, q/k/v bias (Qwen2), Mistral, and Llama 3 rope scaling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

BASE: dict[str, Any] = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)

VARIANTS: dict[str, dict[str, Any]] = {
    "llama-gqa-tied": dict(arch="llama", tie_word_embeddings=True),
    "llama-mha-untied": dict(arch="llama", num_key_value_heads=4, tie_word_embeddings=False),
    "llama3-rope-scaling": dict(arch="llama", tie_word_embeddings=False, rope_theta=500000.0,
                                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=64)),
    "qwen2-bias": dict(arch="qwen2", tie_word_embeddings=True, num_attention_heads=8, num_key_value_heads=2,
                       hidden_size=64, head_dim=8),
    "mistral": dict(arch="mistral", tie_word_embeddings=False, sliding_window=None),
    # Parameters weigh more than KV here, as in real models: dropping half of them frees much.
    "llama-4l-heavy": dict(arch="llama", tie_word_embeddings=False, num_hidden_layers=4, hidden_size=128,
                           intermediate_size=384),
}


def make_tiny_model(root: Path, variant: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write the variant to root/variant (once) and return the directory."""
    import transformers

    out = root / variant
    if (out / "config.json").is_file():
        return out
    spec = dict(BASE)
    spec.update(VARIANTS[variant])
    arch = spec.pop("arch")
    cls_cfg, cls_model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    config = cls_cfg(**spec)
    model = cls_model(config).to(dtype).eval()
    with torch.no_grad():  # larger weights than the default init, so logits are not all near 0
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 2:
                p.normal_(0, 2.0 / p.shape[1] ** 0.5)
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    return out


def hf_model(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
