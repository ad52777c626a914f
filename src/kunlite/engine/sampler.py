"""Batched token sampling on the device: logit bias, penalties, temperature, top-k / top-p /
min-p, and logprobs, with no Python loop over rows on the hot path and no device sync (the
only host copies are the logprobs, and only when a row asks for them; a loop runs over seeded
rows only).

Order of operations on each row (HF and vLLM semantics):
    raw logits --(logprobs are taken here: "raw logprobs", vLLM's default; logit_bias does not move them)
    -> logit_bias: each row's (token, bias) pairs added (OpenAI: "added to the logits prior to sampling")
    -> min_tokens: EOS and stop_token_ids set to -inf while the row has fewer than min_tokens
    -> repetition penalty (HF, prompt + output tokens), presence / frequency (OpenAI, output)
    -> greedy rows: argmax here, exactly, with no randomness
    -> / temperature -> top-k -> top-p -> min-p (HF's warper order)
    -> sample: argmax(probs / E), E ~ Exp(1) i.i.d. (gpt-fast; equivalent to multinomial),
       with E = -log(U), U = torch.rand: several times faster than exponential_() on CPU. U is
       float32, so E lies in [6e-8, 87.3]: never 0 (a kept token can always win, a filtered one,
       p == 0, never can) and never inf; tokens with p below ~1e-7 are slightly under-sampled,
       as with float32 exponential_() on a GPU.

Seeded rows draw their noise from a generator seeded with a mix of (seed, step_index), a
counter-based scheme: a row's tokens depend only on its own seed, params and logits, never
on the rest of the batch or on its position in it. Unseeded rows share a sampler-level
generator per device.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from kunlite.engine.messages import TokenLogprobs
from kunlite.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, step: int) -> int:
    """SplitMix64 of (seed, step): the 64-bit generator seed a seeded row uses at `step`."""
    z = ((seed & _MASK64) + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass
class SamplingBatch:
    """Everything the sampler needs for one step, already on the device.

    Optional tensors are None when no row needs them; the flags let the sampler skip whole
    stages. Rows whose params are neutral (penalty 1 / 0, top_k 0, top_p 1, min_p 0) pass
    through a stage unchanged, so a stage runs on the whole batch when any row needs it.
    """

    temperature: Tensor  # (B,) float32; 0 for greedy rows
    top_k: Tensor  # (B,) int64; 0 = off (also when top_k >= vocab_size)
    max_top_k: int  # max(top_k); with all_top_k, filtering works on the max_top_k best tokens only
    all_top_k: bool  # every row has top-k on
    top_p: Tensor  # (B,) float32
    min_p: Tensor  # (B,) float32
    repetition_penalty: Tensor  # (B,) float32
    presence_penalty: Tensor  # (B,) float32
    frequency_penalty: Tensor  # (B,) float32
    greedy: Tensor  # (B,) bool
    bias_index: Tensor | None  # (K,) int64 row * V + token of every logit_bias entry; None if no row has one
    bias_values: Tensor | None  # (K,) float32 the bias of each entry
    output_counts: Tensor | None  # (B, V) float32 occurrences in the output; zero for rows without penalties
    prompt_mask: Tensor | None  # (B, V) bool token occurs in the prompt; None without repetition penalty
    banned_rows: Tensor | None  # (M,) int64 \ (row, token) pairs set to -inf: EOS / stop ids
    banned_ids: Tensor | None  # (M,) int64 /  of rows still below min_tokens
    seeds: list[tuple[int, int]]  # (row, step_seed(seed, step_index)) for seeded random rows
    num_logprobs: list[int | None]  # per row, SamplingParams.logprobs
    logprob_rows: Tensor | None  # (L,) int64 rows with logprobs is not None, ascending
    max_num_logprobs: int  # top-n computed for all L rows, each row keeps its own n
    all_greedy: bool
    all_random: bool
    no_penalties: bool
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        step_index: Sequence[int],
        eos_token_ids: Sequence[int],
        vocab_size: int,
        device: torch.device | str,
    ) -> "SamplingBatch":
        """Build the batch; token ids must be below `vocab_size` (ValueError otherwise)."""
        B, V = len(params), vocab_size
        greedy = [p.greedy for p in params]
        top_k = [p.top_k if 0 < p.top_k < V else 0 for p in params]  # -1 and >= V mean off
        floats = torch.tensor(
            [
                [0.0 if g else p.temperature for p, g in zip(params, greedy)],
                [p.top_p for p in params],
                [p.min_p for p in params],
                [p.repetition_penalty for p in params],
                [p.presence_penalty for p in params],
                [p.frequency_penalty for p in params],
            ],
            dtype=torch.float32,
        ).to(device)  # (6, B): one host-to-device copy
        temperature, top_p, min_p, rep, pres, freq = floats.unbind(0)  # each (B,)

        rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        pen_rows = [i for i, p in enumerate(params)
                    if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
        output_counts = prompt_mask = None
        if pen_rows:
            flat = _flat_index([output_token_ids[i] for i in pen_rows], pen_rows, V, "penalties").to(device)  # (N,)
            output_counts = torch.zeros(B * V, dtype=torch.float32, device=device)  # (B*V,)
            output_counts.index_put_((flat,), torch.ones((), device=device), accumulate=True)
            output_counts = output_counts.view(B, V)  # (B, V)
        if rep_rows:
            flat = _flat_index([prompt_token_ids[i] for i in rep_rows], rep_rows, V, "penalties")
            prompt_mask = torch.zeros(B * V, dtype=torch.bool, device=device)  # (B*V,)
            prompt_mask[flat.to(device)] = True
            prompt_mask = prompt_mask.view(B, V)  # (B, V)

        bias_index = bias_values = None
        bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
        if bias_rows:
            biases = [params[i].logit_bias for i in bias_rows]
            ids = [[t for t, _ in row] for row in biases]
            bias_index = _flat_index(ids, bias_rows, V, "logit_bias").to(device)  # (K,)
            bias_values = torch.tensor([b for row in biases for _, b in row], dtype=torch.float32).to(device)  # (K,)

        banned: list[tuple[int, int]] = []  # (row, token) forbidden before min_tokens
        for i, p in enumerate(params):
            if step_index[i] < p.min_tokens:
                stop_ids = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | set(eos_token_ids)
                banned.extend((i, t) for t in sorted(stop_ids) if 0 <= t < V)
        banned_rows = banned_ids = None
        if banned:
            pairs = torch.tensor(banned, dtype=torch.int64).to(device)  # (M, 2)
            banned_rows, banned_ids = pairs.unbind(1)  # (M,), (M,)

        num_logprobs = [p.logprobs for p in params]
        lp_rows = [i for i, n in enumerate(num_logprobs) if n is not None]
        return cls(
            temperature=temperature, top_k=torch.tensor(top_k, dtype=torch.int64).to(device),
            max_top_k=max(top_k), all_top_k=all(top_k),
            top_p=top_p, min_p=min_p, repetition_penalty=rep, presence_penalty=pres,
            frequency_penalty=freq, greedy=torch.tensor(greedy, dtype=torch.bool).to(device),
            bias_index=bias_index, bias_values=bias_values,
            output_counts=output_counts, prompt_mask=prompt_mask,
            banned_rows=banned_rows, banned_ids=banned_ids,
            seeds=[(i, step_seed(p.seed, step_index[i])) for i, p in enumerate(params)
                   if p.seed is not None and not greedy[i]],
            num_logprobs=num_logprobs,
            logprob_rows=torch.tensor(lp_rows, dtype=torch.int64).to(device) if lp_rows else None,
            max_num_logprobs=max((num_logprobs[i] or 0 for i in lp_rows), default=0),
            all_greedy=all(greedy), all_random=not any(greedy), no_penalties=not pen_rows,
            no_top_k=not any(top_k), no_top_p=all(p.top_p >= 1.0 for p in params),
            no_min_p=all(p.min_p <= 0.0 for p in params),
        )


def _flat_index(token_lists: list[Sequence[int]], rows: list[int], V: int, what: str) -> Tensor:
    """(N,) int64 of row * V + token over all tokens of the given rows (on the host); `what`
    names the user of the ids in the ValueError for an id outside [0, V)."""
    lengths = [len(t) for t in token_lists]
    ids = np.fromiter(chain.from_iterable(token_lists), dtype=np.int64, count=sum(lengths))  # (N,)
    if ids.size and not (ids.min() >= 0 and ids.max() < V):
        raise ValueError(f"token ids must be in [0, {V}) for {what}")
    return torch.from_numpy(np.repeat(np.asarray(rows, dtype=np.int64), lengths) * V + ids)  # (N,)


@dataclass
class SamplerOutput:
    token_ids: Tensor  # (B,) int64, on the device of the logits
    logprobs: list[TokenLogprobs | None] | None  # per row (None for rows without logprobs); None if no row


class Sampler:
    """Samples one token per row. Stateless apart from the generators for unseeded rows."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}  # unseeded rows, per device
        self._row_generators: dict[torch.device, torch.Generator] = {}  # reseeded for each seeded row

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        raw = logits.float()  # (B, V); may alias the caller's tensor: never written in place
        x = raw
        if batch.bias_index is not None:  # out of place: `raw` stays the model's logits
            x = x.flatten().index_add(0, batch.bias_index, batch.bias_values).view_as(raw)  # (B, V)
        if batch.banned_rows is not None:
            x = x.index_put((batch.banned_rows, batch.banned_ids), torch.tensor(float("-inf"), device=x.device))
        if not batch.no_penalties:
            x = apply_penalties(x, batch)  # (B, V)
        if batch.all_greedy:
            token_ids = x.argmax(dim=-1)  # (B,)
        else:
            sampled = self._sample(x, batch)  # (B,)
            token_ids = sampled if batch.all_random else torch.where(batch.greedy, x.argmax(dim=-1), sampled)
        logprobs = None if batch.logprob_rows is None else _gather_logprobs(raw, token_ids, batch)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def _sample(self, x: Tensor, batch: SamplingBatch) -> Tensor:
        """(B,) int64 sampled tokens for every row (greedy rows' results are discarded)."""
        temperature = torch.where(batch.greedy, 1.0, batch.temperature)  # (B,) no division by 0
        x = x / temperature.unsqueeze(1)  # (B, V)
        if not batch.no_top_p:
            x = apply_top_k_top_p(x, None if batch.no_top_k else batch.top_k, batch.top_p,
                                  batch.max_top_k if batch.all_top_k else 0)
        elif not batch.no_top_k:
            x = apply_top_k(x, batch.top_k, batch.max_top_k)
        if not batch.no_min_p:
            x = apply_min_p(x, batch.min_p)
        probs = x.softmax(dim=-1)  # (B, V); exactly 0 on filtered tokens
        uniform = torch.rand(probs.shape, generator=self._generator(probs.device), device=probs.device)  # (B, V)
        if batch.seeds:
            g = self._row_generators.get(probs.device)
            if g is None:
                g = self._row_generators[probs.device] = torch.Generator(device=probs.device)
            for row, seed in batch.seeds:  # seeded rows only; each row's noise depends on its seed alone
                g.manual_seed(seed)
                torch.rand(probs.shape[1], generator=g, device=probs.device, out=uniform[row])  # (V,) in place
        noise = uniform.clamp_min_(torch.finfo(uniform.dtype).tiny).log_().neg_()  # (B, V) Exp(1), finite, > 0
        return (probs / noise).argmax(dim=-1)  # (B,)

    def _generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device)
            if self._seed is None:
                g.seed()
            else:
                g.manual_seed(self._seed)
        return g


