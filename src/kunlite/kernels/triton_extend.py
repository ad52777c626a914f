"""Prefill/extend attention in Triton: causal attention of a request's new tokens over its paged KV.

Serves chunked prefill and prefix-cache hits over a variable-length batch (no padding). The new
k, v were already written to the pool, so every key (cached prefix and new tokens alike) is read
through the page table. For sequence b with q_len new tokens and seq_len keys:

    prefix = seq_len - q_len          cached positions 0 .. prefix-1
    query row i sits at position prefix + i and sees keys 0 .. prefix + i

Program (b, kv_head, m_block) packs the grouped-query group into its rows: the q_len * G rows
(token i, query head kv_head * G + j) are numbered i * G + j and cut into blocks of BLOCK_M, so
each key and value a program reads serves the whole group. Keys below the block's first
position are visible to every row, so the first loop runs without the causal mask; the second
loop covers the diagonal with it. Blocks past the sequence's rows exit at once.
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
def _extend_kernel(
    q_ptr, kv_ptr, page_table_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
    stride_qt, stride_qh,
    stride_page, stride_kv, stride_slot, stride_head,
    stride_pt, stride_pt_page, stride_qsl, stride_sl,
    stride_ot, stride_oh,
    qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    m_block = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + b * stride_qsl)  # first row of this sequence in q / out
    q_len = tl.load(query_start_loc_ptr + (b + 1) * stride_qsl) - q_start
    if m_block * BLOCK_M >= q_len * GROUP:
        return
    seq_len = tl.load(seq_lens_ptr + b * stride_sl)
    prefix = seq_len - q_len

    # Row r of the block is (token r // GROUP, query head kv_head * GROUP + r % GROUP).
    offs_r = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask_r = offs_r < q_len * GROUP
    mask_d = offs_d < HEAD_DIM
    token = offs_r // GROUP  # (BLOCK_M,) new-token index within the sequence
    heads = kv_head * GROUP + offs_r % GROUP  # (BLOCK_M,)
    q_pos = prefix + token  # (BLOCK_M,) sequence position; rows past q_len see every key
    rows = (q_start + token).to(tl.int64)  # (BLOCK_M,) rows of q / out
    q_off = rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
    o_off = rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
    q_mask = mask_r[:, None] & mask_d[None, :]  # (BLOCK_M, BLOCK_D)
    q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    k_ptr = kv_ptr + kv_head * stride_head  # keys of this head: [page, 0, slot, kv_head, :]
    v_ptr = k_ptr + stride_kv  # values: [page, 1, slot, kv_head, :]
    page_row_ptr = page_table_ptr + b.to(tl.int64) * stride_pt

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(qk - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running sum of exp2(qk - m_i) v

    # Keys [0, full_end) lie at or below the block's first position (< seq_len): no causal mask.
    first_pos = prefix + (m_block * BLOCK_M) // GROUP
    full_end = (first_pos // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_ptr, v_ptr, page_row_ptr, stride_pt_page, start_n, full_end, q_pos,
            offs_d, mask_d, qk_scale, stride_page, stride_slot,
            PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N, CAUSAL=False,
            UPCAST_DOT=UPCAST_DOT, DOT_PRECISION=DOT_PRECISION,
        )
    # The diagonal: keys [full_end, last row's position]. Its first block starts at or below
    # every row's position, so each row sees a key there and m_i is finite from then on.
    diag_end = tl.minimum(seq_len, prefix + (m_block * BLOCK_M + BLOCK_M - 1) // GROUP + 1)
    for start_n in range(full_end, diag_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_ptr, v_ptr, page_row_ptr, stride_pt_page, start_n, seq_len, q_pos,
            offs_d, mask_d, qk_scale, stride_page, stride_slot,
            PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N, CAUSAL=True,
            UPCAST_DOT=UPCAST_DOT, DOT_PRECISION=DOT_PRECISION,
        )

    # -- normalise: every row saw key 0, so l_i > 0
    o = acc / l_i[:, None]  # (BLOCK_M, BLOCK_D)
    tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=q_mask)


def _extend_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim and dtype; BLOCK_M counts packed rows."""
    if INTERPRET:
        return 64, 64, 4, 1  # every op costs the same under the interpreter: few large blocks
    if head_dim > 128 or dtype == torch.float32:
        return 64, 32, 4, 2
    if head_dim > 64:
        return 128, 64, 8, 2
    return 128, 64, 4, 3


def extend_attention(
    q: torch.Tensor,  # (T, H_q, d): rows and heads may be strided (a view of a fused qkv)
    kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d), already holding the new k, v
    page_table: torch.Tensor,  # (B, >= max_pages) int32
    query_start_loc: torch.Tensor,  # (B+1,) int32: rows of q of sequence b; need not start at 0
    seq_lens: torch.Tensor,  # (B,) int32: KV length of each sequence, new tokens included
    *,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,  # (T, H_q, d): rows of the B sequences are written
) -> torch.Tensor:  # (T, H_q, d)
    """Causal attention of each sequence's new tokens over its cached prefix and themselves."""
    out, page_size, group = check_attention_io(q, kv_cache, out)
    num_kv_heads, head_dim = q.shape[1] // group, q.shape[2]
    check_index(page_table, "page_table", dims=2, dtype=torch.int32)
    check_index(query_start_loc, "query_start_loc", dims=1, dtype=torch.int32)
    check_index(seq_lens, "seq_lens", dims=1, dtype=torch.int32)
    B = seq_lens.shape[0]
    assert page_table.shape[0] == B and query_start_loc.shape[0] == B + 1, "batch sizes disagree"
    check_device(q, kv_cache, page_table, query_start_loc, seq_lens, out)
    if B == 0 or max_query_len == 0:
        return out

    block_m, block_n, num_warps, num_stages = _extend_config(head_dim, q.dtype)
    upcast, precision = dot_config(q.dtype)
    sp, skv, ss, sh, _ = kv_cache.stride()
    _extend_kernel[(B, num_kv_heads, triton.cdiv(max_query_len * group, block_m))](
        q, kv_cache, page_table, query_start_loc, seq_lens, out,
        q.stride(0), q.stride(1),
        sp, skv, ss, sh,
        page_table.stride(0), page_table.stride(1), query_start_loc.stride(0), seq_lens.stride(0),
        out.stride(0), out.stride(1),
        scale * LOG2E,
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=block_n,
        UPCAST_DOT=upcast, DOT_PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
