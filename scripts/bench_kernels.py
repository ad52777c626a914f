"""Time kunlite's Triton attention kernels on a GPU; on CPU, check them against the torch reference.

    python scripts/bench_kernels.py                      # CUDA: self-check, then the timing table
    TRITON_INTERPRET=1 python scripts/bench_kernels.py   # CPU: the self-check only

On CUDA every time is the median of many runs (triton.testing.do_bench, CUDA events). Shapes:
decode at batch 64 with 4k context and prefill of 8 sequences of 2k tokens, 32 query / 8 KV
heads, head dim 128, bf16, page size 16, pages scattered over a pool twice the size needed.
The table shows achieved bandwidth (decode, write_kv) and TFLOP/s (prefill) beside the device's
measured device-to-device copy bandwidth and torch SDPA on the same dense shapes.
Targets: decode >= 75% of copy bandwidth; prefill >= 70% of torch SDPA (flash) throughput.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    # Without a GPU the kernels can only run under the interpreter, which must be chosen before
    # the kernel modules are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from kunlite.kernels import torch_backend as ref  # noqa: E402
from kunlite.kernels.triton_decode import choose_num_kv_splits, decode_attention  # noqa: E402
from kunlite.kernels.triton_extend import extend_attention  # noqa: E402
from kunlite.kernels.triton_ops import write_kv  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # atol == rtol


@dataclass
class PagedBatch:
    kv_cache: torch.Tensor  # (P, 2, page_size, H_kv, d), pages scattered over twice what is needed
    page_table: torch.Tensor  # (B, max_pages) int32
    slot_mapping: torch.Tensor  # (B * S,) int64: slot of every token of every sequence
    k: torch.Tensor  # (B, S, H_kv, d) dense copy of the keys
    v: torch.Tensor  # (B, S, H_kv, d)


def paged_batch(*, batch: int, seq_len: int, num_kv_heads: int, head_dim: int, page_size: int,
                dtype: torch.dtype, device: torch.device, seed: int = 0) -> PagedBatch:
    torch.manual_seed(seed)  # seeds the CPU and the CUDA generators
    pages_per_seq = -(-seq_len // page_size)
    num_pages = 2 * batch * pages_per_seq
    page_ids = torch.randperm(num_pages)[: batch * pages_per_seq]
    page_table = page_ids.view(batch, pages_per_seq).to(torch.int32).to(device)  # (B, max_pages)
    pos = torch.arange(seq_len, device=device)  # (S,)
    slots = page_table[:, pos // page_size].long() * page_size + pos % page_size  # (B, S)
    k = torch.randn(batch, seq_len, num_kv_heads, head_dim, device=device).to(dtype)  # (B, S, H_kv, d)
    v = torch.randn(batch, seq_len, num_kv_heads, head_dim, device=device).to(dtype)  # (B, S, H_kv, d)
    kv_cache = torch.full((num_pages, 2, page_size, num_kv_heads, head_dim), float("nan"), dtype=dtype,
                          device=device)  # (P, 2, ps, H_kv, d), NaN wherever no token lives
    flat = slots.reshape(-1)  # (B * S,)
    write_kv(kv_cache, k.reshape(-1, num_kv_heads, head_dim), v.reshape(-1, num_kv_heads, head_dim), flat)
    return PagedBatch(kv_cache, page_table, flat, k, v)


def check(name: str, out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    err = (out.double() - expected.double()).abs().max().item()
    torch.testing.assert_close(out.double(), expected.double(), atol=tol, rtol=tol)
    print(f"  ok  {name:<44} max |err| {err:.2e}  (atol = rtol = {tol:g})")


def self_check(device: torch.device) -> None:
    """Each kernel against the torch reference on small awkward shapes (head dim 80, GQA 3, ragged)."""
    print(f"self-check on {device} ({'interpreter' if device.type == 'cpu' else 'compiled'}):")
    hq, hkv, d, ps, scale = 6, 2, 80, 16, 80**-0.5
    for dtype in (torch.float32, torch.bfloat16):
        seq_lens = [1, 16, 37]
        B = len(seq_lens)
        pb = paged_batch(batch=B, seq_len=max(seq_lens), num_kv_heads=hkv, head_dim=d, page_size=ps,
                         dtype=dtype, device=device)
        # write_kv: the pool must hold every token where the torch reference puts it.
        expected = torch.full_like(pb.kv_cache, float("nan"))
        ref.write_kv(expected, pb.k.reshape(-1, hkv, d), pb.v.reshape(-1, hkv, d), pb.slot_mapping)
        torch.testing.assert_close(pb.kv_cache, expected, atol=0, rtol=0, equal_nan=True)
        print(f"  ok  {'write_kv ' + str(dtype):<44} exact")
        # The torch decode reference multiplies masked slots by zero: give it a pool without NaN.
        clean = pb.kv_cache.float().nan_to_num(0.0)
        sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        q = torch.randn(B, hq, d, device=device).to(dtype)  # (B, H_q, d)
        for splits in (1, 3):
            out = decode_attention(q, pb.kv_cache, pb.page_table, sl, scale=scale, num_kv_splits=splits)
            expected = ref.decode_attention(q.float(), clean, pb.page_table, sl, scale=scale,
                                            max_seq_len=max(seq_lens))
            check(f"decode {dtype} splits={splits}", out, expected, dtype)
        q_lens = [1, 5, 37]  # sequence 1 extends a cached prefix of 11 tokens, the others are fresh
        qsl = torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32)  # (B+1,)
        q = torch.randn(sum(q_lens), hq, d, device=device).to(dtype)  # (T, H_q, d)
        out = extend_attention(q, pb.kv_cache, pb.page_table, qsl, sl, scale=scale, max_query_len=max(q_lens))
        expected = ref.extend_attention(q.float(), clean, pb.page_table, q_lens, seq_lens, scale=scale)
        check(f"extend {dtype}", out, expected, dtype)


def bench(fn) -> float:
    """Median milliseconds over many runs, timed with CUDA events."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def dense_sdpa(
    q: torch.Tensor,  # (B, H_q, S_q, d)
    k: torch.Tensor,  # (B, H_kv, S, d)
    v: torch.Tensor,  # (B, H_kv, S, d)
    *,
    causal: bool,
) -> Callable[[], torch.Tensor]:  # () -> (B, H_q, S_q, d)
    """A closure running torch SDPA on dense (B, H, S, d) tensors, native GQA where torch has it.

    Without `enable_gqa` the KV heads are expanded here, once, outside what is timed.
    """
    try:
        F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except (TypeError, RuntimeError):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H_q, S, d)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def run_benchmarks(args: argparse.Namespace, device: torch.device) -> None:
    dtype, hq, hkv, d, ps = torch.bfloat16, args.heads, args.kv_heads, args.head_dim, args.page_size
    elt = torch.finfo(dtype).bits // 8
    scale = d**-0.5
    rows: list[tuple[str, str, float, str, str]] = []

    # Device copy bandwidth: a 1 GiB device-to-device copy reads and writes every byte.
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() / ms / 1e6
    rows.append(("copy (D2D)", "1 GiB", ms, f"{copy_gbs:.0f} GB/s", ""))
    del src, dst

    # Decode: one query per sequence over B x ctx tokens of paged KV.
    B, S = args.decode_batch, args.context
    pb = paged_batch(batch=B, seq_len=S, num_kv_heads=hkv, head_dim=d, page_size=ps, dtype=dtype, device=device)
    sl = torch.full((B,), S, dtype=torch.int32, device=device)
    q = torch.randn(B, hq, d, device=device, dtype=dtype)  # (B, H_q, d)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = choose_num_kv_splits(num_seqs=B, num_kv_heads=hkv, max_seq_len=S, num_sms=sms)
    out = torch.empty_like(q)
    ms = bench(lambda: decode_attention(q, pb.kv_cache, pb.page_table, sl, scale=scale, num_kv_splits=splits,
                                        out=out))
    kv_bytes = 2 * B * S * hkv * d * elt + 2 * B * hq * d * elt  # K and V read once; q read, o written
    gbs = kv_bytes / ms / 1e6
    qd = q.unsqueeze(2)  # (B, H_q, 1, d)
    kd, vd = pb.k.transpose(1, 2), pb.v.transpose(1, 2)  # (B, H_kv, S, d)
    run_sdpa = dense_sdpa(qd, kd, vd, causal=False)
    torch.testing.assert_close(out.float(), run_sdpa()[:, :, 0].float(), atol=2e-2, rtol=2e-2)
    ms_sdpa = bench(run_sdpa)
    rows.append((f"decode (splits={splits})", f"B={B} ctx={S}", ms, f"{gbs:.0f} GB/s",
                 f"{100 * gbs / copy_gbs:.0f}% of copy (target 75%)"))
    sdpa_gbs = kv_bytes / ms_sdpa / 1e6
    rows.append(("torch SDPA decode (dense)", f"B={B} ctx={S}", ms_sdpa, f"{sdpa_gbs:.0f} GB/s", ""))
    del pb, kd, vd, run_sdpa

    # Prefill: N fresh sequences of L tokens, causal, KV read through scattered pages.
    N, L = args.prefill_seqs, args.prefill_len
    pb = paged_batch(batch=N, seq_len=L, num_kv_heads=hkv, head_dim=d, page_size=ps, dtype=dtype, device=device)
    k_flat, v_flat = pb.k.reshape(-1, hkv, d), pb.v.reshape(-1, hkv, d)  # (N*L, H_kv, d)
    ms = bench(lambda: write_kv(pb.kv_cache, k_flat, v_flat, pb.slot_mapping))
    rows.append(("write_kv", f"T={N * L}", ms, f"{4 * k_flat.numel() * elt / ms / 1e6:.0f} GB/s", "read + write"))
    q = torch.randn(N * L, hq, d, device=device, dtype=dtype)  # (T, H_q, d)
    qsl = torch.arange(0, N * L + 1, L, dtype=torch.int32, device=device)  # (N+1,)
    sl = torch.full((N,), L, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    ms = bench(lambda: extend_attention(q, pb.kv_cache, pb.page_table, qsl, sl, scale=scale, max_query_len=L,
                                        out=out))
    flops = 4 * N * hq * L * L * d / 2  # QK^T and PV, causal half
    qd = q.view(N, L, hq, d).transpose(1, 2)  # (N, H_q, L, d)
    kd, vd = pb.k.transpose(1, 2), pb.v.transpose(1, 2)  # (N, H_kv, L, d)
    run_sdpa = dense_sdpa(qd, kd, vd, causal=True)
    dense = run_sdpa().transpose(1, 2).reshape(N * L, hq, d)  # (T, H_q, d)
    torch.testing.assert_close(out.float(), dense.float(), atol=2e-2, rtol=2e-2)
    ms_sdpa = bench(run_sdpa)
    tflops, tflops_sdpa = flops / ms / 1e9, flops / ms_sdpa / 1e9
    rows.append(("prefill", f"{N}x{L}", ms, f"{tflops:.1f} TFLOP/s",
                 f"{100 * tflops / tflops_sdpa:.0f}% of SDPA (target 70%)"))
    rows.append(("torch SDPA prefill (causal)", f"{N}x{L}", ms_sdpa, f"{tflops_sdpa:.1f} TFLOP/s", ""))

    print(f"\n{torch.cuda.get_device_name(device)}; bf16, H_q={hq}, H_kv={hkv}, d={d}, page size {ps}\n")
    print("| kernel | shape | median ms | achieved | vs target |")
    print("|---|---|---|---|---|")
    for name, shape, ms, achieved, note in rows:
        print(f"| {name} | {shape} | {ms:.3f} | {achieved} | {note} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--prefill-seqs", type=int, default=8)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        self_check(torch.device("cpu"))
        print("no CUDA device: the kernels are correct under the interpreter; timing needs a GPU")
        return 0
    device = torch.device("cuda")
    self_check(device)
    run_benchmarks(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
