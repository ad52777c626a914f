"""Prefill/extend attention (varlen causal over a paged prefix plus the new tokens) against fp64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paged_kv_case import (
    assert_written_and_close,
    build_paged_kv,
    lengths,
    reference_attention,
    strided_heads,
)

from kunlite.kernels import torch_backend
from kunlite.kernels.triton_extend import extend_attention


def run_extend(
    prefix_lens: list[int], query_lens: list[int], *, page_size: int, num_kv_heads: int, group: int,
    head_dim: int, dtype: torch.dtype, seed: int, lead_rows: int = 0,
) -> None:
    """`lead_rows` rows of q before the batch's first row stand for decodes the launch must not touch."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in zip(prefix_lens, query_lens)]
    case = build_paged_kv(gen, seq_lens, page_size=page_size, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, dtype=dtype)
    hq, T = num_kv_heads * group, lead_rows + sum(query_lens)
    q = strided_heads(gen, T, hq, head_dim, dtype)  # (T, H_q, d), strided rows
    out = torch.full((T, hq, head_dim), float("nan"), dtype=dtype)  # (T, H_q, d), poisoned
    starts = torch.tensor([0, *query_lens]).cumsum(0) + lead_rows  # (B+1,)
    scale = head_dim**-0.5
    extend_attention(q, case.kv_cache, case.page_table, starts.to(torch.int32),
                     torch.tensor(seq_lens, dtype=torch.int32), scale=scale, max_query_len=max(query_lens),
                     out=out)
    ref = torch.cat([
        reference_attention(q[int(starts[b]) : int(starts[b + 1])].float(), case.keys[b], case.values[b],
                            list(range(p, p + n)), scale=scale)
        for b, (p, n) in enumerate(zip(prefix_lens, query_lens))
    ])  # (T - lead_rows, H_q, d)
    assert out[:lead_rows].isnan().all(), "rows outside the batch were written"
    assert_written_and_close(out[lead_rows:], ref, dtype)


@st.composite
def extend_shapes(draw: st.DrawFn) -> dict:
    page_size = draw(st.sampled_from([16, 64]))
    batch = draw(st.integers(1, 8))
    prefix = st.one_of(st.just(0), lengths(page_size))  # 0: a fresh prefill; else a cached prefix
    return {
        "prefix_lens": draw(st.lists(prefix, min_size=batch, max_size=batch)),
        "query_lens": draw(st.lists(lengths(page_size), min_size=batch, max_size=batch)),
        "page_size": page_size,
        "num_kv_heads": draw(st.sampled_from([1, 2])),
        "group": draw(st.sampled_from([1, 3, 8])),
        "head_dim": draw(st.sampled_from([80, 80, 64, 128])),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extend_shapes())
def test_extend_matches_reference(shapes: dict) -> None:
    run_extend(**shapes)


@pytest.mark.parametrize(
    ("head_dim", "page_size", "dtype", "prefix_lens", "query_lens"),
    [
        (96, 8, torch.float16, [0, 9, 8], [13, 1, 8]),
        (256, 128, torch.bfloat16, [0, 130], [128, 3]),
        (256, 8, torch.float32, [5, 0], [1, 17]),
        (64, 128, torch.float32, [200, 0], [70, 1]),
        (32, 16, torch.float32, [0, 17], [20, 4]),  # the small head dim of a toy model
    ],
)
def test_extend_other_head_dims_and_page_sizes(head_dim: int, page_size: int, dtype: torch.dtype,
                                               prefix_lens: list[int], query_lens: list[int]) -> None:
    run_extend(prefix_lens, query_lens, page_size=page_size, num_kv_heads=2, group=3, head_dim=head_dim,
               dtype=dtype, seed=head_dim + page_size)


def test_extend_leaves_rows_outside_the_batch_alone() -> None:
    run_extend([0, 40], [33, 7], page_size=16, num_kv_heads=1, group=8, head_dim=80, dtype=torch.float32,
               seed=5, lead_rows=3)


def test_extend_matches_torch_backend_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    prefix_lens, query_lens = [0, 20, 64], [19, 1, 30]
    seq_lens = [p + n for p, n in zip(prefix_lens, query_lens)]
    case = build_paged_kv(gen, seq_lens, page_size=16, num_kv_heads=2, head_dim=80, dtype=torch.bfloat16)
    q = torch.randn(sum(query_lens), 6, 80, generator=gen).to(torch.bfloat16)  # (T, H_q, d)
    starts = torch.tensor([0, *query_lens], dtype=torch.int32).cumsum(0).to(torch.int32)  # (B+1,)
    out = extend_attention(q, case.kv_cache, case.page_table, starts, torch.tensor(seq_lens, dtype=torch.int32),
                           scale=0.1, max_query_len=max(query_lens))
    ref = torch_backend.extend_attention(q.float(), case.kv_cache.float(), case.page_table, query_lens, seq_lens,
                                         scale=0.1)
    assert_written_and_close(out, ref, torch.bfloat16)
