"""Builders for kernel tests: a NaN-poisoned, strided KV pool with scattered pages, and an fp64
per-sequence reference that never looks at the pool.

The pool has P pages; pages [0, P/2) notionally held model weights a moment ago, and at least
one page of every case lies beyond them. Every slot that holds no live token (other pages, the
tail of a sequence's last page, the padding heads and head-dim columns of the strided view)
is NaN, so a kernel that reads a wrong page or slot returns NaN. Pools and page tables are
strided views by default, as the engine's are (a pool inside the parameter buffer, page tables
sliced out of numpy transposes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

# Tolerances of kernel output against the fp64 reference computed from the same (rounded) inputs.
# bf16: the kernel rounds the softmax weights to bf16 before P @ V (as a GPU MMA does) and its
# output to bf16; each costs up to 2**-8 relative.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def lengths(page_size: int) -> st.SearchStrategy[int]:
    """1, exactly a page, two pages, and lengths that are not a multiple of the page (< 3 pages)."""
    ragged = st.tuples(st.integers(0, 2), st.integers(1, page_size - 1)).map(lambda t: t[0] * page_size + t[1])
    return st.one_of(st.just(1), st.just(page_size), st.just(2 * page_size), ragged)


def make_pool(
    *, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, strided: bool
) -> torch.Tensor:  # (P, 2, page_size, H_kv, d), all NaN
    """A pool view at a storage offset; `strided` pads the head and head-dim axes of its buffer."""
    hp, dp = (num_kv_heads + 1, head_dim + 16) if strided else (num_kv_heads, head_dim)
    offset = 7 if strided else 0
    buf = torch.full((offset + num_pages * 2 * page_size * hp * dp,), float("nan"), dtype=dtype)
    pool = buf[offset:].view(num_pages, 2, page_size, hp, dp)  # (P, 2, ps, hp, dp)
    return pool[:, :, :, :num_kv_heads, :head_dim]  # (P, 2, ps, H_kv, d)


def scattered_pages(gen: torch.Generator, num_needed: int) -> tuple[list[int], int]:
    """(page ids, pool size): distinct pages spread over a pool twice the size needed.

    One page is forced beyond the weights region [0, P/2); the rest fall anywhere.
    """
    num_pages = 2 * num_needed + 2
    upper = num_pages // 2 + int(torch.randint(num_pages - num_pages // 2, (1,), generator=gen))
    rest = [p for p in torch.randperm(num_pages, generator=gen).tolist() if p != upper]
    pages = [upper] + rest[: num_needed - 1]
    order = torch.randperm(num_needed, generator=gen).tolist()
    return [pages[i] for i in order], num_pages


@dataclass
class PagedKV:
    kv_cache: torch.Tensor  # (P, 2, page_size, H_kv, d): live slots filled, everything else NaN
    page_table: torch.Tensor  # (B, max_pages) int32, column stride 2 when strided; garbage past the pages
    seq_lens: list[int]
    keys: list[torch.Tensor]  # per sequence (S_b, H_kv, d) fp32, the values stored in the pool
    values: list[torch.Tensor]  # per sequence (S_b, H_kv, d) fp32

    @property
    def page_size(self) -> int:
        return int(self.kv_cache.shape[2])

    def slots(self, b: int, positions: range) -> torch.Tensor:  # (len(positions),) int64
        pos = torch.tensor(list(positions), dtype=torch.int64)
        return self.page_table[b, pos // self.page_size].long() * self.page_size + pos % self.page_size


def build_paged_kv(
    gen: torch.Generator,
    seq_lens: list[int],
    *,
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    strided: bool = True,
    fill: bool = True,
) -> PagedKV:
    """Random KV for each sequence in scattered pages; `fill=False` leaves the pool all NaN."""
    pages_per_seq = [cdiv(s, page_size) for s in seq_lens]
    pages, num_pages = scattered_pages(gen, sum(pages_per_seq))
    max_pages = max(pages_per_seq) + 1  # one spare column of garbage for every sequence
    page_table = torch.randint(0, num_pages, (len(seq_lens), max_pages, 2), generator=gen, dtype=torch.int32)
    page_table = page_table[:, :, 0] if strided else page_table[:, :, 0].contiguous()  # (B, max_pages)
    start = 0
    for b, n in enumerate(pages_per_seq):
        page_table[b, :n] = torch.tensor(pages[start : start + n], dtype=torch.int32)
        start += n
    kv_cache = make_pool(num_pages=num_pages, page_size=page_size, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, dtype=dtype, strided=strided)
    case = PagedKV(kv_cache, page_table, list(seq_lens), [], [])
    for b, s in enumerate(seq_lens):
        k = torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype)  # (S, H_kv, d)
        v = torch.randn(s, num_kv_heads, head_dim, generator=gen).to(dtype)  # (S, H_kv, d)
        if fill:
            slots = case.slots(b, range(s))  # (S,)
            kv_cache[slots // page_size, 0, slots % page_size] = k
            kv_cache[slots // page_size, 1, slots % page_size] = v
        case.keys.append(k.float())
        case.values.append(v.float())
    return case


def strided_heads(
    gen: torch.Generator, rows: int, num_heads: int, head_dim: int, dtype: torch.dtype
) -> torch.Tensor:  # (rows, H, d), a view of a wider fused projection output, as in q = qkv[:, :q_size]
    fused = torch.randn(rows, (num_heads + 3) * head_dim, generator=gen).to(dtype)  # (rows, (H+3)*d)
    return fused[:, head_dim : (num_heads + 1) * head_dim].view(rows, num_heads, head_dim)


def reference_attention(
    q: torch.Tensor,  # (L, H_q, d)
    keys: torch.Tensor,  # (S, H_kv, d)
    values: torch.Tensor,  # (S, H_kv, d)
    positions: list[int],  # (L,) position of each query; it sees keys 0..position
    *,
    scale: float,
) -> torch.Tensor:  # (L, H_q, d) fp64
    L, hq, d = q.shape
    S, hkv, _ = keys.shape
    qg = q.double().view(L, hkv, hq // hkv, d)  # (L, H_kv, G, d)
    scores = torch.einsum("lhgd,shd->lhgs", qg, keys.double()) * scale  # (L, H_kv, G, S)
    visible = torch.arange(S)[None, :] <= torch.tensor(positions)[:, None]  # (L, S)
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (L, H_kv, G, S)
    return torch.einsum("lhgs,shd->lhgd", probs, values.double()).reshape(L, hq, d)


def assert_written_and_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """`out` was NaN before the call: every element must be written, and match `ref`."""
    nan = torch.isnan(out)
    assert not nan.any(), f"{int(nan.sum())} of {out.numel()} output elements not written (or NaN)"
    torch.testing.assert_close(out.double(), ref.double(), **TOLERANCES[dtype])