def apply_penalties(x: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition (HF: positive logits divided, others multiplied, over prompt and output tokens),
    then frequency and presence (OpenAI: logit -= freq * count + pres * (count > 0), output only)."""
    counts = batch.output_counts  # (B, V)
    assert counts is not None  # set by from_params whenever no_penalties is False
    seen = counts > 0  # (B, V)
    if batch.prompt_mask is not None:
        rep = batch.repetition_penalty.unsqueeze(1)  # (B, 1)
        penalised = torch.where(x > 0, x / rep, x * rep)  # (B, V)
        x = torch.where(seen | batch.prompt_mask, penalised, x)  # (B, V)
    x = x - batch.frequency_penalty.unsqueeze(1) * counts  # (B, V)
    return x - batch.presence_penalty.unsqueeze(1) * seen  # (B, V)


def apply_top_k(x: Tensor, top_k: Tensor, max_top_k: int) -> Tensor:
    """Set to -inf every token below the row's k-th largest value (ties with it kept, as HF);
    top_k 0 leaves a row unchanged. One topk(max_top_k), no sort."""
    best = x.topk(max_top_k, dim=-1).values  # (B, K) descending
    kth = best.gather(1, (top_k.clamp_min(1) - 1).unsqueeze(1))  # (B, 1)
    kth = kth.masked_fill((top_k == 0).unsqueeze(1), float("-inf"))  # (B, 1)
    return x.masked_fill(x < kth, float("-inf"))  # (B, V)


def apply_top_k_top_p(x: Tensor, top_k: Tensor | None, top_p: Tensor, max_top_k: int = 0) -> Tensor:
    """Top-k as apply_top_k, then set to -inf every token outside the smallest set whose mass
    (renormalised after top-k) reaches top_p; the most likely token always survives. With
    max_top_k > 0 (every row has top-k on) only the max_top_k best tokens are sorted, since
    all others are out anyway (then ties with the k-th value beyond those are dropped)."""
    if top_k is not None and max_top_k > 0:
        best, idx = x.topk(max_top_k, dim=-1)  # (B, K) descending
        sorted_x, order = best.flip(-1), idx.flip(-1)  # (B, K) ascending: the most likely token is last
    else:
        sorted_x, order = x.sort(dim=-1)  # (B, V) ascending
    W = sorted_x.shape[-1]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, W).clamp_max(W)  # (B,)
        kth = sorted_x.gather(1, (W - k).unsqueeze(1))  # (B, 1) the k-th largest value
        sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))  # (B, W)
    below = sorted_x.softmax(dim=-1).cumsum(dim=-1)  # (B, W) mass of this token and all less likely
    drop = below <= (1.0 - top_p).unsqueeze(1)  # (B, W)
    drop[:, -1] = False
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))  # (B, W)
    return torch.full_like(x, float("-inf")).scatter_(1, order, sorted_x)  # (B, V) back in vocabulary order


def apply_min_p(x: Tensor, min_p: Tensor) -> Tensor:
    """Set to -inf tokens with p < min_p * p_max, written in logit space:
    x < x_max + log(min_p). min_p == 0 gives a threshold of -inf, which keeps everything."""
    threshold = x.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)  # (B, 1)
    return x.masked_fill(x < threshold, float("-inf"))  # (B, V)


def _gather_logprobs(raw: Tensor, token_ids: Tensor, batch: SamplingBatch) -> list[TokenLogprobs | None]:
    """Raw logprobs (log-softmax of the model's logits) for the rows that asked, with one batched
    top-n and small host copies. Rank is 1 + the number of tokens strictly more likely."""
    rows = batch.logprob_rows  # (L,)
    assert rows is not None
    lp = torch.log_softmax(raw[rows], dim=-1)  # (L, V); [] rather than index_select: far faster on CPU
    chosen = token_ids[rows]  # (L,)
    chosen_lp = lp.gather(1, chosen.unsqueeze(1))  # (L, 1)
    rank = (lp > chosen_lp).sum(dim=-1) + 1  # (L,)
    top_lp, top_ids = lp.topk(min(batch.max_num_logprobs, lp.shape[-1]), dim=-1)  # (L, n) sorted, best first
    chosen_l, rank_l = chosen_lp.squeeze(1).tolist(), rank.tolist()
    top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
    out: list[TokenLogprobs | None] = [None] * len(batch.num_logprobs)
    for j, row in enumerate(rows.tolist()):
        n = batch.num_logprobs[row] or 0
        out[row] = TokenLogprobs(logprob=chosen_l[j], rank=rank_l[j],
                                 top_ids=top_ids_l[j][:n], top_logprobs=top_lp_l[j][:n])
    return out
