"""python -m kunlite simulate: what each overload policy would do to a trace on a cluster.

    kunlite simulate --preset kunserve-a800                 # 8 x A800, Qwen2.5-14B, a bursty trace
    kunlite simulate --model smollm2 --devices 2 --profile cpu.json --device-memory 271MiB \\
                     --trace bench_burst_burst.csv --policies recompute,kunserve-remote
    kunlite simulate --model qwen2.5-72b --device h800 --devices 64 --synthetic --duration 600 --rate 20

Devices are either an analytic GPU profile (--device a800|h800|h100|h200: peak FLOP/s, HBM,
NVLink, PCIe, InfiniBand with efficiency factors) or a measured CPU profile (--profile, from
`kunlite profile`, with its fitted step cost and P2P table). Models are an HF config.json
(a built-in name: qwen2.5-14b, qwen2.5-72b, llama-3-8b, llama-3-70b; a path; or a model
kunlite can load). The trace is a BurstGPT-format CSV (--trace, with --time-scale and
--upscale) or generated (--synthetic: bursty arrivals, long-tailed lengths). Prints one table,
policies side by side; --json writes {"policies": {NAME: {...}}}; --plot writes a TTFT CDF per
policy and each policy's memory timeline per device (parameters, KV used, KV free) with drops
and restores marked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from kunlite.config import ConfigError, parse_size

PRESETS: dict[str, dict[str, Any]] = {
    # KunServe's evaluation (arXiv 2412.18169): 8 x A800-80GB serving Qwen2.5-14B, one replica per
    # GPU, when a burst lands on KV already filled by long-lived requests. The trace (seed 11):
    # ~130 s of calm at ~5.5 req/s, 70% of them chain-of-thought-like (outputs median 4000
    # tokens, capped at 8192), which fills the KV pool; then a ~20 s burst of 8x the calm
    # rate; then calm again (~195 s of arrivals in all). max_num_seqs is high enough that KV,
    # not the sequence cap, is what runs out. docs/simulations.md has the tables.
    "kunserve-a800": dict(model="qwen2.5-14b", device="a800", devices=8, duration=180.0, rate=7.8,
                          burst_factor=8.0, burst_seconds=15.0, calm_seconds=240.0, seed=11,
                          long_fraction=0.7, long_output_median=4000.0, long_output_max=8192,
                          max_num_seqs=1024, max_num_batched_tokens=4096, max_model_len=16384),
    # ... and 64 H800 (8 nodes of 8) serving Qwen2.5-72B: 145 GB of weights need more than one
    # GPU, so an instance is 4 GPUs (tensor-parallel 4, simulated as one device of 4 GPUs'
    # compute, memory and links): 16 replicas. They hold ~4x the A800 preset's KV (7.8 M tokens
    # against 1.9 M) and compute faster, so the same trace shape comes at 50 req/s (9,000
    # requests) to fill them before the burst as the A800 one does.
    "kunserve-h800-64": dict(model="qwen2.5-72b", device="h800", devices=64, tensor_parallel=4, duration=180.0,
                             rate=50.0, burst_factor=8.0, burst_seconds=15.0, calm_seconds=240.0, seed=11,
                             long_fraction=0.7, long_output_median=4000.0, long_output_max=8192,
                             max_num_seqs=1024, max_num_batched_tokens=4096, max_model_len=16384),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kunlite simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--devices", type=int, default=None)
    p.add_argument("--device", default=None, help="a800, h800, h100, h200 (analytic), or cpu with --profile")
    p.add_argument("--profile", default=None, help="a JSON profile from `kunlite profile` (the CPU here)")
    p.add_argument("--device-memory", default=None, help="pool bytes per device (default: the GPU's 90%% less 1 GiB)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--trace", default=None, help="a BurstGPT-format CSV")
    p.add_argument("--time-scale", type=float, default=1.0, help="replay the trace this many times faster")
    p.add_argument("--upscale", type=float, default=1.0, help="this many times the trace's request rate")
    p.add_argument("--synthetic", action="store_true", help="a generated BurstGPT-like trace")
    p.add_argument("--duration", type=float, default=None, help="seconds of synthetic trace")
    p.add_argument("--rate", type=float, default=None, help="mean requests per second of the synthetic trace")
    p.add_argument("--burst-factor", type=float, default=None, help="a burst's rate over the base rate")
    p.add_argument("--burst-seconds", type=float, default=None, help="mean length of a burst (default 20)")
    p.add_argument("--calm-seconds", type=float, default=None, help="mean time between bursts (default 120)")
    p.add_argument("--long-fraction", type=float, default=None,
                   help="share of requests with chain-of-thought-like long outputs (default 0)")
    p.add_argument("--long-output-median", type=float, default=None, help="their median output tokens (default 3000)")
    p.add_argument("--long-output-max", type=int, default=None, help="their output cap (default 8192)")
    p.add_argument("--tensor-parallel", type=int, default=None,
                   help="analytic GPUs per instance: this many GPUs act as one device, their FLOP/s, HBM, memory "
                        "and links added up (the all-reduces are not costed); --devices counts GPUs")
    p.add_argument("--seed", type=int, default=None, help="of the synthetic trace (default 0)")
    p.add_argument("--policies", default="recompute,swap,migrate,pp2,kunserve-stall,kunserve-remote,kunserve-recompute")
    p.add_argument("--slo-ttft", type=float, default=5.0, help="seconds, for goodput")
    p.add_argument("--slo-tpot", type=float, default=0.5, help="seconds, for goodput")
    p.add_argument("--jobs", type=int, default=1,
                   help="policies simulated at once, each in its own process (the results are the same)")
    p.add_argument("--no-fast-forward", dest="fast_forward", action="store_false",
                   help="step every decode one at a time (the same run, slower: for checking)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="a directory for ttft_cdf.png and memory_<policy>.png")
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.preset:
        for k, v in PRESETS[args.preset].items():
            if getattr(args, k, None) is None or getattr(args, k) is False:  # not given (0 is given)
                setattr(args, k, v)
        if not args.trace:
            args.synthetic = True
    args.devices = args.devices or 2
    args.tensor_parallel = args.tensor_parallel or 1
    if args.tensor_parallel < 1 or args.devices % args.tensor_parallel:
        raise SystemExit(f"error: --devices {args.devices} is not a multiple of --tensor-parallel {args.tensor_parallel}")
    if args.tensor_parallel > 1 and args.profile:
        raise SystemExit("error: --tensor-parallel is for the analytic GPUs (--device), not a measured --profile")
    args.duration = args.duration or 600.0
    args.rate = args.rate or 4.0
    args.burst_factor = args.burst_factor or 8.0
    args.seed = args.seed or 0
    return args


def model_dir(name: str | None) -> str:
    """A directory with the model's config.json: a built-in config (written once to a directory
    of the temporary folder named by its content, so runs share it and leave nothing more; no
    weights are needed), or a model kunlite can load."""
    from kunlite.engine.pull import resolve_model
    from kunlite.sim.model_configs import builtin_config_dict, builtin_name

    if name and builtin_name(name):
        text = json.dumps(builtin_config_dict(name), sort_keys=True)
        d = Path(tempfile.gettempdir()) / f"kunlite-sim-{builtin_name(name)}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
        d.mkdir(exist_ok=True)
        if not (d / "config.json").exists():
            tmp = d / f"config.json.{os.getpid()}"
            tmp.write_text(text)
            os.replace(tmp, d / "config.json")  # whole, even when two runs race
        return str(d)
    return str(resolve_model(name))


def hardware(args: argparse.Namespace, model: Any) -> Any:
    from kunlite.sim.cluster import SimHardware

    if args.profile:
        from kunlite.sim.link import Link
        from kunlite.sim.profile import load_profile

        cost, measured = load_profile(args.profile)
        link = measured.seconds if measured is not None else Link(150e-6, 2e9).seconds  # gloo here, if unmeasured
        if not args.device_memory:
            raise ConfigError("--profile needs --device-memory (the pool of each CPU worker)")
        front = json.loads(Path(args.profile).read_text()).get("frontend") or {}  # kunlite profile --served
        return SimHardware(cost, link, Link(10e-6, 10e9).seconds, 10e9, parse_size(args.device_memory),
                           front.get("ingress_s", 0.0), front.get("egress_s", 0.0))
    from kunlite.sim.hardware import AnalyticStepCost, get_device
    from kunlite.sim.link import LinkKind, link_for

    dev = get_device(args.device or "h100")
    tp = args.tensor_parallel
    inter = link_for(LinkKind.NVLINK if args.devices <= 8 else LinkKind.INFINIBAND, dev)
    memory = parse_size(args.device_memory) if args.device_memory else tp * dev.pool_bytes()
    if tp > 1:  # tp GPUs as one device: their FLOP/s, HBM and links add up (each GPU has its own)
        dev = replace(dev, name=f"{tp} x {dev.name}", bf16_flops=tp * dev.bf16_flops,
                      hbm_bandwidth=tp * dev.hbm_bandwidth, memory_bytes=tp * dev.memory_bytes,
                      nvlink_bandwidth=tp * dev.nvlink_bandwidth, pcie_bandwidth=tp * dev.pcie_bandwidth,
                      ib_bandwidth=tp * dev.ib_bandwidth)
        inter = link_for(LinkKind.NVLINK if args.devices <= 8 else LinkKind.INFINIBAND, dev)
    pcie = link_for(LinkKind.PCIE, dev)
    return SimHardware(AnalyticStepCost(model, dev, elem_bytes=2), inter.seconds, pcie.seconds, dev.bandwidth, memory)


def trace_of(args: argparse.Namespace) -> list[Any]:
    from kunlite.sim import traces

    if args.trace:
        reqs = traces.read_burstgpt(args.trace)
        if args.time_scale != 1.0:
            reqs = traces.scale_time(reqs, args.time_scale)
        if args.upscale != 1.0:
            reqs = traces.upscale(reqs, args.upscale, seed=args.seed)
        return reqs
    shape = {k: getattr(args, k) for k in ("burst_seconds", "calm_seconds", "long_fraction", "long_output_median",
                                          "long_output_max") if getattr(args, k) is not None}
    spec = traces.SyntheticTrace(num_requests=max(int(args.duration * args.rate), 1), rate=args.rate,
                                 burst_factor=args.burst_factor, seed=args.seed, **shape)
    return traces.generate(spec)


def setup(args: argparse.Namespace) -> tuple[Any, Any, list[Any]]:
    """(EngineOptions, SimHardware, trace) of parsed, resolved arguments."""
    from kunlite.engine.args import EngineOptions

    opts = EngineOptions(model=model_dir(args.model), devices=args.devices // args.tensor_parallel, dtype=args.dtype,
                         page_size=args.page_size, max_num_seqs=args.max_num_seqs or 64,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                         enable_prefix_caching=False)
    return opts, hardware(args, opts.build().model), trace_of(args)


def main(argv: list[str]) -> int:
    args = _resolve(build_parser().parse_args(argv))
    from kunlite.sim.plots import plot_results
    from kunlite.sim.simulate import run_policies

    try:
        opts, hw, trace = setup(args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    slos = {"ttft": args.slo_ttft * 1e3, "tpot": args.slo_tpot * 1e3}
    results = run_policies(opts, hw, trace, args.policies.split(","), slos=slos, fast_forward=args.fast_forward,
                           jobs=args.jobs)
    print(format_table(results, args, len(trace)))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                               "policies": {r.policy: summary(r) for r in results}}, indent=1))
    if args.plot:
        plot_results(results, Path(args.plot))
    return 0


def summary(r: Any) -> dict[str, Any]:
    m = r.metrics
    s = lambda key: None if m.get(key) is None else m[key] / 1e3  # noqa: E731 - ms -> s
    return {"ttft_p50_s": s("p50_ttft_ms"), "ttft_p90_s": s("p90_ttft_ms"), "ttft_p99_s": s("p99_ttft_ms"),
            "tpot_p50_s": s("p50_tpot_ms"), "tpot_p99_s": s("p99_tpot_ms"), "itl_p50_s": s("p50_itl_ms"),
            "e2e_p50_s": s("p50_e2el_ms"), "e2e_p99_s": s("p99_e2el_ms"), "goodput": m["request_goodput"],
            "throughput": m["request_throughput"], "completed": m["completed"], "failed": m["failed"],
            **r.counters, "sim_wall_s": r.wall_seconds}


def format_table(results: list[Any], args: argparse.Namespace, n: int) -> str:
    tp = getattr(args, "tensor_parallel", 1) or 1
    gpus = f"{args.devices} x {args.device or 'cpu (profile)'}" + (
        f" ({args.devices // tp} instances of tensor-parallel {tp})" if tp > 1 else "")
    head = (f"# simulated: {gpus}, model {args.model}, {n} requests; "
            f"SLOs TTFT <= {args.slo_ttft:g} s, TPOT <= {args.slo_tpot:g} s")
    rows = ["| policy | TTFT P50 (s) | TTFT P99 (s) | TPOT P50 (s) | TPOT P99 (s) | goodput (req/s) | completed | "
            "failed | preemptions | swaps | migrations | drops | restores | simulated in (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for r in results:
        s = summary(r)
        rows.append(f"| {r.policy} | {f(s['ttft_p50_s'])} | {f(s['ttft_p99_s'])} | {f(s['tpot_p50_s'])} | "
                    f"{f(s['tpot_p99_s'])} | {s['goodput'] or 0:.2f} | {s['completed']} | {s['failed']} | "
                    f"{s['preemptions']} | {s['swaps']} | {s['migrations']} | {s['drops']} | {s['restores']} | "
                    f"{s['sim_wall_s']:.1f} |")
    return "\n".join([head, *rows])
