"""How much a workload's TTFT percentiles move when every step costs 10% less or more: a
workload whose percentiles jump on a small change of speed cannot be reproduced, by a
simulator or by a second real run (docs/benchmarks.md, "Why dense and not burst").

    python scripts/sim_sensitivity.py --profile served.json [--scenario burst|dense] \\
        [--policies recompute,swap,...] [--factors 0.9,1.0,1.1]

Simulates bench_burst's scenario (2 devices, --device-memory 271MiB, --max-model-len 512,
prompts counted as the server counts them: 2 more tokens than asked) with the profile's step
weights scaled by each factor; prints TTFT P50 and P99 per factor and their spread over the
middle one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from kunlite.bench.burst import dense, long_then_burst
from kunlite.sim import cli
from kunlite.sim.simulate import POLICIES, run_policies
from kunlite.sim.traces import TraceRequest


def scaled_profile(profile: dict, factor: float, out_dir: Path) -> str:
    p = json.loads(json.dumps(profile))
    p["fit"]["weights"] = {k: v * factor for k, v in p["fit"]["weights"].items()}
    path = out_dir / f"profile_x{factor}.json"
    path.write_text(json.dumps(p))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--scenario", default="burst", choices=["burst", "dense"])
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--factors", default="0.9,1.0,1.1")
    ap.add_argument("--device-memory", default="271MiB")
    a = ap.parse_args()
    reqs = dense() if a.scenario == "dense" else long_then_burst(
        n_long=4, long_prompt=100, long_tokens=180, n_burst=24, burst_prompt=48, burst_tokens=48, burst_at=4.0,
        burst_rate=12.0, burstiness=0.5)
    trace = [TraceRequest(r.arrival, r.prompt_tokens + 2, r.output_tokens) for r in reqs]
    factors = [float(x) for x in a.factors.split(",")]
    profile = json.loads(Path(a.profile).read_text())
    rows: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for f in factors:
            argv = ["--devices", "2", "--profile", scaled_profile(profile, f, Path(tmp)), "--device-memory",
                    a.device_memory, "--max-model-len", "512", "--duration", "1"]
            opts, hw, _ = cli.setup(cli._resolve(cli.build_parser().parse_args(argv)))
            for r in run_policies(opts, hw, trace, a.policies.split(",")):
                rows.setdefault(r.policy, []).append((r.metrics["p50_ttft_ms"] / 1e3, r.metrics["p99_ttft_ms"] / 1e3))
    mid = factors.index(1.0) if 1.0 in factors else len(factors) // 2
    print(f"# {a.scenario}: TTFT with every step cost x {' / '.join(map(str, factors))}")
    print("| policy | TTFT P50 (s) | spread | TTFT P99 (s) | spread |")
    print("|---|---:|---:|---:|---:|")
    for name, v in rows.items():
        p50 = " / ".join(f"{x:.2f}" for x, _ in v)
        p99 = " / ".join(f"{y:.2f}" for _, y in v)
        print(f"| {name} | {p50} | {(v[-1][0] - v[0][0]) / v[mid][0]:+.0%} | {p99} | {(v[-1][1] - v[0][1]) / v[mid][1]:+.0%} |")


if __name__ == "__main__":
    main()
