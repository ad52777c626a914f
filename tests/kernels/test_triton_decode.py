"""Paged decode attention (split-KV + log-sum-exp merge, GQA in one program) against fp64."""

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
from kunlite.kernels.triton_decode import choose_num_kv_splits, decode_attention


def run_decode(
    seq_lens: list[int], *, page_size: int, num_kv_heads: int, group: int, head_dim: int,
    dtype: torch.dtype, num_kv_splits: int, seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    case = build_paged_kv(gen, seq_lens, page_size=page_size, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, dtype=dtype)
    B, hq = len(seq_lens), num_kv_heads * group
    q = strided_heads(gen, B, hq, head_dim, dtype)  # (B, H_q, d), strided rows
    out = torch.full((B, hq, head_dim), float("nan"), dtype=dtype)  # (B, H_q, d), poisoned
    scale = head_dim**-0.5
    decode_attention(q, case.kv_cache, case.page_table, torch.tensor(seq_lens, dtype=torch.int32),
                     scale=scale, num_kv_splits=num_kv_splits, out=out)
    ref = torch.cat([
        reference_attention(q[b : b + 1].float(), case.keys[b], case.values[b], [s - 1], scale=scale)
        for b, s in enumerate(seq_lens)
    ])  # (B, H_q, d)
    assert_written_and_close(out, ref, dtype)


@st.composite
def decode_shapes(draw: st.DrawFn) -> dict:
    page_size = draw(st.sampled_from([16, 64]))
    return {
        "seq_lens": draw(st.lists(lengths(page_size), min_size=1, max_size=8)),
        "page_size": page_size,
        "num_kv_heads": draw(st.sampled_from([1, 2])),
        "group": draw(st.sampled_from([1, 3, 8])),
        "head_dim": draw(st.sampled_from([80, 80, 64, 128])),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "num_kv_splits": draw(st.sampled_from([1, 2, 3, 5])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decode_shapes())
def test_decode_matches_reference(shapes: dict) -> None:
    run_decode(**shapes)


@pytest.mark.parametrize(
    ("head_dim", "page_size", "dtype", "seq_lens"),
    [
        (96, 8, torch.float16, [1, 8, 45]),
        (256, 128, torch.bfloat16, [1, 128, 130]),
        (256, 8, torch.float32, [7, 17]),
        (64, 128, torch.float32, [300, 1]),
        (32, 16, torch.float32, [3, 33]),  # the small head dim of a toy model
    ],
)
def test_decode_other_head_dims_and_page_sizes(head_dim: int, page_size: int, dtype: torch.dtype,
                                               seq_lens: list[int]) -> None:
    run_decode(seq_lens, page_size=page_size, num_kv_heads=2, group=3, head_dim=head_dim, dtype=dtype,
               num_kv_splits=3, seed=head_dim + page_size)


def test_decode_more_splits_than_blocks_leaves_empty_splits_harmless() -> None:
    # seq len 1 with 5 splits: splits 1..4 are empty and must weigh nothing in the merge.
    run_decode([1, 2, 129], page_size=16, num_kv_heads=1, group=8, head_dim=80, dtype=torch.float32,
               num_kv_splits=5, seed=3)


def test_decode_matches_torch_backend_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    seq_lens = [1, 16, 37, 64]
    case = build_paged_kv(gen, seq_lens, page_size=16, num_kv_heads=2, head_dim=80, dtype=torch.bfloat16)
    q = torch.randn(len(seq_lens), 6, 80, generator=gen).to(torch.bfloat16)  # (B, H_q, d)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    out = decode_attention(q, case.kv_cache, case.page_table, sl, scale=0.1, num_kv_splits=2)
    # torch_backend.decode_attention multiplies the masked tail of each page by zero, so it needs
    # a pool without NaN; unused slots then hold zeros.
    ref = torch_backend.decode_attention(q.float(), case.kv_cache.float().nan_to_num(0.0), case.page_table, sl,
                                         scale=0.1, max_seq_len=max(seq_lens))
    assert_written_and_close(out, ref, torch.bfloat16)


def test_choose_num_kv_splits() -> None:
    # GPU: enough programs to fill the device twice, never shorter than min_tokens_per_split.
    assert choose_num_kv_splits(num_seqs=64, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 1
    assert choose_num_kv_splits(num_seqs=1, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 16
    assert choose_num_kv_splits(num_seqs=4, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 9
    assert choose_num_kv_splits(num_seqs=1, num_kv_heads=8, max_seq_len=300, num_sms=132) == 2
    # CPU (interpreter): by length alone, at most 4.
    assert choose_num_kv_splits(num_seqs=1, num_kv_heads=1, max_seq_len=10, num_sms=None) == 1
    assert choose_num_kv_splits(num_seqs=1, num_kv_heads=1, max_seq_len=600, num_sms=None) == 3
    assert choose_num_kv_splits(num_seqs=1, num_kv_heads=1, max_seq_len=9000, num_sms=None) == 4
