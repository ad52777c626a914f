"""Pure-torch attention over the paged pool: the CPU path and the oracle for the Triton kernels.

Vectorised over the batch: decodes run as one batched product over gathered pages, and each
prefill/extend sequence runs as one SDPA call (a loop per sequence, never per token).
The three functions below are also the fp32 references the kernel tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kunlite.kernels.backend import AttentionBackend, AttentionMetadata, register_backend


def write_kv(
    kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d)
    k: torch.Tensor,  # (T, H_kv, d)
    v: torch.Tensor,  # (T, H_kv, d)
    slot_mapping: torch.Tensor,  # (T,) int64: page * page_size + offset
    *,
    pages: torch.Tensor | None = None,  # (T,) slot_mapping // page_size, when already known
    offsets: torch.Tensor | None = None,  # (T,) slot_mapping % page_size
) -> None:
    if pages is None or offsets is None:
        page_size = kv_cache.shape[2]
        pages, offsets = slot_mapping // page_size, slot_mapping % page_size  # (T,) each
    kv_cache[pages, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[pages, 1, offsets] = v.to(kv_cache.dtype)


def gather_kv(
    kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d)
    page_table: torch.Tensor,  # (B, n_pages) int32
) -> tuple[torch.Tensor, torch.Tensor]:  # k, v: (B, H_kv, n_pages * page_size, d)
    B, n_pages = page_table.shape
    _, _, ps, hkv, d = kv_cache.shape
    kv = kv_cache[page_table.long()]  # (B, n_pages, 2, ps, H_kv, d)
    kv = kv.permute(2, 0, 4, 1, 3, 5).reshape(2, B, hkv, n_pages * ps, d)  # (2, B, H_kv, S, d)
    return kv[0], kv[1]


def decode_attention(
    q: torch.Tensor,  # (B, H_q, d)
    kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d)
    page_table: torch.Tensor,  # (B, >= max_pages) int32
    seq_lens: torch.Tensor,  # (B,) int32
    *,
    scale: float,
    max_seq_len: int,
    valid: torch.Tensor | None = None,  # (B, 1, 1, S) bool, S = pages * page_size, when already known
) -> torch.Tensor:  # (B, H_q, d)
    B, hq, d = q.shape
    ps, hkv = kv_cache.shape[2], kv_cache.shape[3]
    n_pages = -(-max_seq_len // ps)
    k, v = gather_kv(kv_cache, page_table[:, :n_pages])  # (B, H_kv, S, d) each
    if valid is None:
        valid = decode_mask(seq_lens, n_pages * ps)
    qg = q.view(B, hkv, hq // hkv, d).to(k.dtype)  # (B, H_kv, G, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float()  # (B, H_kv, G, S)
    # Masked slots get -inf before the softmax: finite garbage in them never matters (the pool
    # is zeroed at start-up, so no page holds NaN).
    probs = torch.softmax(scores.masked_fill_(~valid, float("-inf")).mul_(scale), dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # (B, H_kv, G, d)
    return out.reshape(B, hq, d).to(q.dtype)


def decode_mask(seq_lens: torch.Tensor, span: int) -> torch.Tensor:  # (B, 1, 1, span) bool
    """True where a decode query may attend: key positions below each sequence's length."""
    return (torch.arange(span, device=seq_lens.device)[None, :] < seq_lens[:, None])[:, None, None, :]


def extend_attention(
    q: torch.Tensor,  # (T, H_q, d): the new tokens of all sequences, concatenated
    kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d), already holding the new k, v
    page_table: torch.Tensor,  # (B, >= max_pages) int32
    query_lens: list[int],  # (B,) new tokens per sequence
    seq_lens: list[int],  # (B,) KV length per sequence, new tokens included
    *,
    scale: float,
) -> torch.Tensor:  # (T, H_q, d)
    hq, d = q.shape[1], q.shape[2]
    ps, hkv = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty_like(q)
    start = 0
    for b, (lq, s) in enumerate(zip(query_lens, seq_lens)):
        n_pages = -(-s // ps)
        k, v = gather_kv(kv_cache, page_table[b : b + 1, :n_pages])  # (1, H_kv, n_pages*ps, d)
        k, v = k[:, :, :s], v[:, :, :s]  # (1, H_kv, S, d)
        qb = q[start : start + lq].transpose(0, 1).unsqueeze(0).to(k.dtype)  # (1, H_q, Lq, d)
        if lq == s:
            o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=hkv != hq)
        else:
            # bottom-right causal: query i sits at position s - lq + i and sees keys 0..that position
            pos = torch.arange(s - lq, s, device=q.device)  # (Lq,)
            mask = torch.arange(s, device=q.device)[None, :] <= pos[:, None]  # (Lq, S)
            o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=hkv != hq)
        out[start : start + lq] = o[0].transpose(0, 1).to(q.dtype)  # (Lq, H_q, d)
        start += lq
    return out


@dataclass(frozen=True)
class _StepPlan:
    """What every layer of one step shares: derived once in prepare()."""

    meta: AttentionMetadata  # the step this plan belongs to (compared by identity)
    pages: torch.Tensor  # (L, T) int64: slot_mapping // page_size
    offsets: torch.Tensor  # (L, T) int64: slot_mapping % page_size
    decode_valid: torch.Tensor | None  # (B_d, 1, 1, S) bool
    decode_max_len: int


@register_backend
class TorchBackend(AttentionBackend):
    name = "torch"
    _plan: _StepPlan | None = None

    def prepare(self, meta: AttentionMetadata) -> None:
        nd = meta.num_decodes
        max_len = max(meta.seq_lens_cpu[:nd], default=0)
        span = -(-max_len // self.page_size) * self.page_size
        self._plan = _StepPlan(
            meta=meta, pages=meta.slot_mapping // self.page_size, offsets=meta.slot_mapping % self.page_size,
            decode_valid=decode_mask(meta.seq_lens[:nd], span) if nd else None, decode_max_len=max_len)

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
        assert plan is not None
        write_kv(kv_cache, k, v, meta.slot_mapping[layer], pages=plan.pages[layer], offsets=plan.offsets[layer])
        nd = meta.num_decodes
        page_table = meta.page_tables[layer]  # (B, max_pages)
        decode = lambda qd: decode_attention(  # noqa: E731
            qd, kv_cache, page_table[:nd], meta.seq_lens[:nd], scale=self.scale,
            max_seq_len=plan.decode_max_len, valid=plan.decode_valid)
        if nd == meta.num_seqs:
            return decode(q)
        out = torch.empty_like(q)  # (T, H_q, d)
        if nd:
            out[:nd] = decode(q[:nd])
        out[nd:] = extend_attention(q[nd:], kv_cache, page_table[nd:], meta.query_lens_cpu[nd:],
                                    meta.seq_lens_cpu[nd:], scale=self.scale)
        return out
