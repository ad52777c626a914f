"""KV write: the step's new k, v land in their pool slots, and nothing else changes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paged_kv_case import make_pool, scattered_pages, strided_heads

from kunlite.kernels import torch_backend
from kunlite.kernels.triton_ops import write_kv


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_tokens=st.integers(1, 40),
    page_size=st.sampled_from([8, 16, 64, 128]),
    num_kv_heads=st.sampled_from([1, 2, 8]),
    head_dim=st.sampled_from([64, 80, 96, 128, 256]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    num_padding=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_write_kv_scatters_into_slots(num_tokens: int, page_size: int, num_kv_heads: int, head_dim: int,
                                      dtype: torch.dtype, num_padding: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    pages, num_pages = scattered_pages(gen, -(-num_tokens // page_size) + 1)
    kv_cache = make_pool(num_pages=num_pages, page_size=page_size, num_kv_heads=num_kv_heads,
                         head_dim=head_dim, dtype=dtype, strided=True)  # (P, 2, ps, H_kv, d), NaN
    buffer = kv_cache._base  # the whole NaN buffer, padding heads and columns included
    expected = buffer.clone()
    expected_view = expected.as_strided(kv_cache.shape, kv_cache.stride(), kv_cache.storage_offset())

    # Distinct slots spread over the chosen pages, then padding tokens (slot -1) mixed in.
    slots = (torch.tensor(pages).repeat_interleave(page_size) * page_size
             + torch.arange(page_size).repeat(len(pages)))  # every slot of the chosen pages
    slots = slots[torch.randperm(len(slots), generator=gen)[:num_tokens]]  # (T,)
    slot_mapping = torch.cat([slots, torch.full((num_padding,), -1)])  # (T + pad,)
    slot_mapping = slot_mapping[torch.randperm(len(slot_mapping), generator=gen)]
    T = len(slot_mapping)
    k = strided_heads(gen, T, num_kv_heads, head_dim, dtype)  # (T, H_kv, d), view of a fused qkv
    v = strided_heads(gen, T, num_kv_heads, head_dim, dtype)  # (T, H_kv, d)

    write_kv(kv_cache, k, v, slot_mapping)
    live = slot_mapping >= 0
    torch_backend.write_kv(expected_view, k[live], v[live], slot_mapping[live])
    torch.testing.assert_close(buffer, expected, atol=0, rtol=0, equal_nan=True)


def test_write_kv_rejects_a_dtype_mismatch() -> None:
    kv_cache = make_pool(num_pages=2, page_size=8, num_kv_heads=1, head_dim=64, dtype=torch.bfloat16,
                         strided=False)
    k = torch.zeros(1, 1, 64)  # fp32 into a bf16 pool is a caller's bug, not a silent cast
    with pytest.raises(AssertionError, match="dtype"):
        write_kv(kv_cache, k, k, torch.zeros(1, dtype=torch.int64))
