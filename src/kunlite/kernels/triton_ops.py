"""Triton mechanism shared by the paged-attention kernels, and the KV write.

The pool is `kv_cache` (P, 2, page_size, H_kv, d): the keys of page p at `[p, 0]`, the values at
`[p, 1]`. It is a view over a byte buffer that also holds model parameters, so page ids run up
to the whole pool and `page * stride(0)` can pass 2**31 elements: every page offset is computed
in int64. Only the last dim must be contiguous; the other strides come from the tensor.

This module holds:
    write_kv           scatter the step's new k, v into their pool slots (launcher + kernel)
    _attend_block      one online-softmax step over BLOCK_N paged keys (decode and extend)
    check_*, dot_config  launcher-side asserts on shapes, strides and dtypes; dot settings
The decode kernels live in `triton_decode.py`, the prefill/extend kernel in `triton_extend.py`.

Interpreter (TRITON_INTERPRET=1, CPU tensors): the variable must be set before this module is
imported, because `@triton.jit` reads it at decoration time. The interpreter multiplies the raw
bits of bfloat16 operands in `tl.dot` (triton-lang/triton#11584), so under the interpreter the
launchers set UPCAST_DOT and the kernels upcast the operands to fp32 after they were rounded to
the input dtype; a bf16 x bf16 product is exact in fp32, so this matches a GPU MMA with fp32
accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Read once, like @triton.jit does when it decorates the kernels below.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x * scale) == exp2(x * scale * LOG2E)
MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# jit helpers (mechanism only)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attend_block(
    acc, m_i, l_i,  # (M, BLOCK_D) fp32, (M,) fp32, (M,) fp32: running output, max, denominator
    q,  # (M, BLOCK_D): zero beyond HEAD_DIM; fp32 when UPCAST_DOT
    k_ptr, v_ptr,  # pool base + this KV head's offset, for keys and for values
    page_row_ptr, stride_pt_page,  # page-table row of this sequence, and its column stride
    start_n, kv_end,  # this block covers positions start_n .. start_n+BLOCK_N-1, valid below kv_end
    q_pos,  # (M,) int32: sequence position of each query row (read only when CAUSAL)
    offs_d, mask_d,  # (BLOCK_D,)
    qk_scale,  # softmax scale * log2(e)
    stride_page, stride_slot,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One step of the online softmax over keys start_n .. start_n+BLOCK_N-1 of one sequence.

    Position t lives in page page_row[t // PAGE_SIZE] at slot t % PAGE_SIZE; the page offset is
    int64. Invariant (caller's duty): after the first block every row has seen at least one
    unmasked key, so m_i is finite and `exp2(m_i - m_new)` is never NaN.
    (One device function, not several: each call costs milliseconds under the interpreter.)
    """
    pos = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask_n = pos < kv_end  # (BLOCK_N,)
    page = tl.load(page_row_ptr + (pos // PAGE_SIZE) * stride_pt_page, mask=mask_n, other=0).to(tl.int64)
    tok = page * stride_page + (pos % PAGE_SIZE).to(tl.int64) * stride_slot  # (BLOCK_N,) int64
    kv_mask = mask_n[:, None] & mask_d[None, :]  # (BLOCK_N, BLOCK_D)
    # Masked loads never touch a slot past the sequence: it may hold NaN or another request's KV.
    k = tl.load(k_ptr + tok[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    if UPCAST_DOT:
        k = k.to(tl.float32)

    # -- compute qk (log2 domain)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, BLOCK_N) fp32
    if CAUSAL:
        visible = mask_n[None, :] & (pos[None, :] <= q_pos[:, None])  # (M, BLOCK_N)
    else:
        visible = mask_n[None, :]  # (1, BLOCK_N)
    qk = tl.where(visible, qk, float("-inf"))  # (M, BLOCK_N)

    # -- update m_i and l_i
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # (M,)
    alpha = tl.exp2(m_i - m_new)  # (M,): rescales what was accumulated under the old max
    p = tl.exp2(qk - m_new[:, None])  # (M, BLOCK_N)
    l_i = l_i * alpha + tl.sum(p, 1)  # (M,)

    # -- update the output accumulator (p rounded to the KV dtype, as on the GPU)
    v = tl.load(v_ptr + tok[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    p = p.to(v.dtype)  # (M, BLOCK_N)
    if UPCAST_DOT:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # (M, BLOCK_D)
    return acc, m_new, l_i


@triton.jit
def _write_kv_kernel(
    kv_ptr, k_ptr, v_ptr, slot_ptr,
    stride_page, stride_kv, stride_slot, stride_head,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_st,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per new token: copy its (H_kv, d) key and value into its pool slot."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t * stride_st)  # int64: page * PAGE_SIZE + offset; < 0 means padding, skip
    if slot < 0:
        return
    dst = (slot // PAGE_SIZE) * stride_page + (slot % PAGE_SIZE) * stride_slot  # int64

    offs_h = tl.arange(0, BLOCK_H)  # (BLOCK_H,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]  # (BLOCK_H, BLOCK_D)
    dst_hd = offs_h[:, None] * stride_head + offs_d[None, :]  # (BLOCK_H, BLOCK_D)

    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(kv_ptr + dst + dst_hd, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(kv_ptr + dst + stride_kv + dst_hd, v.to(kv_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launcher-side checks and choices
# ---------------------------------------------------------------------------------------------


def check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    assert all(t.device == dev for t in tensors), f"tensors on several devices: {[t.device for t in tensors]}"
    assert dev.type == "cuda" or INTERPRET, (
        "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before kunlite.kernels.triton_ops "
        "is imported"
    )


def check_kv_cache(kv_cache: torch.Tensor) -> tuple[int, int, int]:
    """Assert the pool layout; return (page_size, num_kv_heads, head_dim)."""
    assert kv_cache.dim() == 5 and kv_cache.shape[1] == 2, (
        f"kv_cache must be (P, 2, page_size, H_kv, d), got {tuple(kv_cache.shape)}"
    )
    assert kv_cache.stride(-1) == 1, "kv_cache's last dim must be contiguous"
    assert kv_cache.dtype in _FLOAT_DTYPES, f"kv_cache dtype {kv_cache.dtype}"
    _, _, page_size, num_kv_heads, head_dim = kv_cache.shape
    assert page_size >= 1 and head_dim <= MAX_HEAD_DIM, f"page_size {page_size}, head_dim {head_dim}"
    return page_size, num_kv_heads, head_dim


def check_heads(
    x: torch.Tensor,  # (N, H, d)
    name: str,
    *,
    head_dim: int,
    dtype: torch.dtype,
) -> None:
    assert x.dim() == 3 and x.shape[2] == head_dim, f"{name} must be (N, H, {head_dim}), got {tuple(x.shape)}"
    assert x.stride(-1) == 1, f"{name}'s last dim must be contiguous (rows and heads may be strided)"
    assert x.dtype == dtype, f"{name} dtype {x.dtype} != kv_cache dtype {dtype}"


def check_attention_io(
    q: torch.Tensor,  # (N, H_q, d)
    kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d)
    out: torch.Tensor | None,  # (N, H_q, d) or None: allocate
) -> tuple[torch.Tensor, int, int]:  # out (N, H_q, d), page_size, group = H_q / H_kv
    page_size, num_kv_heads, head_dim = check_kv_cache(kv_cache)
    check_heads(q, "q", head_dim=head_dim, dtype=kv_cache.dtype)
    assert q.shape[1] % num_kv_heads == 0, f"H_q {q.shape[1]} not a multiple of H_kv {num_kv_heads}"
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (N, H_q, d)
    check_heads(out, "out", head_dim=head_dim, dtype=q.dtype)
    assert out.shape == q.shape, f"out {tuple(out.shape)} != q {tuple(q.shape)}"
    return out, page_size, q.shape[1] // num_kv_heads


def check_index(x: torch.Tensor, name: str, *, dims: int, dtype: torch.dtype) -> None:
    """Index tensors (page tables, lengths, slots) may have any strides; the kernels take them."""
    assert x.dim() == dims and x.dtype == dtype, f"{name} must be {dims}-d {dtype}, got {tuple(x.shape)} {x.dtype}"


def dot_config(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST_DOT, DOT_PRECISION): fp32 operands take the exact "ieee" path, never tf32."""
    upcast = INTERPRET and dtype == torch.bfloat16
    return upcast, "ieee" if upcast or dtype == torch.float32 else "tf32"


def write_kv(
    kv_cache: torch.Tensor,  # (P, 2, page_size, H_kv, d)
    k: torch.Tensor,  # (T, H_kv, d), rows and heads may be strided (a view of a fused qkv)
    v: torch.Tensor,  # (T, H_kv, d)
    slot_mapping: torch.Tensor,  # (T,) int64: page * page_size + offset; negative = skip
) -> None:
    """Scatter the new k, v of a step into their pool slots."""
    page_size, num_kv_heads, head_dim = check_kv_cache(kv_cache)
    check_heads(k, "k", head_dim=head_dim, dtype=kv_cache.dtype)
    check_heads(v, "v", head_dim=head_dim, dtype=kv_cache.dtype)
    check_index(slot_mapping, "slot_mapping", dims=1, dtype=torch.int64)
    T = slot_mapping.shape[0]
    assert k.shape == v.shape == (T, num_kv_heads, head_dim), f"k {tuple(k.shape)}, v {tuple(v.shape)}, T {T}"
    check_device(kv_cache, k, v, slot_mapping)
    if T == 0:
        return
    sp, skv, ss, sh, _ = kv_cache.stride()
    _write_kv_kernel[(T,)](
        kv_cache, k, v, slot_mapping,
        sp, skv, ss, sh,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), slot_mapping.stride(0),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 2,
    )
