"""The simulator against the real cluster: `bench_burst.py`'s measured figures beside
`kunlite simulate`'s for the same policies, workloads and KV budget, with a CPU profile.

    python -m kunlite profile --served --devices 2 --threads 1 --dtype bfloat16 --device-memory 1GiB \\
        --max-model-len 512 --out served.json                        # the step costs, as served
    python scripts/bench_burst.py --json real/out.json                  # the real runs (+ their CSVs)
    python scripts/validate_sim.py --real real/out.json --profile served.json [--json cmp.json]

For every policy and scenario of the real JSON, it simulates the same requests (arrival times,
prompt tokens as the server counted them, output tokens: from the real run's records) on 2
devices with the real run's --device-memory (the no-pressure reference with its 1 GiB) and
--max-model-len, and prints TTFT P50 and P99 and TPOT P50 over all requests, real /
simulated, with the relative error, and how many are within --tolerance.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from kunlite.sim.validate import METRICS, compare, simulate_records

MEMORY = {"no-pressure": "1GiB"}  # bench_burst's reference runs with its own budget


def compare_all(real: dict[str, Any], profile: str, model: str | None, policies: list[str] | None) -> list[dict[str, Any]]:
    a = real["args"]
    rows = []
    for key, res in real["results"].items():
        policy, scenario = key.split("/")
        if policies and policy not in policies:
            continue
        sim = simulate_records("recompute" if policy == "no-pressure" else policy, res["records"], profile,
                               MEMORY.get(policy, a["device_memory"]), a["max_model_len"], model)
        rows.append({"policy": policy, "scenario": scenario, **compare(res["all"], sim),
                     "real_counters": res["counters"], "sim_counters": sim["counters"]})
    return rows


def table(rows: list[dict[str, Any]], tolerance: float) -> str:
    head = "| policy | scenario | " + " | ".join(f"{n} real / sim (s) | err" for _, n in METRICS) + " |"
    out = [head, "|---|---|" + "---:|---:|" * len(METRICS)]
    within = total = 0
    for row in rows:
        cells = []
        for m, _ in METRICS:
            r, s, e = row[m]
            total += 1
            within += e is not None and abs(e) <= tolerance
            cells.append(f"{r:.3f} / {s:.3f} | {'n/a' if e is None else f'{e:+.0%}'}")
        out.append(f"| {row['policy']} | {row['scenario']} | " + " | ".join(cells) + " |")
    out.append(f"\n{within} of {total} figures within {tolerance:.0%}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="bench_burst.py's --json")
    p.add_argument("--profile", required=True, help="a kunlite profile JSON (kunlite profile [--served])")
    p.add_argument("--model", default=None, help="the model directory (default: the default model)")
    p.add_argument("--policies", default=None, help="a comma-separated subset")
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    real = json.loads(Path(a.real).read_text())
    rows = compare_all(real, a.profile, a.model, a.policies.split(",") if a.policies else None)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {platform.node()} {time.strftime('%Y-%m-%d %H:%M')} ({rev}): {a.real} against the simulator with "
          f"{a.profile}")
    print(table(rows, a.tolerance))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
