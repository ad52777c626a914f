"""Engine-only decode step time: the default model, B sequences decoding, no server, no HF.

    python scripts/bench_decode_step.py --dtype bfloat16 --batch 1,8,16 [--steps 100] [--threads 2]

For each batch size: B prompts of --prompt-len random tokens are prefilled, then --steps decode
steps are timed by the engine's own step timings. Prints a markdown table of the median, P10
and P90 step time and the decode tokens/s the median gives. Use it for A/B comparisons of the
decode path: alternate the two builds, since this VM's speed drifts between runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", default="1,8,16", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()

    from kunlite import LLM, SamplingParams
    from kunlite.engine.messages import EngineRequest

    batches = [int(b) for b in args.batch.split(",")]
    llm = LLM(args.model, dtype=args.dtype, threads=args.threads, device_memory="4GiB", max_num_seqs=max(batches))
    core = llm.engine
    vocab = llm.config.model.vocab_size
    rows = []
    for b in batches:
        g = torch.Generator().manual_seed(b)
        params = SamplingParams(temperature=0.0, max_tokens=args.steps + 10, ignore_eos=True)
        for i in range(b):
            prompt = torch.randint(100, vocab - 100, (args.prompt_len,), generator=g).tolist()
            core.add_request(EngineRequest(f"b{b}-{i}", prompt, params, time.time()))
        while any(s.in_prefill for s in core.scheduler.running + core.scheduler.waiting):
            core.step()
        core.take_timings()
        for _ in range(args.steps):
            core.step()
        steps = sorted(s.seconds for s in core.take_timings())
        while core.has_unfinished:
            core.step()
        core.take_timings()
        med = statistics.median(steps)
        rows.append((b, med, steps[len(steps) // 10], steps[len(steps) * 9 // 10], b / med))

    print(f"\ndtype {llm.config.device.dtype}, {args.threads} threads, prompts {args.prompt_len} tokens, "
          f"{args.steps} decode steps per batch size\n")
    print("| batch | step median (ms) | P10 (ms) | P90 (ms) | decode tok/s |")
    print("|---:|---:|---:|---:|---:|")
    for b, med, p10, p90, rate in rows:
        print(f"| {b} | {med * 1e3:.1f} | {p10 * 1e3:.1f} | {p90 * 1e3:.1f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
