"""Offline throughput: kunlite against HF transformers `generate`, same prompts, same dtype.

    python scripts/bench_offline.py [--dtype bfloat16] [--concurrency 1,8,32] [--skip-hf]

Prints a markdown table of output tokens/s at each concurrency (prompts of ~200 random tokens,
128 new tokens, EOS ignored, wall time including prefill), kunlite's single-stream decode rate
(median decode-step time), and the decode floor: weight bytes over a copy bandwidth measured
here (bytes read + bytes written per second by a 256 MiB tensor copy). Run it on a quiet
machine: on 2 cores, any other busy process stalls every multi-threaded op.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time

import torch


def copy_bandwidth(threads: int) -> float:
    """Bytes read + written per second by a large device copy (the median of 10)."""
    torch.set_num_threads(threads)
    x = torch.empty(64 << 20, dtype=torch.float32).uniform_()  # 256 MiB
    y = torch.empty_like(x)
    y.copy_(x)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t)
    return 2 * x.numel() * 4 / statistics.median(times)


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(n)]


def bench_kunlite(model: str | None, dtype: str, threads: int, prompts: list[list[int]], new_tokens: int,
                  concurrency: list[int]) -> tuple[dict[int, float], float, int]:
    from kunlite import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, threads=threads, device_memory="4GiB", max_num_seqs=max(concurrency))
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm up
    llm.engine.take_timings()
    rates: dict[int, float] = {}
    decode_rate = 0.0
    for b in concurrency:
        batch = make_prompts(b, len(prompts[0]), llm.config.model.vocab_size, seed=b)
        t = time.perf_counter()
        llm.generate(batch, params)
        rates[b] = b * new_tokens / (time.perf_counter() - t)
        steps = [s.seconds for s in llm.engine.take_timings() if s.num_prefill_tokens == 0]
        if b == 1:
            decode_rate = 1.0 / statistics.median(steps)
    pool = llm.engine.runner.pool
    weight_bytes = pool.param_pages * pool.page_bytes
    del llm
    gc.collect()
    return rates, decode_rate, weight_bytes


def bench_hf(model_dir: str, dtype: torch.dtype, threads: int, new_tokens: int, concurrency: list[int],
             prompt_len: int) -> dict[int, float]:
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    rates: dict[int, float] = {}
    with torch.inference_mode():
        for b in concurrency:
            ids = torch.tensor(make_prompts(b, prompt_len, model.config.vocab_size, seed=b))
            mask = torch.ones_like(ids)
            model.generate(ids[:1, :16], attention_mask=mask[:1, :16], max_new_tokens=2, do_sample=False)
            t = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)
            rates[b] = b * new_tokens / (time.perf_counter() - t)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory (default: the pulled SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    conc = [int(c) for c in args.concurrency.split(",")]

    from kunlite.engine.pull import resolve_model

    model_dir = str(resolve_model(args.model))
    bandwidth = copy_bandwidth(args.threads)
    prompts = make_prompts(1, args.prompt_len, 49152)
    ours, decode_rate, weight_bytes = bench_kunlite(model_dir, args.dtype, args.threads, prompts,
                                                    args.new_tokens, conc)
    hf = {} if args.skip_hf else bench_hf(model_dir, getattr(torch, args.dtype), args.threads,
                                          args.new_tokens, conc, args.prompt_len)
    floor = bandwidth / weight_bytes

    print(f"\nmachine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"dtype {args.dtype}; prompts {args.prompt_len} tokens, {args.new_tokens} new tokens, EOS ignored\n")
    print("| concurrent requests | kunlite output tok/s | HF transformers output tok/s | kunlite / HF |")
    print("|---:|---:|---:|---:|")
    for b in conc:
        h = hf.get(b)
        print(f"| {b} | {ours[b]:.1f} | {h:.1f} | {ours[b] / h:.2f}x |" if h else f"| {b} | {ours[b]:.1f} | - | - |")
    print(f"\ncopy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s; weight bytes: {weight_bytes / 1e6:.0f} MB "
          f"(pool pages holding parameters)")
    print(f"decode floor: {floor:.1f} tok/s; kunlite single-stream decode: {decode_rate:.1f} tok/s "
          f"= {decode_rate / floor:.0%} of the floor")


if __name__ == "__main__":
    main()
