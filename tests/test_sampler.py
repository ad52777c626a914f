"""Batched sampler: exact greedy, filters never leak, seeded rows reproducible, penalties and
logprobs against straightforward per-row references, and sampling frequencies."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kunlite.engine.sampler import Sampler, SamplingBatch, apply_penalties
from kunlite.sampling_params import SamplingParams as SP

EOS = 0


def make_batch(params: list[SP], *, V: int, prompts: list[list[int]] | None = None,
               outputs: list[list[int]] | None = None, steps: list[int] | None = None) -> SamplingBatch:
    B = len(params)
    outputs = outputs if outputs is not None else [[] for _ in range(B)]
    return SamplingBatch.from_params(params, prompts or [[] for _ in range(B)], outputs,
                                     steps if steps is not None else [len(o) for o in outputs], [EOS], V, "cpu")


def randn(seed: int, *shape: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale  # no ties, almost surely


# ---------------------------------------------------------------------------- greedy


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), B=st.integers(1, 6), V=st.integers(2, 300))
def test_greedy_is_argmax(seed: int, B: int, V: int) -> None:
    logits = randn(seed, B, V)
    out = Sampler(seed=1)(logits, make_batch([SP(temperature=0, logprobs=None)] * B, V=V))
    assert torch.equal(out.token_ids, logits.argmax(-1)) and out.logprobs is None
    # Mixed with random rows, greedy rows still take the exact argmax.
    mixed = [SP(temperature=0) if i % 2 else SP(temperature=1.5, top_p=0.9) for i in range(B)]
    got = Sampler(seed=2)(logits, make_batch(mixed, V=V)).token_ids
    greedy_rows = torch.arange(B) % 2 == 1
    assert torch.equal(got[greedy_rows], logits.argmax(-1)[greedy_rows])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), V=st.integers(2, 300), temperature=st.floats(0.05, 5.0))
def test_top_k_1_is_greedy(seed: int, V: int, temperature: float) -> None:
    logits = randn(seed, 64, V)
    out = Sampler(seed=seed)(logits, make_batch([SP(temperature=temperature, top_k=1)] * 64, V=V))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_from_params_flags_and_normalisation() -> None:
    b = make_batch([SP(temperature=0, top_k=-1), SP(top_k=500), SP(top_k=3, seed=7)], V=100)
    assert b.top_k.tolist() == [0, 0, 3] and b.temperature.tolist() == [0.0, 1.0, 1.0]
    assert not b.all_greedy and not b.all_random and not b.no_top_k and b.no_top_p and b.no_min_p
    assert b.no_penalties and b.output_counts is None and b.banned_rows is None and b.logprob_rows is None
    assert [row for row, _ in b.seeds] == [2]
    fast = make_batch([SP(temperature=0)] * 3, V=10)
    assert fast.all_greedy and fast.no_top_k and fast.no_top_p and fast.no_penalties and fast.seeds == []


# ---------------------------------------------------------------------------- filters


def loosely_allowed(logits: torch.Tensor, p: SP, tol: float = 1e-4) -> torch.Tensor:
    """(V,) bool: tokens that top-k, then top-p, then min-p (HF order) do not clearly remove,
    computed row by row in float64; tokens within `tol` of a threshold count as allowed."""
    x = logits.double() / p.temperature  # (V,)
    allowed = torch.ones_like(x, dtype=torch.bool)
    if 0 < p.top_k < x.numel():
        allowed &= x >= x.sort(descending=True).values[p.top_k - 1] - tol
    probs = torch.where(allowed, x, -math.inf).softmax(-1)  # (V,)
    order = probs.argsort()  # ascending
    below = torch.empty_like(probs)
    below[order] = probs[order].cumsum(0)  # mass of this token and all less likely ones
    allowed &= below > (1 - p.top_p) - tol
    probs = torch.where(allowed, probs, 0.0)
    probs = probs / probs.sum()
    return allowed & (probs >= p.min_p * probs.max() * (1 - tol))


filter_params = st.builds(
    SP, temperature=st.floats(0.2, 3.0), top_k=st.integers(-1, 70), top_p=st.floats(0.05, 1.0),
    min_p=st.sampled_from([0.0, 0.05, 0.3, 0.9]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), V=st.integers(2, 64), params=st.lists(filter_params, min_size=4, max_size=4))
def test_filters_never_sample_removed_tokens(seed: int, V: int, params: list[SP]) -> None:
    """Four rows with their own filters in one batch (mixed batches take the general paths),
    each row repeated for 128 draws."""
    rows = randn(seed, 4, V)  # (4, V)
    logits = rows.repeat_interleave(128, dim=0)  # (512, V)
    batch = make_batch([p for p in params for _ in range(128)], V=V)
    tokens = Sampler(seed=seed)(logits, batch).token_ids.view(4, 128)
    for r in range(4):
        allowed = loosely_allowed(rows[r], params[r])
        assert allowed[tokens[r]].all(), (params[r], tokens[r][~allowed[tokens[r]]], allowed.nonzero())


def test_sampling_frequencies_match_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])  # (V,)
    N = 40_000
    cases = [(SP(temperature=1.0), None), (SP(temperature=0.5), None), (SP(temperature=1.0, top_k=3), 3)]
    for params, k in cases:
        x = logits / params.temperature
        if k is not None:
            x = torch.where(x >= x.topk(k).values[-1], x, -math.inf)
        expected = x.softmax(-1) * N  # (V,)
        tokens = Sampler(seed=1234)(logits.expand(N, -1), make_batch([params] * N, V=6)).token_ids
        observed = torch.bincount(tokens, minlength=6).double()
        support = expected > 0
        assert observed[~support].sum() == 0
        chi2 = ((observed[support] - expected[support]) ** 2 / expected[support]).sum().item()
        assert chi2 < 30.0, (params, observed, expected)  # dof <= 5; p(chi2 > 30) < 1e-5


# ---------------------------------------------------------------------------- seeds


def test_seeded_rows_independent_of_batch() -> None:
    V, steps = 50, 6
    logits = randn(0, steps, V, scale=1.0)  # a flat-ish distribution: sampling really varies
    target = SP(temperature=1.0, top_p=0.95, seed=42)

    def run(params: list[SP], row: int, sampler_seed: int) -> list[int]:
        sampler, got = Sampler(seed=sampler_seed), []
        for step in range(steps):
            batch_logits = randn(100 + step, len(params), V)
            batch_logits[row] = logits[step]
            batch = make_batch(params, V=V, steps=[step] * len(params))
            got.append(int(sampler(batch_logits, batch).token_ids[row]))
        return got

    alone = run([target], 0, sampler_seed=1)
    crowd = [SP(temperature=0.8), SP(temperature=0), target, SP(seed=7), SP(temperature=1.3, top_k=5)]
    assert run(crowd, 2, sampler_seed=99) == alone
    assert run([SP(seed=7), target], 1, sampler_seed=5) == alone
    other_seed = run([SP(temperature=1.0, top_p=0.95, seed=43)], 0, sampler_seed=1)
    assert other_seed != alone  # 6 draws over ~50 tokens: a collision is essentially impossible
    assert len(set(alone)) > 1  # the per-step counter changes the noise


# ---------------------------------------------------------------------------- penalties


def reference_penalties(logits: torch.Tensor, p: SP, prompt: list[int], output: list[int]) -> torch.Tensor:
    x = logits.clone()  # (V,)
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


penalty_params = st.builds(
    SP, temperature=st.just(0.0), repetition_penalty=st.sampled_from([1.0, 0.7, 1.3, 2.0]),
    presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), V=st.integers(2, 40), data=st.data(),
       params=st.lists(penalty_params, min_size=1, max_size=5))
def test_penalties_match_reference(seed: int, V: int, data: st.DataObject, params: list[SP]) -> None:
    ids = st.lists(st.integers(0, V - 1), max_size=12)
    prompts = [data.draw(ids) for _ in params]
    outputs = [data.draw(ids) for _ in params]
    logits = randn(seed, len(params), V)
    batch = make_batch(params, V=V, prompts=prompts, outputs=outputs)
    expected = torch.stack([reference_penalties(logits[i], p, prompts[i], outputs[i]) for i, p in enumerate(params)])
    if batch.no_penalties:
        assert all(torch.equal(expected[i], logits[i]) for i in range(len(params)))
        return
    torch.testing.assert_close(apply_penalties(logits, batch), expected, rtol=1e-5, atol=1e-5)
    out = Sampler()(logits, batch).token_ids  # greedy rows: exact argmax of the penalised logits
    assert all(expected[i, out[i]] >= expected[i].max() - 1e-5 for i in range(len(params)))


def test_penalty_token_out_of_range() -> None:
    with pytest.raises(ValueError):
        make_batch([SP(presence_penalty=1.0)], V=10, outputs=[[10]])


# ---------------------------------------------------------------------------- min_tokens


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    V = 10
    logits = torch.full((4, V), -5.0)
    logits[:, EOS] = 10.0  # EOS is by far the best token
    logits[:, 3] = 9.0  # then the stop token 3
    logits[:, 5] = 8.0
    params = [SP(temperature=0, min_tokens=2, stop_token_ids=(3,)),
              SP(temperature=0.7, min_tokens=2, stop_token_ids=(3,)),
              SP(temperature=0, min_tokens=2, stop_token_ids=(3,), ignore_eos=True),
              SP(temperature=0, min_tokens=2, stop_token_ids=(3,))]
    steps = [1, 1, 0, 2]  # the last row has reached min_tokens
    out = Sampler(seed=0)(logits, make_batch(params, V=V, steps=steps)).token_ids
    assert out.tolist()[0] == 5 and out[1] not in (EOS, 3) and out.tolist()[2:] == [EOS, EOS]
    many = Sampler(seed=0)(torch.zeros(500, V), make_batch([params[1]] * 500, V=V, steps=[0] * 500))
    assert not torch.isin(many.token_ids, torch.tensor([EOS, 3])).any()  # uniform otherwise


# ---------------------------------------------------------------------------- logprobs


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), V=st.integers(2, 100),
       nums=st.lists(st.sampled_from([None, 0, 1, 5, 20]), min_size=1, max_size=6), greedy=st.booleans())
def test_logprobs_are_raw_log_softmax(seed: int, V: int, nums: list[int | None], greedy: bool) -> None:
    logits = randn(seed, len(nums), V).to(torch.bfloat16)
    params = [SP(temperature=0 if greedy else 1.0, logprobs=n, repetition_penalty=1.5) for n in nums]
    out = Sampler(seed=seed)(logits, make_batch(params, V=V, outputs=[[0, 1]] * len(nums)))
    raw = torch.log_softmax(logits.float(), dim=-1)  # before penalties and temperature
    if all(n is None for n in nums):
        assert out.logprobs is None
        return
    assert out.logprobs is not None and len(out.logprobs) == len(nums)
    for i, n in enumerate(nums):
        lp = out.logprobs[i]
        if n is None:
            assert lp is None
            continue
        assert lp is not None
        token = int(out.token_ids[i])
        assert lp.logprob == pytest.approx(raw[i, token].item(), abs=1e-6)
        assert lp.rank == 1 + int((raw[i] > raw[i, token]).sum())
        k = min(n, V)
        assert len(lp.top_ids) == len(lp.top_logprobs) == k
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
        assert lp.top_logprobs == pytest.approx(raw[i, lp.top_ids].tolist(), abs=1e-6)
        if k:
            assert lp.top_logprobs[0] == pytest.approx(raw[i].max().item(), abs=1e-6)


# ---------------------------------------------------------------------------- logit_bias


def test_logit_bias_forces_and_bans_greedy_tokens() -> None:
    V = 40
    logits = randn(5, 4, V)  # (4, V)
    best = logits.argmax(-1)  # (4,)
    forced = int(logits[0].argmin())  # the least likely token of row 0
    second = int(logits[1].topk(2).indices[1])
    params = [SP(temperature=0, logit_bias=((forced, 100.0),)),
              SP(temperature=0, logit_bias=((int(best[1]), -100.0),)),
              SP(temperature=0),  # no bias: untouched in a batch where others have one
              SP(temperature=0.8, logit_bias=((forced, 100.0), (int(best[3]), -100.0)))]
    out = Sampler(seed=0)(logits, make_batch(params, V=V)).token_ids
    assert out.tolist()[:3] == [forced, second, int(best[2])]
    assert int(out[3]) == forced  # +100 dominates sampling as well (randn logits span far less than 100)


def test_logit_bias_is_added_before_penalties_and_leaves_logprobs_raw() -> None:
    V = 12
    logits = randn(9, 2, V)  # (2, V)
    bias = ((3, 2.5), (7, -1.25))
    params = [SP(temperature=0, logit_bias=bias, presence_penalty=1.0, logprobs=2),
              SP(temperature=0, presence_penalty=1.0, logprobs=2)]
    outputs = [[3, 5], [3, 5]]
    batch = make_batch(params, V=V, outputs=outputs)
    biased = logits.clone()
    for t, b in bias:
        biased[0, t] += b
    expected = torch.stack([reference_penalties(biased[i], p, [], outputs[i]) for i, p in enumerate(params)])
    out = Sampler()(logits, batch)
    assert out.token_ids.tolist() == expected.argmax(-1).tolist()
    assert out.logprobs is not None and out.logprobs[0] is not None
    raw = torch.log_softmax(logits[0], dim=-1)  # (V,) before the bias
    assert out.logprobs[0].logprob == pytest.approx(raw[int(out.token_ids[0])].item(), abs=1e-6)


@pytest.mark.parametrize("bias, message", [
    (((1, 100.5),), "between -100 and 100"),
    (((1, float("nan")),), "between -100 and 100"),
    (((1, 1.0), (1, 2.0)), "more than once"),
    (((10, 1.0),), "below the vocabulary size"),
    (((-1, 1.0),), "below the vocabulary size"),
    (tuple((i, 1.0) for i in range(301)), "at most 300"),
])
def test_logit_bias_validation(bias: tuple[tuple[int, float], ...], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        SP(logit_bias=bias).validate(vocab_size=10 if len(bias) < 300 else 1000)
    assert info.value.param == "logit_bias"  # type: ignore[attr-defined]


def test_logit_bias_travels_in_msgpack() -> None:
    import msgspec

    params = SP(temperature=0, logit_bias=((3, -100.0), (17, 2.5)))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SP) == params
    with pytest.raises(ValueError, match="logit_bias"):
        make_batch([SP(logit_bias=((10, 1.0),))], V=10)
