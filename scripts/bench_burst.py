"""Bursts against a 2-worker CPU cluster of the default model, one overload policy after another,
on the same workload and KV budget; one table at the end.

    python scripts/bench_burst.py [--policies recompute,swap,migrate,pp2] [--scenarios burst,at-once,dense]
                                  [--device-memory 271MiB] [--trace BURSTGPT.csv] [--json out.json]

KunServe's setting (`burst`): long generations (chain-of-thought-like, hundreds of tokens) hold
most of the KV when a burst of short requests arrives (gamma arrivals, or the rows of a
BurstGPT-format CSV with --trace). 271 MiB per device leaves 624 KV tokens per worker next to
SmolLM2's bf16 parameters (1,248 in all), and the burst needs about twice that. `dense`: the
KV is full from the start (8 long generations of 60 tokens) and a burst of 32 comes at 0.5 s,
48 a second: under a KV-centric policy every burst request waits for KV the longs hold, so
its TTFT moves in proportion to the step time, not on the knife edge of whether the longs end
before it arrives, as in `burst` (the simulator is validated on it: scripts/validate_sim.py,
docs/benchmarks.md). `at-once`: every
request at t = 0 with a short prompt: all are admitted, and the cost shows in TPOT and
preemptions instead. Policies: recompute (vLLM), swap (InferCept), migrate (Llumnix) on two
replicas; pp2, a static 2-stage pipeline (vLLM-PP) over the same two devices; and kunserve
(parameter-centric: the replicas merge into a pipeline when throttled, the duplicate
parameters become KV, calm splits them again) with each exchange mode. `no-pressure` is a
reference, not a policy: the same replicas with enough KV for everything (1 GiB each), i.e. the
TTFT the compute alone allows. Before each scenario the script waits until the cluster is two
serving replicas again.

Each policy gets a fresh server (`python -m kunlite serve --devices 2 --threads 1 ...`).
TTFT is reported for the burst requests and for all; TPOT over every request that produced
two tokens or more. Goodput: requests per second meeting both SLOs (flags). The workloads are
also written as BurstGPT CSVs next to --json, for `kunlite simulate` to replay.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from kunlite.bench.burst import all_at_once, dense, long_then_burst, run, with_trace, write_trace
from kunlite.bench.datasets import TextTokens
from kunlite.bench.server import instance_states, settle, start_server, stop_server
from kunlite.engine.pull import resolve_model

SERVED = "SmolLM2-135M-Instruct"
POLICIES = {
    "recompute": ["--overload-policy", "recompute"],
    "swap": ["--overload-policy", "swap", "--swap-space", "2GiB"],
    "migrate": ["--overload-policy", "migrate"],
    "pp2": ["--pipeline-parallel", "2"],
    "kunserve-stall": ["--overload-policy", "kunserve", "--exchange", "stall"],
    "kunserve-remote": ["--overload-policy", "kunserve", "--exchange", "remote-attention"],
    "kunserve-recompute": ["--overload-policy", "kunserve", "--exchange", "recompute"],
    # Not a policy: two replicas with 1 GiB each, so the burst never runs out of KV. Its TTFT is
    # what the compute alone costs, a floor that no memory policy can go under.
    "no-pressure": ["--overload-policy", "recompute", "--device-memory", "1GiB"],
}


def start(model: str, args: argparse.Namespace, policy: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    log.with_suffix(".steps.jsonl").unlink(missing_ok=True)  # each committed step, for the simulator's checks
    return start_server(["--model", model, "--served-model-name", SERVED, "--devices", "2", "--dtype", "bfloat16",
                         "--threads", "1", "--device-memory", args.device_memory, "--max-model-len",
                         str(args.max_model_len), "--no-access-log", "--step-log", str(log.with_suffix(".steps.jsonl")),
                         *policy], log)


stop = stop_server


def workloads(args: argparse.Namespace) -> dict[str, list]:
    burst = long_then_burst(n_long=args.long, long_prompt=args.long_prompt, long_tokens=args.long_tokens,
                            n_burst=args.burst, burst_prompt=args.burst_prompt, burst_tokens=args.burst_tokens,
                            burst_at=args.burst_at, burst_rate=args.burst_rate, burstiness=args.burstiness)
    if args.trace:
        from kunlite.sim.traces import read_burstgpt

        burst = with_trace(burst, read_burstgpt(args.trace, limit=args.burst), args.burst_at)
    out = {"burst": burst,
           "dense": dense(long_prompt=args.long_prompt, burst_prompt=args.burst_prompt,
                          burst_tokens=args.burst_tokens, burstiness=args.burstiness),
           "at-once": all_at_once(n=args.at_once, prompt=args.at_once_prompt, tokens=args.at_once_tokens)}
    return {k: v for k, v in out.items() if k in args.scenarios.split(",")}


def row(policy: str, scenario: str, result: dict, slos: dict[str, float]) -> str:
    a = result["all"]
    ttft = result.get("burst", a)
    c = result["counters"]
    s = lambda v: "n/a" if v is None else f"{v / 1e3:.2f}"  # noqa: E731 - ms -> s
    return (f"| {policy} | {scenario} | {s(ttft['p50_ttft_ms'])} | {s(ttft['p99_ttft_ms'])} | {s(a['p99_ttft_ms'])} | "
            f"{s(a['p50_tpot_ms'])} | {s(a['p99_tpot_ms'])} | {a['request_goodput']:.2f} | {a['completed']} | "
            f"{a['failed'] + a['rejected']} | {c['preemptions']:.0f} | {c['swaps_out']:.0f} | {c['migrations']:.0f} | "
            f"{c['drops']:.0f} | {c['restores']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--scenarios", default="burst,at-once")
    p.add_argument("--device-memory", default="271MiB")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--long", type=int, default=4, help="long generations (burst scenario)")
    p.add_argument("--long-prompt", type=int, default=100)
    p.add_argument("--long-tokens", type=int, default=180)
    p.add_argument("--burst", type=int, default=24, help="burst requests")
    p.add_argument("--burst-prompt", type=int, default=48)
    p.add_argument("--burst-tokens", type=int, default=48)
    p.add_argument("--burst-at", type=float, default=4.0, help="seconds after the long generations start")
    p.add_argument("--burst-rate", type=float, default=12.0, help="burst arrivals per second")
    p.add_argument("--burstiness", type=float, default=0.5, help="gamma shape: below 1 is burstier than Poisson")
    p.add_argument("--trace", default=None, help="a BurstGPT-format CSV for the burst (instead of gamma)")
    p.add_argument("--at-once", type=int, default=24, help="requests of the at-once scenario")
    p.add_argument("--at-once-prompt", type=int, default=24)
    p.add_argument("--at-once-tokens", type=int, default=160)
    p.add_argument("--slo-ttft", type=float, default=5.0, help="seconds, for goodput")
    p.add_argument("--slo-tpot", type=float, default=0.5, help="seconds, for goodput")
    p.add_argument("--json", default=None, help="write every result (with per-request records) here")
    args = p.parse_args()
    model = str(resolve_model(args.model))
    tokens = TextTokens(model)
    slos = {"ttft": args.slo_ttft * 1e3, "tpot": args.slo_tpot * 1e3}
    loads = workloads(args)
    out_dir = Path(args.json).parent if args.json else Path(".")
    for name, reqs in loads.items():
        write_trace(out_dir / f"bench_burst_{name}.csv", reqs, SERVED)
    began = time.time()
    results: dict[str, dict] = {}
    rows = []
    for policy in args.policies.split(","):
        log = out_dir / f"bench_burst_{policy}.log"
        proc, url = start(model, args, POLICIES[policy], log)
        try:
            topology = len(instance_states(url))
            for scenario, reqs in loads.items():
                settle(url, topology)
                t = time.time()
                res = run(url, SERVED, reqs, tokens, slos=slos)
                results[f"{policy}/{scenario}"] = res
                rows.append(row(policy, scenario, res, slos))
                print(f"{policy} {scenario}: {time.time() - t:.0f} s", rows[-1], file=sys.stderr, flush=True)
        finally:
            stop(proc)
    print(f"# {platform.node()} {time.strftime('%Y-%m-%d %H:%M', time.localtime(began))}, "
          f"{(time.time() - began) / 60:.1f} min; 2 workers x 1 thread, --device-memory {args.device_memory}; "
          f"SLOs: TTFT <= {args.slo_ttft:g} s, TPOT <= {args.slo_tpot:g} s")
    print("| policy | scenario | burst TTFT P50 (s) | burst TTFT P99 (s) | all TTFT P99 (s) | TPOT P50 (s) | "
          "TPOT P99 (s) | goodput (req/s) | completed | failed | preemptions | swaps | migrations | drops | restores |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
