"""Tests for `kunlite.engine.pull` and `kunlite.engine.gguf_convert`.

Offline tests use a tiny synthetic llama GGUF written with gguf's own writer. The end-to-end
tests pull the real SmolLM2-135M-Instruct once per session (fixture `smollm2_dir`) into the
shared cache (`$KUNLITE_HOME`, default ~/.cache/kunlite); later sessions reuse it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, NoReturn

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from kunlite.engine import gguf_convert as gc
from kunlite.engine import pull as pull_mod

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TINY = gc.LlamaHParams(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=48, head_dim=8, vocab_size=0, max_position_embeddings=64,
    rope_theta=10000.0, rms_norm_eps=1e-5,
)  # vocab_size is filled in by _tiny_vocab


def _tiny_vocab() -> tuple[list[str], list[str]]:
    """Control tokens, the 256 byte-level symbols and a few merged tokens."""
    from tokenizers import pre_tokenizers

    merges = ["h e", "l l", "he ll", "Ġ w"]
    tokens = CONTROL + sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in merges]
    return tokens, merges


def _write_tiny_gguf(path: Path, weights: dict[str, np.ndarray], hp: gc.LlamaHParams) -> None:
    """Write HF-layout `weights` as llama.cpp's converter would: renamed, q/k rows permuted,
    all F32 except layer-0 v_proj in Q8_0."""
    hf_to_gguf = {gc.hf_tensor_name(g): g for g in _gguf_names(hp)}
    tokens, merges = _tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(hp.num_hidden_layers)
    w.add_context_length(hp.max_position_embeddings)
    w.add_embedding_length(hp.hidden_size)
    w.add_feed_forward_length(hp.intermediate_size)
    w.add_head_count(hp.num_attention_heads)
    w.add_head_count_kv(hp.num_key_value_heads)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hp.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in CONTROL else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(1)  # wrong on purpose, like the real SmolLM2 GGUF; overrides fix it
    w.add_add_bos_token(True)
    w.add_chat_template(TEMPLATE)
    for name, arr in weights.items():
        if name.endswith("q_proj.weight"):
            arr = gc.permute_qk(arr, hp.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            arr = gc.permute_qk(arr, hp.num_key_value_heads)
        if name == "model.layers.0.self_attn.v_proj.weight":
            w.add_tensor(hf_to_gguf[name], gguf.quants.quantize(arr, QT.Q8_0), raw_dtype=QT.Q8_0)
        else:
            w.add_tensor(hf_to_gguf[name], arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_names(hp: gc.LlamaHParams) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"]
    stems = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    stems += ["attn_norm", "ffn_norm"]
    return names + [f"blk.{i}.{s}.weight" for i in range(hp.num_hidden_layers) for s in stems]


TinyModel = tuple[Path, dict[str, np.ndarray], gc.LlamaHParams]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny GGUF on disk, the HF weights it was made from, and its hyperparameters."""
    hp = dataclasses.replace(TINY, vocab_size=len(_tiny_vocab()[0]))
    rng = np.random.default_rng(0)
    shapes = gc.expected_shapes(hp, tied=True)
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    _write_tiny_gguf(path, weights, hp)
    return path, weights, hp


# --- rope permutation -----------------------------------------------------------------------


@pytest.mark.parametrize("n_head,rows", [(9, 576), (3, 192), (1, 4)])
def test_unpermute_inverts_llama_cpp_permute(n_head: int, rows: int) -> None:
    w = np.random.default_rng(n_head).standard_normal((rows, 7)).astype(np.float32)
    assert np.array_equal(gc.unpermute_qk(gc.permute_qk(w, n_head), n_head), w)
    assert np.array_equal(gc.permute_qk(gc.unpermute_qk(w, n_head), n_head), w)


