"""TritonBackend against TorchBackend through the AttentionBackend interface: a mixed batch of
decodes, prefill chunks and extends over several layers, q/k/v as views of a fused qkv."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paged_kv_case import TOLERANCES, cdiv, scattered_pages

from kunlite.kernels.backend import AttentionMetadata, get_backend
from kunlite.kernels.torch_backend import TorchBackend
from kunlite.kernels.triton_backend import TritonBackend

NUM_LAYERS = 2


def make_step(
    gen: torch.Generator, cached: list[int], new: list[int], num_decodes: int, *, page_size: int,
) -> tuple[AttentionMetadata, int]:
    """(metadata, pool pages) for sequences with `cached` tokens in the pool and `new` this step."""
    seq_lens = [c + n for c, n in zip(cached, new)]
    pages_per_seq = [cdiv(s, page_size) for s in seq_lens]
    max_pages = max(pages_per_seq)
    pages, num_pages = scattered_pages(gen, NUM_LAYERS * sum(pages_per_seq))
    B, T = len(seq_lens), sum(new)
    # Strided like the runner's (numpy transposes and fancy indexing): columns are not contiguous.
    page_tables = torch.zeros(B, max_pages, NUM_LAYERS, dtype=torch.int32).permute(2, 0, 1)  # (L, B, max_pages)
    slot_mapping = torch.empty(T, NUM_LAYERS, dtype=torch.int64).t()  # (L, T)
    it = iter(pages)
    for layer in range(NUM_LAYERS):
        row = 0
        for b, (c, s) in enumerate(zip(cached, seq_lens)):
            page_tables[layer, b, : pages_per_seq[b]] = torch.tensor([next(it) for _ in range(pages_per_seq[b])])
            pos = torch.arange(c, s)  # positions of the new tokens
            pages = page_tables[layer, b, pos // page_size].long()  # (s - c,)
            slot_mapping[layer, row : row + s - c] = pages * page_size + pos % page_size
            row += s - c
    meta = AttentionMetadata(
        num_decodes=num_decodes,
        query_start_loc=torch.tensor([0, *new]).cumsum(0).to(torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        page_tables=page_tables,
        slot_mapping=slot_mapping,
        max_query_len=max(new),
        max_seq_len=max(seq_lens),
        query_lens_cpu=list(new),
        seq_lens_cpu=seq_lens,
    )
    return meta, num_pages


@st.composite
def batches(draw: st.DrawFn) -> dict:
    page_size = draw(st.sampled_from([16, 64]))
    num_decodes = draw(st.integers(0, 3))
    num_extends = draw(st.integers(0 if num_decodes else 1, 3))
    cached = draw(st.lists(st.integers(1, 2 * page_size + 3), min_size=num_decodes, max_size=num_decodes))
    prefixes = st.sampled_from([0, 0, page_size, 5, page_size + 9])  # 0: a fresh prefill (chunk)
    cached += draw(st.lists(prefixes, min_size=num_extends, max_size=num_extends))
    chunks = st.lists(st.integers(1, page_size + 5), min_size=num_extends, max_size=num_extends)
    new = [1] * num_decodes + draw(chunks)
    return {
        "cached": cached, "new": new, "num_decodes": num_decodes, "page_size": page_size,
        "num_kv_heads": draw(st.sampled_from([1, 2])),
        "group": draw(st.sampled_from([1, 3, 8])),
        "head_dim": draw(st.sampled_from([64, 80])),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "call_prepare": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_triton_backend_matches_torch_backend(batch: dict) -> None:
    gen = torch.Generator().manual_seed(batch["seed"])
    page_size, hkv, d, dtype = batch["page_size"], batch["num_kv_heads"], batch["head_dim"], batch["dtype"]
    hq = hkv * batch["group"]
    meta, num_pages = make_step(gen, batch["cached"], batch["new"], batch["num_decodes"], page_size=page_size)
    kw = {"num_heads": hq, "num_kv_heads": hkv, "head_dim": d, "page_size": page_size, "scale": d**-0.5}
    triton_backend, torch_backend = TritonBackend(**kw), TorchBackend(**kw)
    # Finite garbage in every slot: the cached prefixes and whatever the pages held before. (NaN
    # poisoning is the kernel tests' job; the torch backend multiplies masked slots by zero.)
    pool = torch.randn(num_pages, 2, page_size, hkv, d, generator=gen).to(dtype)  # (P, 2, ps, H_kv, d)
    pool_torch = pool.clone()
    if batch["call_prepare"]:
        triton_backend.prepare(meta)
        torch_backend.prepare(meta)
    T, q_size, kv_size = meta.num_tokens, hq * d, hkv * d
    for layer in range(NUM_LAYERS):
        qkv = torch.randn(T, q_size + 2 * kv_size, generator=gen).to(dtype)  # (T, (H_q + 2 H_kv) d)
        q = qkv[:, :q_size].view(T, hq, d)  # (T, H_q, d), strided rows
        k = qkv[:, q_size : q_size + kv_size].view(T, hkv, d)  # (T, H_kv, d)
        v = qkv[:, q_size + kv_size :].view(T, hkv, d)  # (T, H_kv, d)
        out = triton_backend.forward(q, k, v, pool, layer, meta)  # (T, H_q, d)
        ref = torch_backend.forward(q.float(), k.float(), v.float(), pool_torch.float(), layer, meta)
        torch_backend.forward(q, k, v, pool_torch, layer, meta)  # the write, in the pool's dtype
        torch.testing.assert_close(out.double(), ref.double(), **TOLERANCES[dtype])
    assert torch.equal(pool, pool_torch), "the two backends wrote the pool differently"


def test_registry_finds_the_triton_backend() -> None:
    assert get_backend("triton") is TritonBackend
