"""Pure-torch attention over the paged pool: the CPU path and the oracle for the Triton kernels.

Vectorised over the batch: decodes run as one batched SDPA over gathered KV rows, and each
prefill/extend sequence runs as one SDPA call (a loop per sequence, never per token).
`write_kv`, `decode_attention` and `extend_attention` are also the fp32 references the kernel
tests compare against.

Token rows. A contiguous pool (P, 2, ps, H_kv, d) is also the table `rows` (P * 2 * ps, H_kv, d)
of single-token K or V entries: the key of position s in page p is row p * 2ps + s % ps, its
value row that + ps. Writing and gathering by row numbers makes each a single index op, and the
row numbers of every layer are derived once per step (the CPU pays per op, not per byte, here).

On a CPU pool (fp32 or bf16), where `kernels.cpu_decode` builds, decodes instead read their
pages in place with its native kernel (no gather, no SDPA call); the functions here stay the
reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from kunlite.kernels import cpu_decode
from kunlite.kernels.backend import AttentionBackend, AttentionMetadata, register_backend


def token_rows(
    page_table: torch.Tensor,  # (..., n_pages) int32 page ids
    span: int,  # positions 0 .. span-1 (span <= n_pages * ps)
    page_size: int,
) -> torch.Tensor:  # (..., 2, span) int64: key rows, then value rows
    s = torch.arange(span, device=page_table.device)  # (S,)
    pages = page_table[..., s // page_size].long()  # (..., S)
    keys = pages * (2 * page_size) + s % page_size  # (..., S)
    return torch.stack([keys, keys + page_size], dim=-2)


def slot_rows(slot_mapping: torch.Tensor, page_size: int) -> torch.Tensor:
    """(..., T) slots -> (..., 2T) rows: the new tokens' key rows, then their value rows."""
    keys = slot_mapping // page_size * (2 * page_size) + slot_mapping % page_size  # (..., T)
    return torch.cat([keys, keys + page_size], dim=-1)


def as_rows(kv_cache: torch.Tensor) -> torch.Tensor:  # (P * 2 * ps, H_kv, d)
    """The pool as token rows (a view when the pool is contiguous, else a copy for reading)."""
    return kv_cache.reshape(-1, kv_cache.shape[3], kv_cache.shape[4])


def write_kv(
    kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d)
    k: torch.Tensor,  # (T, H_kv, d)
    v: torch.Tensor,  # (T, H_kv, d)
    slot_mapping: torch.Tensor,  # (T,) int64: page * page_size + offset
) -> None:
    ps = kv_cache.shape[2]
    pages, offsets = slot_mapping // ps, slot_mapping % ps  # (T,) each
    kv_cache[pages, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[pages, 1, offsets] = v.to(kv_cache.dtype)


def _attend_rows(
    q: torch.Tensor,  # (B, H_q, d)
    kv: torch.Tensor,  # (2, B, S, H_kv, d) gathered keys and values
    mask: torch.Tensor | None,  # (B, 1, 1, S) bool, or None when every slot is valid
    scale: float,
) -> torch.Tensor:  # (B, H_q, d)
    """One query per sequence. The G query heads that share a KV head are presented to SDPA as
    G query positions of that head: a decode has no causal structure among them, and CPU SDPA
    runs (B, H_kv, G) queries much faster than (B, H_q, 1) with grouped-query expansion.
    Half-precision KV is attended in its own dtype (SDPA accumulates in fp32): widening it first
    costs more than it saves on CPU, at every batch measured here (S = 200, B = 1: 142 -> 78 us
    per layer; S = 216, B = 32: 2.1 -> 1.2 ms)."""
    B, hq, d = q.shape
    k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # (B, H_kv, S, d) each
    qg = q.view(B, k.shape[1], hq // k.shape[1], d).to(k.dtype)  # (B, H_kv, G, d)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # (B, H_kv, G, d)
    return out.reshape(B, hq, d).to(q.dtype)


def decode_mask(seq_lens: torch.Tensor, span: int) -> torch.Tensor:  # (B, 1, 1, span) bool
    """True where a decode query may attend: key positions below each sequence's length.
    Masked slots get -inf scores, so finite garbage in a page's unused tail never matters; the
    pool is zeroed at start-up, so no page holds NaN."""
    return (torch.arange(span, device=seq_lens.device)[None, :] < seq_lens[:, None])[:, None, None, :]


def decode_attention(
    q: torch.Tensor,  # (B, H_q, d)
    kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d)
    page_table: torch.Tensor,  # (B, >= max_pages) int32
    seq_lens: torch.Tensor,  # (B,) int32
    *,
    scale: float,
    max_seq_len: int,
) -> torch.Tensor:  # (B, H_q, d)
    B, ps = q.shape[0], kv_cache.shape[2]
    rows = token_rows(page_table, max_seq_len, ps)  # (B, 2, S)
    kv = as_rows(kv_cache)[rows.transpose(0, 1).reshape(-1)]  # (2 * B * S, H_kv, d)
    kv = kv.view(2, B, max_seq_len, *kv.shape[1:])  # (2, B, S, H_kv, d)
    return _attend_rows(q, kv, decode_mask(seq_lens, max_seq_len), scale)


def extend_attention(
    q: torch.Tensor,  # (T, H_q, d): the new tokens of all sequences, concatenated
    kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d), already holding the new k, v
    page_table: torch.Tensor,  # (B, >= max_pages) int32
    query_lens: list[int],  # (B,) new tokens per sequence
    seq_lens: list[int],  # (B,) KV length per sequence, new tokens included
    *,
    scale: float,
) -> torch.Tensor:  # (T, H_q, d)
    hq, ps = q.shape[1], kv_cache.shape[2]
    rows_view = as_rows(kv_cache)  # (P * 2 * ps, H_kv, d)
    out = torch.empty_like(q)
    start = 0
    for b, (lq, s) in enumerate(zip(query_lens, seq_lens)):
        kv = rows_view[token_rows(page_table[b], s, ps).reshape(-1)].float()  # (2 * S, H_kv, d)
        k, v = kv.view(2, s, *kv.shape[1:]).transpose(1, 2).unsqueeze(1)  # (1, H_kv, S, d) each
        qb = q[start : start + lq].transpose(0, 1).unsqueeze(0).float()  # (1, H_q, Lq, d)
        gqa = k.shape[1] != hq
        if lq == s:
            o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            # bottom-right causal: query i sits at position s - lq + i and sees keys 0..that position
            pos = torch.arange(s - lq, s, device=q.device)  # (Lq,)
            mask = torch.arange(s, device=q.device)[None, :] <= pos[:, None]  # (Lq, S)
            o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[start : start + lq] = o[0].transpose(0, 1).to(q.dtype)  # (Lq, H_q, d)
        start += lq
    return out


