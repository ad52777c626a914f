"""A/B of the CPU decode kernels across git revisions, inside one engine process.

    python scripts/ab_cpu_kernels.py --rev c6b29f7 --rev HEAD [--dtype float32] [--batch 16] [--rounds 8]
    python scripts/ab_cpu_kernels.py --rev HEAD --dir /tmp/variant   # a directory of edited sources

Separate benchmark runs on this VM drift by 10-30% between minutes, which hides a 5% change. Here
each variant's kernel sources (`src/kunlite/kernels/cpu_decode*.{c,h}` at that revision, or the
same files in a directory) are built into their own library, one engine is set up with --batch
sequences in decode, and the libraries are swapped in turn every --steps decode steps for
--rounds rounds, so every variant sees the same VM weather. Only the C differs between variants:
the Python around them is this checkout's, so the variants must keep its entry points. Prints
the median and P10 step time of each.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from kunlite.kernels import cpu_decode

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = ("kl_gemv_f32", "kl_gemv_bf16", "kl_paged_decode", "kl_rms_norm")


def sources_at(rev: str, dest: Path) -> Path:
    """The kernel sources of `rev` written into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "src/kunlite/kernels/"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        if Path(name).name.startswith("cpu_decode") and name.endswith((".c", ".h")):
            text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True, capture_output=True,
                                  text=True).stdout
            (dest / Path(name).name).write_text(text)
    return dest


def build_variant(src: Path, build_dir: Path) -> ctypes.CDLL:
    header = src / "cpu_decode.h"
    saved = cpu_decode.SOURCES
    cpu_decode.SOURCES = (header, *sorted(src.glob("cpu_decode*.c")))
    try:
        lib = ctypes.CDLL(str(cpu_decode.build(build_dir)))
    finally:
        cpu_decode.SOURCES = saved
    ref = cpu_decode._load()
    for name in ENTRY_POINTS:
        getattr(lib, name).argtypes = getattr(ref, name).argtypes
        getattr(lib, name).restype = getattr(ref, name).restype
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", action="append", default=[], help="a git revision (repeatable)")
    ap.add_argument("--dir", action="append", default=[], help="a directory of kernel sources (repeatable)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per turn")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if len(args.rev) + len(args.dir) < 2:
        ap.error("give at least two variants (--rev / --dir)")

    from kunlite import LLM, SamplingParams
    from kunlite.engine.messages import EngineRequest

    llm = LLM(None, dtype=args.dtype, threads=args.threads, device_memory="4GiB", max_num_seqs=args.batch)
    core = llm.engine
    assert cpu_decode.available(), "the CPU decode kernels do not build here"
    tmp = Path(tempfile.mkdtemp(prefix="kunlite-ab-"))
    variants: dict[str, ctypes.CDLL] = {}
    for rev in args.rev:
        variants[f"rev {rev}"] = build_variant(sources_at(rev, tmp / f"rev-{len(variants)}"), tmp / "build")
    for d in args.dir:
        variants[f"dir {d}"] = build_variant(Path(d), tmp / "build")

    vocab = llm.config.model.vocab_size
    g = torch.Generator().manual_seed(0)
    steps_total = args.steps * args.rounds * len(variants) + 10
    params = SamplingParams(temperature=0.0, max_tokens=steps_total, ignore_eos=True)
    for i in range(args.batch):
        prompt = torch.randint(100, vocab - 100, (args.prompt_len,), generator=g).tolist()
        core.add_request(EngineRequest(f"ab-{i}", prompt, params, time.time()))
    while any(s.in_prefill for s in core.scheduler.running + core.scheduler.waiting):
        core.step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, lib in variants.items():
            cpu_decode._lib = lib
            for _ in range(args.steps):
                t = time.perf_counter()
                core.step()
                times[name].append(time.perf_counter() - t)

    print(f"\n{args.dtype}, batch {args.batch}, prompts {args.prompt_len} tokens, {args.rounds} rounds of "
          f"{args.steps} steps per variant\n")
    print("| variant | step median (ms) | P10 (ms) |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        ts.sort()
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {ts[len(ts) // 10] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