def test_permute_interleaves_the_two_halves_of_each_head() -> None:
    rows = np.arange(8)  # two heads of head_dim 4: HF [a0 a1 | b0 b1] -> GGUF [a0 b0 a1 b1]
    assert gc.permute_qk(rows, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert gc.unpermute_qk(np.array([0, 2, 1, 3, 4, 6, 5, 7]), 2).tolist() == list(range(8))


def test_unpermuted_q_gives_hf_rope_equal_to_llama_cpp_rope() -> None:
    """HF rotates (x_i, x_{i+d/2}) pairs; llama.cpp rotates adjacent pairs of permuted rows."""
    n_head, d, hidden, pos = 3, 8, 5, 7
    rng = np.random.default_rng(1)
    w_hf = rng.standard_normal((n_head * d, hidden))
    x = rng.standard_normal(hidden)
    theta = pos * 10000.0 ** (-np.arange(d // 2) * 2 / d)
    cos, sin = np.cos(theta), np.sin(theta)
    q = (w_hf @ x).reshape(n_head, d)
    a, b = q[:, : d // 2], q[:, d // 2 :]
    hf = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=1)
    qp = (gc.permute_qk(w_hf, n_head) @ x).reshape(n_head, d // 2, 2)
    even, odd = qp[..., 0] * cos - qp[..., 1] * sin, qp[..., 1] * cos + qp[..., 0] * sin
    assert np.allclose(gc.unpermute_qk(np.stack([even, odd], -1).reshape(n_head * d), n_head), hf.reshape(-1))


# --- dequantization -------------------------------------------------------------------------


def test_dequantize_hand_built_q4_1_and_q8_0_blocks(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    # Q4_1 block of 32: f16 d, f16 m, 16 bytes; low nibbles are elements 0..15, high 16..31.
    d, m = np.float16(0.25), np.float16(-1.5)
    qs = rng.integers(0, 256, size=(2, 16), dtype=np.uint8)  # 2 rows x 1 block
    q41 = np.concatenate([np.tile(np.frombuffer(d.tobytes() + m.tobytes(), np.uint8), (2, 1)), qs], 1)
    want41 = np.float32(d) * np.concatenate([qs & 0xF, qs >> 4], 1).astype(np.float32) + np.float32(m)
    # Q8_0 block of 32: f16 d, 32 int8.
    d8 = np.float16(0.125)
    q8 = rng.integers(-128, 128, size=(3, 32), dtype=np.int8)
    q80 = np.concatenate([np.tile(np.frombuffer(d8.tobytes(), np.uint8), (3, 1)), q8.view(np.uint8)], 1)
    want80 = np.float32(d8) * q8.astype(np.float32)

    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tensor("a", q41, raw_dtype=QT.Q4_1)
    w.add_tensor("b", q80, raw_dtype=QT.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert list(tensors["a"].shape) == [32, 2]  # GGUF ne order: reversed
    got41, got80 = gc.dequantize_tensor(tensors["a"]), gc.dequantize_tensor(tensors["b"])
    assert got41.shape == (2, 32) and got41.dtype == np.float32 and np.array_equal(got41, want41)
    assert got80.shape == (3, 32) and np.array_equal(got80, want80)


# --- conversion of a tiny synthetic model ---------------------------------------------------


def test_convert_tiny_gguf_roundtrips_weights_config_and_tokenizer(tiny_model: TinyModel, tmp_path: Path) -> None:
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    path, weights, hp = tiny_model
    overrides = pull_mod.MODELS["smollm2"].overrides
    gc.write_hf_dir(path, tmp_path, overrides=overrides)
    got = load_file(str(tmp_path / "model.safetensors"))
    assert set(got) == set(weights)  # tied: no lm_head.weight
    v0 = "model.layers.0.self_attn.v_proj.weight"
    for name, arr in weights.items():
        assert got[name].dtype == np.float32 and got[name].shape == arr.shape, name
        if name != v0:
            assert np.array_equal(got[name], arr), name  # F32 path is exact, q/k included
    assert np.allclose(got[v0], weights[v0], atol=0.05)  # Q8_0 path is close

    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 8 and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["rms_norm_eps"]) == (1, 2, 1e-5)
    tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is False and tok_cfg["chat_template"] == TEMPLATE
    assert (tmp_path / "chat_template.jinja").read_text() == TEMPLATE
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    enc = tok.encode("<|im_start|>hello world 42<|im_end|>")
    want = ["<|im_start|>", "hell", "o", "Ġw", "o", "r", "l", "d", "Ġ", "4", "2", "<|im_end|>"]
    assert enc.tokens == want  # merges applied, digits split, special tokens whole
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>hello world 42<|im_end|>"


def test_unknown_tensor_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="blk.0.attn_qkv"):
        gc.hf_tensor_name("blk.0.attn_qkv.weight")
    assert gc.hf_tensor_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert gc.hf_tensor_name("output.weight") == "lm_head.weight"


# --- pull: atomic, idempotent, CLI ----------------------------------------------------------


@pytest.fixture()
def fake_fetch(tiny_model: TinyModel, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the network fetch with a copy of the tiny GGUF; returns the list of calls."""
    calls: list[Path] = []

    def fetch(spec: pull_mod.ModelSpec, workdir: Path, *, quiet: bool = False) -> Path:
        calls.append(workdir)
        target = workdir / "model.gguf"
        target.write_bytes(tiny_model[0].read_bytes())
        return target

    monkeypatch.setattr(pull_mod, "fetch_gguf", fetch)
    return calls


def _leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "models").iterdir() if not p.name.endswith(".lock"))


def test_pull_is_idempotent_and_cleans_stale_tmp(
    tmp_path: Path, fake_fetch: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "models" / ".tmp-SmolLM2-135M-Instruct-old"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    path = pull_mod.pull("smollm2", home=tmp_path, quiet=True)
    assert path == tmp_path / "models" / "SmolLM2-135M-Instruct" and pull_mod.is_complete(path)
    assert _leftovers(tmp_path) == ["SmolLM2-135M-Instruct"] and len(fake_fetch) == 1
    assert pull_mod.main(["HuggingFaceTB/SmolLM2-135M-Instruct", "--home", str(tmp_path)]) == 0
    assert len(fake_fetch) == 1  # nothing fetched the second time
    out, err = capsys.readouterr()
    assert out.strip() == str(path) and "already at" in err


@pytest.mark.parametrize("stage", ["fetch", "convert"])
def test_interrupted_pull_leaves_no_model_dir(
    tmp_path: Path, fake_fetch: list[Path], monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    def boom(*args: Any, **kwargs: Any) -> NoReturn:
        if stage == "convert":  # write part of the output, then die
            (args[1] / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(pull_mod, "fetch_gguf" if stage == "fetch" else "write_hf_dir", boom)
    with pytest.raises(KeyboardInterrupt):
        pull_mod.pull("smollm2", home=tmp_path, quiet=True)
    assert _leftovers(tmp_path) == []  # no model dir and no .tmp-* leftovers


def test_unknown_name_lists_pullable_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pull_mod.main(["llama-7b", "--home", str(tmp_path)]) == 2
    assert "smollm2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="smollm2"):
        pull_mod.pull("llama-7b", home=tmp_path)


def test_resolve_model(tmp_path: Path, fake_fetch: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pull_mod.HOME_ENV, str(tmp_path / "home"))
    cached = pull_mod.resolve_model(None)
    assert cached == tmp_path / "home" / "models" / "SmolLM2-135M-Instruct"
    assert pull_mod.resolve_model("SmolLM2-135M-Instruct") == cached and len(fake_fetch) == 1
    assert pull_mod.resolve_model(str(cached)) == cached  # a path is used as is
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="nowhere"):
        pull_mod.resolve_model(str(missing))


# --- the real model (network on first run; cached afterwards) -------------------------------


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct HF directory in the shared cache (pulled once)."""
    return pull_mod.pull(pull_mod.DEFAULT_MODEL, quiet=True)


@pytest.mark.slow
def test_real_pull_config(smollm2_dir: Path) -> None:
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    want = {
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "intermediate_size": 1536, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "head_dim": 64,
        "max_position_embeddings": 8192, "vocab_size": 49152, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "model_type": "llama", "torch_dtype": "float32",
    }
    assert {k: cfg[k] for k in want} == want
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    assert pull_mod.pull("SmolLM2-135M-Instruct", quiet=True) == smollm2_dir


@pytest.mark.slow
def test_real_tokenizer(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<|im_start|>", "<|im_end|>", 2)
    assert tok.model_max_length == 8192
    ids = tok.encode("<|im_start|>user\nHello 123<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2  # special tokens are single ids, no BOS added
    assert tok.convert_ids_to_tokens(ids)[-4:-1] == ["1", "2", "3"]  # digits split one by one
    texts = ["Plain ASCII, with  spaces\tand\nlines.", "café naïve Ærøskøbing", "emoji 🤗🚀 and 中文"]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    control = tok.convert_ids_to_tokens(list(range(17)))  # <|endoftext|> ... <empty_output>
    assert control[:3] == CONTROL and all(tok.encode(t) == [i] for i, t in enumerate(control))
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHello 123"


@pytest.mark.slow
def test_real_model_answers_paris(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