@dataclass(frozen=True)
class _StepPlan:
    """What every layer of one step shares: derived once in prepare()."""

    meta: AttentionMetadata  # the step this plan belongs to (compared by identity)
    page_size: int
    write_rows: torch.Tensor  # (L, 2T) int64: rows of the new keys, then of the new values
    decode_span: int  # S

    @cached_property
    def decode_rows(self) -> torch.Tensor:  # (L, 2 * B_d * S) int64: rows the decodes attend over
        """Derived on first use: the native CPU kernel reads pages in place and never needs it."""
        nd = self.meta.num_decodes
        rows = token_rows(self.meta.page_tables[:, :nd], self.decode_span, self.page_size)  # (L, B_d, 2, S)
        return rows.transpose(1, 2).reshape(rows.shape[0], -1)

    @cached_property
    def decode_mask(self) -> torch.Tensor | None:  # (B_d, 1, 1, S) bool; None when all have length S
        nd = self.meta.num_decodes
        if min(self.meta.seq_lens_cpu[:nd]) == self.decode_span:
            return None
        return decode_mask(self.meta.seq_lens[:nd], self.decode_span)


@register_backend
class TorchBackend(AttentionBackend):
    name = "torch"
    _plan: _StepPlan | None = None

    def prepare(self, meta: AttentionMetadata) -> None:
        span = max(meta.seq_lens_cpu[: meta.num_decodes], default=0)
        self._plan = _StepPlan(meta=meta, page_size=self.page_size,
                               write_rows=slot_rows(meta.slot_mapping, self.page_size), decode_span=span)

    def forward(
        self,
        q: torch.Tensor,  # (T, H_q, d)
        k: torch.Tensor,  # (T, H_kv, d)
        v: torch.Tensor,  # (T, H_kv, d)
        kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d)
        layer: int,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, H_q, d)
        if self._plan is None or self._plan.meta is not meta:
            self.prepare(meta)
        plan = self._plan
        if not kv_cache.is_contiguous():  # a strided pool (tests): the reference path
            write_kv(kv_cache, k, v, meta.slot_mapping[layer])
            rows_view = None
        else:
            rows_view = kv_cache.view(-1, kv_cache.shape[3], kv_cache.shape[4])  # (P * 2 * ps, H_kv, d)
            rows_view.index_copy_(0, plan.write_rows[layer], torch.cat([k, v]).to(kv_cache.dtype))
        nd = meta.num_decodes
        if nd == meta.num_seqs:
            return self._decode(q, kv_cache, rows_view, layer, meta)
        out = torch.empty_like(q)  # (T, H_q, d)
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, rows_view, layer, meta)
        out[nd:] = extend_attention(q[nd:], kv_cache, meta.page_tables[layer, nd:], meta.query_lens_cpu[nd:],
                                    meta.seq_lens_cpu[nd:], scale=self.scale)
        return out

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, rows_view: torch.Tensor | None, layer: int,
                meta: AttentionMetadata) -> torch.Tensor:  # q: (B_d, H_q, d) -> (B_d, H_q, d)
        plan, nd = self._plan, q.shape[0]
        if rows_view is not None and cpu_decode.supports_attention(q, kv_cache):
            return cpu_decode.paged_decode_attention(q, kv_cache, meta.page_tables[layer, :nd], meta.seq_lens[:nd],
                                                     self.scale)
        if rows_view is None:
            return decode_attention(q, kv_cache, meta.page_tables[layer, :nd], meta.seq_lens[:nd],
                                    scale=self.scale, max_seq_len=plan.decode_span)
        kv = rows_view.index_select(0, plan.decode_rows[layer])  # (2 * B_d * S, H_kv, d)
        kv = kv.view(2, nd, plan.decode_span, *kv.shape[1:])  # (2, B_d, S, H_kv, d)
        return _attend_rows(q, kv, plan.decode_mask, self.scale)
