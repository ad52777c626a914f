"""Convert a llama-architecture GGUF file into a normal Hugging Face Llama directory.

The output directory holds float32 `model.safetensors`, `config.json`,
`generation_config.json`, `tokenizer.json`, `tokenizer_config.json` and
`chat_template.jinja`, and loads with `transformers.AutoModelForCausalLM` /
`AutoTokenizer`.

Two GGUF conventions are undone here:
- shapes: GGUF lists dimensions in ggml `ne` order (fastest first), the reverse of numpy/HF;
  a row-major `(out_features, in_features)` HF weight appears as `[in, out]` in GGUF.
- rope layout: llama.cpp's converter permutes the rows of `attn_q` / `attn_k` so that the two
  halves of each head interleave (its rope rotates adjacent pairs, HF's rotates halves).
  `unpermute_qk` is the exact inverse of that `permute`.

Nothing here imports torch: `python -m kunlite pull` stays light.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize

# GGUF block-tensor stem -> HF module path inside `model.layers.N.`
_BLOCK_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# GGUF top-level stem -> HF module path
_TOP_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


@dataclass(frozen=True)
class LlamaHParams:
    """The architecture numbers a Llama config needs, read from GGUF metadata."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float


@dataclass(frozen=True)
class TokenizerOverrides:
    """Corrections to GGUF tokenizer metadata, applied per model.

    GGUF files often carry llama.cpp-specific values (e.g. SmolLM2's says eos = bos = 1 and
    add_bos_token = true) where the upstream HF tokenizer differs; None keeps the GGUF value.
    """

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool | None = None


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """Return the decoded value of metadata `key`, or `default` when absent."""
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _f32(value: float) -> float:
    """The shortest decimal that round-trips a float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def read_hparams(reader: GGUFReader) -> LlamaHParams:
    """Read the Llama hyperparameters; raises ValueError for a non-llama GGUF."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} (only 'llama')")
    p = "llama."
    n_head = int(_field(reader, p + "attention.head_count"))
    hidden = int(_field(reader, p + "embedding_length"))
    vocab = _field(reader, p + "vocab_size")
    if vocab is None:
        vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    return LlamaHParams(
        hidden_size=hidden,
        num_hidden_layers=int(_field(reader, p + "block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(_field(reader, p + "attention.head_count_kv", n_head)),
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        head_dim=int(_field(reader, p + "attention.key_length", hidden // n_head)),
        vocab_size=int(vocab),
        max_position_embeddings=int(_field(reader, p + "context_length")),
        rope_theta=_f32(_field(reader, p + "rope.freq_base", 10000.0)),
        rms_norm_eps=_f32(_field(reader, p + "attention.layer_norm_rms_epsilon")),
    )


def hf_tensor_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to its HF Llama name (`blk.3.attn_q.weight` -> ...q_proj.weight)."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    if len(parts) == 1 and stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    raise ValueError(f"unknown GGUF tensor name {gguf_name!r}")


def expected_shapes(hp: LlamaHParams, *, tied: bool) -> dict[str, tuple[int, ...]]:
    """The HF name -> shape of every weight of a Llama with these hyperparameters."""
    q_out = hp.num_attention_heads * hp.head_dim
    kv_out = hp.num_key_value_heads * hp.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (hp.vocab_size, hp.hidden_size),
        "model.norm.weight": (hp.hidden_size,),
    }
    if not tied:
        shapes["lm_head.weight"] = (hp.vocab_size, hp.hidden_size)
    for i in range(hp.num_hidden_layers):
        layer = f"model.layers.{i}."
        shapes[layer + "self_attn.q_proj.weight"] = (q_out, hp.hidden_size)
        shapes[layer + "self_attn.k_proj.weight"] = (kv_out, hp.hidden_size)
        shapes[layer + "self_attn.v_proj.weight"] = (kv_out, hp.hidden_size)
        shapes[layer + "self_attn.o_proj.weight"] = (hp.hidden_size, q_out)
        shapes[layer + "mlp.gate_proj.weight"] = (hp.intermediate_size, hp.hidden_size)
        shapes[layer + "mlp.up_proj.weight"] = (hp.intermediate_size, hp.hidden_size)
        shapes[layer + "mlp.down_proj.weight"] = (hp.hidden_size, hp.intermediate_size)
        shapes[layer + "input_layernorm.weight"] = (hp.hidden_size,)
        shapes[layer + "post_attention_layernorm.weight"] = (hp.hidden_size,)
    return shapes


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert's `permute`: HF row layout -> GGUF row layout.

    Within each head, HF rows are [first half | second half] of the rotary pairs; GGUF rows
    interleave them (h0, h_half, h1, h_half+1, ...). `n_head` is the head count of this
    projection: num_attention_heads for q, num_key_value_heads for k.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Exact inverse of `permute_qk`: GGUF row layout -> HF row layout."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor: ReaderTensor) -> np.ndarray:
    """Dequantize one GGUF tensor to a float32 array in numpy (HF) dimension order."""
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF ne order is reversed
    qtype = GGMLQuantizationType(tensor.tensor_type)
    out = np.asarray(dequantize(np.asarray(tensor.data), qtype), dtype=np.float32)
    if out.size != int(np.prod(shape)):
        raise ValueError(f"{tensor.name}: {out.size} values, expected shape {shape}")
    return out.reshape(shape)


def convert_tensors(
    reader: GGUFReader,
    hp: LlamaHParams,
    progress: Callable[[Iterable[ReaderTensor]], Iterable[ReaderTensor]] = lambda it: it,
) -> dict[str, np.ndarray]:
    """All tensors as HF-named, HF-laid-out float32 arrays; every name and shape verified."""
    weights: dict[str, np.ndarray] = {}
    for tensor in progress(reader.tensors):
        name = hf_tensor_name(tensor.name)
        w = dequantize_tensor(tensor)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, hp.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, hp.num_key_value_heads)
        weights[name] = np.ascontiguousarray(w)
    tied = "lm_head.weight" not in weights
    want = expected_shapes(hp, tied=tied)
    if set(weights) != set(want):
        missing, extra = sorted(set(want) - set(weights)), sorted(set(weights) - set(want))
        raise ValueError(f"tensor set mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in want.items():
        if weights[name].shape != shape:
            raise ValueError(f"{name}: shape {weights[name].shape}, expected {shape}")
    return weights


def hf_config(hp: LlamaHParams, *, tied: bool, bos_id: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    """A transformers `LlamaConfig` as JSON-ready dict (float32 weights)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp.hidden_size,
        "intermediate_size": hp.intermediate_size,
        "num_hidden_layers": hp.num_hidden_layers,
        "num_attention_heads": hp.num_attention_heads,
        "num_key_value_heads": hp.num_key_value_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": hp.max_position_embeddings,
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "vocab_size": hp.vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def build_tokenizer(reader: GGUFReader) -> Any:
    """A `tokenizers.Tokenizer` equal to the HF byte-level BPE the GGUF vocabulary came from."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (only byte-level BPE 'gpt2')")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre_by_name = {
        "smollm": [pre_tokenizers.Digits(individual_digits=True), byte_level],
        "default": [byte_level],
        "gpt2": [byte_level],
    }
    if pre not in pre_by_name:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (known: {sorted(pre_by_name)})")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(types) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens or mismatched token types")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre_by_name[pre])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [t for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL]
    # Control tokens already have vocab ids; adding them as special keeps those ids and makes
    # the tokenizer match them whole before pre-tokenization (and skip them on decode).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if any(tok.token_to_id(t) != vocab[t] for t in control):  # special tokens keep GGUF ids
        raise ValueError("control tokens changed ids when added as special tokens")
    return tok


def tokenizer_files(
    reader: GGUFReader, hp: LlamaHParams, overrides: TokenizerOverrides
) -> tuple[Any, dict[str, Any], dict[str, int]]:
    """The tokenizer, `tokenizer_config.json` and the special token ids for the model config."""
    tok = build_tokenizer(reader)
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))

    def pick(override: str | None, key: str) -> str | None:
        if override is not None:
            return override
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[int(idx)]

    bos = pick(overrides.bos_token, "bos")
    eos = pick(overrides.eos_token, "eos")
    pad = pick(overrides.pad_token, "padding") or eos
    unk = pick(overrides.unk_token, "unknown")
    add_bos = overrides.add_bos_token
    if add_bos is None:
        add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    chat_template = _field(reader, "tokenizer.chat_template")
    special = [t for t in (bos, eos, pad, unk) if t is not None]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "additional_special_tokens": [t for t in (bos, eos) if t is not None],
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp.max_position_embeddings,
        "vocab_size": hp.vocab_size,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    ids = {name: tok.token_to_id(t) for name, t in zip(("bos", "eos", "pad"), (bos, eos, pad))}
    if any(tok.token_to_id(t) is None for t in special):
        raise ValueError(f"special token not in vocabulary: {special}")
    return tok, config, ids


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_dir(
    gguf_path: Path,
    out_dir: Path,
    *,
    overrides: TokenizerOverrides = TokenizerOverrides(),
    progress: Callable[[Iterable[ReaderTensor]], Iterable[ReaderTensor]] = lambda it: it,
) -> None:
    """Convert `gguf_path` into HF files under `out_dir` (which must exist)."""
    from safetensors.numpy import save_file

    reader = GGUFReader(gguf_path)
    hp = read_hparams(reader)
    tok, tok_config, ids = tokenizer_files(reader, hp, overrides)
    weights = convert_tensors(reader, hp, progress)
    tied = "lm_head.weight" not in weights
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del weights
    config = hf_config(hp, tied=tied, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"])
    _write_json(out_dir / "config.json", config)
    generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    _write_json(out_dir / "generation_config.json", generation)
    tok.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    if "chat_template" in tok_config:
        (out_dir / "chat_template.jinja").write_text(tok_config["chat_template"], encoding="utf-8")
