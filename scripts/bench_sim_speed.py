"""How fast the simulator runs: wall seconds per policy for a trace of a given length.

    python scripts/bench_sim_speed.py --devices 8 --duration 3600      # 8 x A800, Qwen2.5-14B
    python scripts/bench_sim_speed.py --devices 64 --device h800 --model qwen2.5-72b --rate 24 --duration 600

Any `kunlite simulate` option after `--` is passed on (the trace: --rate, --burst-factor, ...).
Prints one row per policy: simulated seconds, wall seconds, their ratio, steps run inside
fast-forwards, and the requests completed; with --step-by-step, each policy also without
fast-forward, and whether the two runs agree (every request's TTFT, ITLs and E2E).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace

from kunlite.engine.args import EngineOptions
from kunlite.sim import cli
from kunlite.sim.simulate import POLICIES, simulate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--device", default="a800")
    p.add_argument("--model", default="qwen2.5-14b")
    p.add_argument("--duration", type=float, default=3600.0)
    p.add_argument("--rate", type=float, default=6.0)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--step-by-step", action="store_true", help="also run without fast-forward and compare")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    a = p.parse_args()
    rest = [x for x in a.rest if x != "--"]
    argv = ["--model", a.model, "--device", a.device, "--devices", str(a.devices), "--synthetic",
            "--duration", str(a.duration), "--rate", str(a.rate)] + \
        (["--max-num-seqs", "256"] if "--max-num-seqs" not in rest else []) + \
        (["--max-num-batched-tokens", "4096"] if "--max-num-batched-tokens" not in rest else []) + rest
    args = cli._resolve(cli.build_parser().parse_args(argv))
    opts = EngineOptions(model=cli.model_dir(args.model), devices=args.devices // args.tensor_parallel,
                         dtype=args.dtype, page_size=args.page_size, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                         enable_prefix_caching=False)
    hw = cli.hardware(args, opts.build().model)
    trace = cli.trace_of(args)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {platform.node()} {time.strftime('%Y-%m-%d %H:%M')} ({rev}): {a.devices} x {a.device}, {a.model}, "
          f"{len(trace)} requests over {a.duration:g} s of trace ({' '.join(argv)})")
    print(f"# {interpreter()}")
    print("| policy | simulated (s) | wall (s) | x real time | steps fast-forwarded | completed | step by step (s) | same run |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in a.policies.split(","):
        o = replace(opts, **POLICIES[name])
        r = simulate(o, hw, trace, policy=name)
        end = max((x.end or 0.0) for x in r.records)
        slow, same = "", ""
        if a.step_by_step:
            s = simulate(o, hw, trace, policy=name, fast_forward=False)
            key = lambda res: [(x.status, x.ttft, x.itl, x.e2e) for x in res.records]  # noqa: E731
            slow, same = f"{s.wall_seconds:.1f}", "yes" if key(s) == key(r) and s.counters == r.counters else "NO"
        print(f"| {name} | {end:.0f} | {r.wall_seconds:.1f} | {end / r.wall_seconds:.0f} | "
              f"{r.fast_forward['steps']} | {r.metrics['completed']}/{len(trace)} | {slow} | {same} |", flush=True)


def interpreter() -> str:
    """Which CPython runs this: its build matters (Debian's python3.11 here, built with
    profile-guided and link-time optimisation, runs the simulator ~12% faster than pyenv's
    3.11.7, built without them)."""
    return f"python {platform.python_version()}, {os.path.realpath(sys.executable)}"


if __name__ == "__main__":
    main()
