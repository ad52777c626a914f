"""Model configs for the simulator: the built-in Hugging Face configs, or any model kunlite runs.

The files in `sim/models/` are the `config.json` of these checkpoints, unchanged (fetched
through public copies of the same files; the Meta repositories are gated):

    qwen2.5-14b   https://huggingface.co/Qwen/Qwen2.5-14B-Instruct/blob/main/config.json
    qwen2.5-72b   https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/config.json
    llama-3-8b    https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct/blob/main/config.json
    llama-3-70b   https://huggingface.co/meta-llama/Meta-Llama-3-70B-Instruct/blob/main/config.json

`PUBLISHED_PARAMS` holds the sizes their model cards state; the tests check that
`engine.sizing.model_params` lands within 1% of them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from kunlite.config import ModelConfig

HF_IDS: dict[str, str] = {
    "qwen2.5-14b": "Qwen/Qwen2.5-14B-Instruct",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B-Instruct",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B-Instruct",
}
PUBLISHED_PARAMS: dict[str, float] = {
    "qwen2.5-14b": 14.7e9,
    "qwen2.5-72b": 72.7e9,
    "llama-3-8b": 8.03e9,
    "llama-3-70b": 70.6e9,
}


def builtin_name(name: str) -> str | None:
    """The built-in name for a name or a Hugging Face id (any case), else None."""
    key = name.strip().lower()
    for short, hf_id in HF_IDS.items():
        if key in (short, hf_id.lower()):
            return short
    return None


def builtin_config_dict(name: str) -> dict:
    short = builtin_name(name)
    if short is None:
        raise ValueError(f"no built-in model {name!r} (built-in: {', '.join(HF_IDS)})")
    text = resources.files("kunlite.sim").joinpath("models", f"{short}.json").read_text(encoding="utf-8")
    return json.loads(text)


def load_model_config(name_or_path: str | None) -> ModelConfig:
    """A ModelConfig from a built-in name or HF id (`qwen2.5-72b`, `Qwen/Qwen2.5-72B-Instruct`),
    a config.json file, or anything `--model` takes (a model directory, `smollm2`, None for the
    default model, which is pulled on first use)."""
    if name_or_path is not None:
        if builtin_name(name_or_path) is not None:
            return ModelConfig.from_dict(builtin_config_dict(name_or_path))
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return ModelConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    from kunlite.engine.pull import resolve_model

    return ModelConfig.from_pretrained(resolve_model(name_or_path))
