"""Paged decode attention in Triton: split-KV (flash-decoding) with a log-sum-exp merge.

One query token per sequence. Program (b, kv_head, split) handles the whole grouped-query group
of kv_head (G = H_q / H_kv query heads as the M rows of one tl.dot), so each key and value is
read once per group, and covers one contiguous range of the sequence's positions:

    split_len = cdiv(cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N   (whole blocks per split)
    split s covers [s * split_len, min((s + 1) * split_len, seq_len)), possibly empty

Each split stores its normalised partial output o_s and lse_s = log2(sum exp2(qk)) (base 2);
the merge kernel combines them: out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m), m = max lse_s.
An empty split stores lse = -inf and weighs nothing. With one split the first kernel writes the
output directly and no merge runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kunlite.kernels.triton_ops import (
    INTERPRET,
    LOG2E,
    _attend_block,
    check_attention_io,
    check_device,
    check_index,
    dot_config,
)


@triton.jit
def _decode_split_kernel(
    q_ptr, kv_ptr, page_table_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_page, stride_kv, stride_slot, stride_head,
    stride_pt, stride_pt_page, stride_sl,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    qk_scale, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    STORE_LSE: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b * stride_sl)  # int32, >= 1
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)  # start >= end: an empty split

    offs_g = tl.arange(0, BLOCK_G)  # (BLOCK_G,): rows of the group, padded to a tl.dot size
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g  # (BLOCK_G,) query heads of this group
    q_mask = mask_g[:, None] & mask_d[None, :]  # (BLOCK_G, BLOCK_D)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)  # (BLOCK_G, BLOCK_D)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    k_ptr = kv_ptr + kv_head * stride_head  # keys of this head: [page, 0, slot, kv_head, :]
    v_ptr = k_ptr + stride_kv  # values: [page, 1, slot, kv_head, :]
    page_row_ptr = page_table_ptr + b.to(tl.int64) * stride_pt

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running sum of exp2(qk - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)  # running sum of exp2(qk - m_i) v
    # Every block starts below `end`, so it holds a visible key and m_i turns finite at once.
    for start_n in range(start, end, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_ptr, v_ptr, page_row_ptr, stride_pt_page, start_n, end, offs_g,  # q_pos: unused
            offs_d, mask_d, qk_scale, stride_page, stride_slot,
            PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N, CAUSAL=False,
            UPCAST_DOT=UPCAST_DOT, DOT_PRECISION=DOT_PRECISION,
        )

    # -- normalise; an empty split has l_i == 0 and stores o = 0, lse = -inf
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # (BLOCK_G,)
    o = acc / l_safe[:, None]  # (BLOCK_G, BLOCK_D)
    o_off = b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=q_mask)
    if STORE_LSE:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))  # (BLOCK_G,)
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=mask_g)


@triton.jit
def _decode_merge_kernel(
    o_mid_ptr, lse_ptr, out_ptr,
    stride_mb, stride_mh, stride_ms,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (b, head): log-sum-exp merge of the splits' partial outputs."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=mask_s,
                  other=float("-inf"))  # (BLOCK_S,); split 0 is never empty, so max(lse) is finite
    w = tl.exp2(lse - tl.max(lse, 0))  # (BLOCK_S,): 0 for empty and padded splits
    o = tl.load(o_mid_ptr + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
                mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)  # (BLOCK_D,)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def _decode_block_n(head_dim: int, dtype: torch.dtype) -> int:
    if INTERPRET:
        return 128  # every op costs the same under the interpreter: few large blocks
    return 32 if head_dim > 128 or dtype == torch.float32 else 64


def decode_attention(
    q: torch.Tensor,  # (B, H_q, d): one new token per sequence; rows and heads may be strided
    kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d), already holding the new k, v
    page_table: torch.Tensor,  # (B, >= max_pages) int32
    seq_lens: torch.Tensor,  # (B,) int32, each >= 1
    *,
    scale: float,
    num_kv_splits: int,
    out: torch.Tensor | None = None,  # (B, H_q, d): written in full
) -> torch.Tensor:  # (B, H_q, d)
    """Attention of each sequence's single query over its paged KV (split-KV, GQA per program)."""
    out, page_size, group = check_attention_io(q, kv_cache, out)
    B, num_heads, head_dim = q.shape
    num_kv_heads = num_heads // group
    check_index(page_table, "page_table", dims=2, dtype=torch.int32)
    check_index(seq_lens, "seq_lens", dims=1, dtype=torch.int32)
    assert page_table.shape[0] == B and seq_lens.shape[0] == B, "page_table/seq_lens batch mismatch"
    assert num_kv_splits >= 1, f"num_kv_splits {num_kv_splits}"
    check_device(q, kv_cache, page_table, seq_lens, out)
    if B == 0:
        return out

    upcast, precision = dot_config(q.dtype)
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    direct = num_kv_splits == 1
    if direct:
        o_mid = out  # (B, H_q, d), the split axis has stride 0
        lse = out  # unused: STORE_LSE is off
        o_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (0, 0)
    else:
        o_mid = torch.empty((B, num_heads, num_kv_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((B, num_heads, num_kv_splits), dtype=torch.float32, device=q.device)
        o_strides = o_mid.stride()[:3]
        lse_strides = lse.stride()[:2]
    sp, skv, ss, sh, _ = kv_cache.stride()
    _decode_split_kernel[(B, num_kv_heads, num_kv_splits)](
        q, kv_cache, page_table, seq_lens, o_mid, lse,
        q.stride(0), q.stride(1),
        sp, skv, ss, sh,
        page_table.stride(0), page_table.stride(1), seq_lens.stride(0),
        *o_strides,
        *lse_strides,
        scale * LOG2E, num_kv_splits,
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=_decode_block_n(head_dim, q.dtype),
        STORE_LSE=not direct, UPCAST_DOT=upcast, DOT_PRECISION=precision,
        num_warps=4, num_stages=2,
    )
    if not direct:
        _decode_merge_kernel[(B, num_heads)](
            o_mid, lse, out,
            *o_mid.stride()[:3],
            *lse.stride()[:2],
            out.stride(0), out.stride(1),
            num_kv_splits,
            HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_kv_splits), BLOCK_D=block_d,
            num_warps=4 if head_dim > 64 else 2,
        )
    return out


def choose_num_kv_splits(
    *,
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    num_sms: int | None,
    min_tokens_per_split: int = 256,
    max_splits: int = 16,
) -> int:
    """Splits per sequence: enough programs to fill the GPU twice, each with real work.

    `num_sms` None (CPU, the interpreter): split by length alone, at most 4, so that long
    sequences in CPU tests still go through the merge.
    """
    by_length = triton.cdiv(max_seq_len, min_tokens_per_split)
    if num_sms is None:
        return max(1, min(max_splits, by_length, 4))
    by_occupancy = triton.cdiv(2 * num_sms, max(1, num_seqs * num_kv_heads))
    return max(1, min(max_splits, by_length, by_occupancy))
