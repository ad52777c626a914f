"""The CPU paged decode attention (kernels/cpu_decode_attention.c, fp32 and bf16) against the torch reference
in fp64.

Pages are scattered over the pool and shuffled per sequence, lengths fall on and off page
boundaries (1, a page, a page + 1, ragged), GQA group sizes 1..8, head dims incl. 80, and the
pool's unused slots and pages hold NaN: a kernel that reads one slot too many fails.
"""

from __future__ import annotations

import platform

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kunlite.kernels import cpu_decode, torch_backend

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                                or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                reason="the kernels need x86-64 with AVX2/FMA")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 8),
    page_size=st.sampled_from([1, 4, 16, 64]),
    num_kv_heads=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 3, 8]),
    head_dim=st.sampled_from([8, 64, 80, 128]),
    lens=st.lists(st.integers(1, 300), min_size=8, max_size=8),
    on_boundary=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_the_reference(batch: int, page_size: int, num_kv_heads: int, group: int, head_dim: int,
                               lens: list[int], on_boundary: bool, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    seq_lens = lens[:batch]
    if on_boundary:  # a page exactly full, and one token past it
        seq_lens = [max(1, n // page_size * page_size) + (i % 2) for i, n in enumerate(seq_lens)]
    pages_per_seq = [-(-n // page_size) for n in seq_lens]
    width = max(pages_per_seq) + 1  # table rows padded past the last page
    num_pages = sum(pages_per_seq) + 3
    kv_cache = torch.full((num_pages, 2, page_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)  # (P, 2, ps, H_kv, d)
    perm = torch.randperm(num_pages, generator=g)
    table = torch.zeros(batch, width, dtype=torch.int32)  # (B, width): padding points at page 0
    start = 0
    for b, (n, np_) in enumerate(zip(seq_lens, pages_per_seq)):
        ids = perm[start : start + np_]
        start += np_
        table[b, :np_] = ids.int()
        for j, p in enumerate(ids.tolist()):  # only the live slots get numbers; the rest stay NaN
            live = min(page_size, n - j * page_size)
            kv_cache[p, :, :live] = (torch.randn(2, live, num_kv_heads, head_dim, generator=g) * 3).to(dtype)
    q = torch.randn(batch, num_kv_heads * group, head_dim, generator=g).to(dtype)  # (B, H_q, d)
    lens_t = torch.tensor(seq_lens, dtype=torch.int32)  # (B,)
    scale = head_dim ** -0.5

    out = cpu_decode.paged_decode_attention(q, kv_cache, table, lens_t, scale)
    # The reference reads whole pages and masks the tail, so it needs finite numbers there.
    want = torch_backend.decode_attention(q.double(), torch.nan_to_num(kv_cache, nan=0.0).double(), table, lens_t,
                                          scale=scale, max_seq_len=max(seq_lens))
    assert out.shape == q.shape and out.dtype == dtype
    # fp32 sums of the same values; a bf16 result adds one rounding (2^-9 relative, values ~3)
    atol, rtol = (2e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2 ** -8)
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)


def test_supports_only_what_it_computes() -> None:
    q = torch.randn(1, 2, 64)
    pool = torch.zeros(2, 2, 4, 1, 64)
    assert cpu_decode.supports_attention(q, pool)
    assert cpu_decode.supports_attention(q.bfloat16(), pool.bfloat16())
    assert not cpu_decode.supports_attention(q.half(), pool.half())  # fp16: torch's path
    assert not cpu_decode.supports_attention(q, pool.bfloat16())  # mixed: torch's path
    assert not cpu_decode.supports_attention(torch.randn(1, 2, 60), torch.zeros(2, 2, 4, 1, 60))  # d % 8
    assert not cpu_decode.supports_attention(q, torch.zeros(2, 2, 4, 1, 72)[..., :64])  # a strided pool
