"""The engine against Hugging Face transformers on small random-weight models.

Every architecture variant runs a batch that mixes prefill chunks and decodes (a small token
budget and page size force both). Each sampled row's logits must match HF's logits at the same
position within a stated tolerance, and greedy tokens must match exactly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from kunlite.engine.args import EngineOptions
from kunlite.engine.core import EngineCore
from kunlite.engine.messages import EngineRequest
from kunlite.sampling_params import SamplingParams
from tiny_models import VARIANTS, hf_model, make_tiny_model

# fp32 end to end; differences come only from summation order (fused q/k/v and gate/up, paged
# attention). Logits are O(1..10) for these models.
LOGIT_ATOL = 2e-4
BF16_ERROR_RATIO = 1.5  # see test_bf16_is_as_close_to_fp32_as_hf_bf16
PROMPT_LENS = (1, 5, 16, 23, 40)
NEW_TOKENS = 8


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def run_engine(model_dir: Path, prompt_ids: list[list[int]], **opts) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Greedy tokens per prompt, and the logits row each token was sampled from."""
    options = dict(device_memory="32MiB", page_size=4, max_num_batched_tokens=24, dtype="float32")
    options.update(opts)
    core = EngineCore(EngineOptions(model=str(model_dir), **options).build())
    seen: list[torch.Tensor] = []
    forward = core.runner.forward
    core.runner.forward = lambda inputs, hidden=None: seen.append(forward(inputs, hidden)) or seen[-1]  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, p in enumerate(prompt_ids):
        core.add_request(EngineRequest(f"r{i}", p, params, time.time()))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompt_ids))}
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in tokens}
    while core.has_unfinished:
        n_before = len(seen)
        outs = core.step()
        step_logits = seen[n_before] if len(seen) > n_before else None
        for row, out in enumerate(outs):
            tokens[out.request_id] += out.new_token_ids
            logits[out.request_id].append(step_logits[row])
    assert core.kv.num_used_blocks == 0
    core.kv.check()
    keys = [f"r{i}" for i in range(len(prompt_ids))]
    return [tokens[k] for k in keys], [logits[k] for k in keys]


def hf_logits(model, ids: list[int]) -> torch.Tensor:  # (len(ids), V)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(params=["cpu_decode", "torch_products"])
def products(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both CPU paths of the model's matrix products: the native decode kernels (rows <= 32) and
    torch's. Without the kernels here, the first case would not be what it says: it fails."""
    from kunlite.kernels import cpu_decode

    if request.param == "cpu_decode":
        assert cpu_decode.available(), "the CPU decode kernels did not build here"
    else:
        monkeypatch.setattr(cpu_decode, "available", lambda: False)
    return request.param


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_hf(tiny_root: Path, variant: str, products: str) -> None:
    path = make_tiny_model(tiny_root, variant)
    model = hf_model(path)
    ps = prompts(model.config.vocab_size)
    tokens, logits = run_engine(path, ps)
    for p, toks, rows in zip(ps, tokens, logits):
        ref = hf_logits(model, p + toks)  # teacher-forced on our tokens
        for j, row in enumerate(rows):
            want = ref[len(p) - 1 + j]
            torch.testing.assert_close(row, want, atol=LOGIT_ATOL, rtol=1e-4)
        with torch.no_grad():
            hf_toks = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert toks == hf_toks


def test_chunked_and_unchunked_and_page_sizes_agree(tiny_root: Path) -> None:
    path = make_tiny_model(tiny_root, "llama-gqa-tied")
    ps = prompts(160)
    base, _ = run_engine(path, ps)
    assert run_engine(path, ps, enable_chunked_prefill=False, max_num_batched_tokens=256)[0] == base
    assert run_engine(path, ps, page_size=16, max_num_batched_tokens=7)[0] == base
    assert run_engine(path, ps, enable_prefix_caching=False)[0] == base


@pytest.mark.parametrize("variant", ["llama-gqa-tied", "qwen2-bias"])
def test_triton_backend_gives_the_torch_backends_tokens(tiny_root: Path, variant: str) -> None:
    """Under TRITON_INTERPRET=1 on CPU: the same greedy tokens, and logits within fp32 noise,
    across steps that mix prefill chunks and decodes."""
    path = make_tiny_model(tiny_root, variant)
    ps = prompts(160)
    torch_tokens, torch_logits = run_engine(path, ps, attention_backend="torch")
    triton_tokens, triton_logits = run_engine(path, ps, attention_backend="triton")
    assert triton_tokens == torch_tokens
    for a, b in zip(torch_logits, triton_logits):
        torch.testing.assert_close(torch.stack(b), torch.stack(a), atol=LOGIT_ATOL, rtol=1e-4)


@pytest.mark.parametrize("variant", ["llama-gqa-tied", "qwen2-bias"])
def test_bf16_is_as_close_to_fp32_as_hf_bf16(tiny_root: Path, variant: str, products: str) -> None:
    """bf16 on CPU (native kernels up to 32 rows, the widened fp32 product for longer prefills)
    against HF in fp32, measured against HF's own bf16 error on the same tokens: rounding
    differs, so ours may be somewhat worse, but a broken path is far off."""
    import copy

    path = make_tiny_model(tiny_root, variant)
    model = hf_model(path)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ps = prompts(model.config.vocab_size)
    tokens, logits = run_engine(path, ps, dtype="bfloat16")
    ours = hf = 0.0
    for p, toks, rows in zip(ps, tokens, logits):
        ref = hf_logits(model, p + toks)  # (n, V) fp32, teacher-forced on our tokens
        ref_bf16 = hf_logits(model_bf16, p + toks)  # (n, V)
        for j, row in enumerate(rows):
            i = len(p) - 1 + j
            ours = max(ours, (row - ref[i]).abs().max().item())
            hf = max(hf, (ref_bf16[i] - ref[i]).abs().max().item())
    assert ours <= BF16_ERROR_RATIO * hf, (ours, hf)


def test_recorded_batches_are_the_steps_that_ran(tiny_root: Path) -> None:
    # --step-log's data: with record_batches, each StepTiming carries its batch, whose
    # aggregates are the timing's own (prefill chunks, decodes, KV lengths after the step).
    model_dir = make_tiny_model(tiny_root, "llama-gqa-tied")
    core = EngineCore(EngineOptions(model=str(model_dir), device_memory="32MiB", page_size=4,
                                    max_num_batched_tokens=24, dtype="float32").build())
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    core.step()
    assert core.take_timings() == []
    core.add_request(EngineRequest("a", list(range(3, 33)), params, time.time()))
    core.step()
    (plain,) = core.take_timings()
    assert plain.batch is None and plain.ended > plain.started and plain.stages == 1
    core.record_batches()
    core.add_request(EngineRequest("b", list(range(3, 13)), params, time.time()))
    while core.has_unfinished:
        core.step()
    timings = core.take_timings()
    assert timings and all(t.batch for t in timings)
    for t in timings:
        assert t.num_prefill_tokens == sum(q for q, _ in t.batch if q > 1)
        assert t.num_decode_tokens == sum(q for q, _ in t.batch if q == 1)
        assert t.num_context_tokens == sum(q + c for q, c in t.batch)
        assert t.seconds == pytest.approx(t.ended - t.started)
