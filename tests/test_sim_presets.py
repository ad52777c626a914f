"""The paper-scale presets of `kunlite simulate` create KunServe's situation: a burst that needs
more KV than the cluster has, on top of long-lived requests.

The full presets take minutes (docs/simulations.md has their tables), so this runs a scaled-down
copy of `kunserve-a800`: its trace shape (the burst, the share of chain-of-thought-like long
outputs, the seed) and engine limits, on 2 A800s whose KV pool is shrunk by KV_SCALE (the
parameters stay whole), the rate shrunk with the cluster's KV, and the long outputs shortened
by LENGTH_SCALE (the rate raised by 1 / LENGTH_SCALE^2 to hold the same KV, tokens x time), so
that it runs in seconds. With the presets' old traffic (BurstGPT-like lengths at 6 req/s on 8
GPUs, 256 sequences) memory never runs out here (0 preemptions, 0 drops) and the test fails.
"""

from __future__ import annotations

import argparse

import pytest

from kunlite.sim import cli

DEVICES = 2
KV_SCALE = 1 / 32  # of an A800's KV pool (its parameters stay whole)
LENGTH_SCALE = 1 / 4  # of the long outputs


def mini(preset: str) -> argparse.Namespace:
    p = cli.PRESETS[preset]
    args = cli._resolve(cli.build_parser().parse_args(["--preset", preset]))
    # the same load per unit of KV: the rate scales with the cluster's KV and the long outputs' length
    args.devices = DEVICES
    args.rate = p["rate"] * DEVICES / p["devices"] * KV_SCALE
    if args.long_output_median is not None:  # a long request holds KV ~ length^2 (tokens x time)
        args.rate /= LENGTH_SCALE**2
        args.long_output_median *= LENGTH_SCALE
        args.long_output_max = int((args.long_output_max or 8192) * LENGTH_SCALE)
    args.max_model_len = 4096  # within the shrunk pool: prompts are cut to 2048, long outputs now end at 2048
    return args


def trace(args: argparse.Namespace) -> list:
    return [r._replace(prompt_tokens=min(r.prompt_tokens, 2048)) for r in cli.trace_of(args)]


def run(args: argparse.Namespace, policies: list[str]) -> dict[str, dict]:
    from kunlite.engine.args import EngineOptions
    from kunlite.sim.hardware import get_device
    from kunlite.sim.simulate import run_policies

    opts = EngineOptions(model=cli.model_dir(args.model), devices=args.devices, dtype=args.dtype,
                         page_size=args.page_size, max_num_seqs=args.max_num_seqs or 64,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                         enable_prefix_caching=False)
    model = opts.build().model
    full = cli.hardware(args, model)
    from kunlite.engine.sizing import pool_sizing

    sizing = pool_sizing(model, (0, model.num_layers), elem_bytes=2, page_size=args.page_size,
                         device_memory=get_device(args.device).pool_bytes())
    params = sum(g.pages for g in sizing.groups) * sizing.page_bytes
    kv = full.device_memory - params
    args.device_memory = str(int(params + kv * KV_SCALE))
    hw = cli.hardware(args, model)
    results = run_policies(opts, hw, trace(args), policies, slos={"ttft": 5e3, "tpot": 5e2})
    return {r.policy: cli.summary(r) for r in results}


@pytest.mark.parametrize("preset", ["kunserve-a800"])
def test_the_burst_overflows_kv_and_kunserve_cuts_the_tail(preset: str) -> None:
    args = mini(preset)
    n = len(trace(args))
    out = run(args, ["recompute", "kunserve-remote"])
    kv, kun = out["recompute"], out["kunserve-remote"]
    for name, s in out.items():  # nothing is lost, whatever the policy does
        assert (s["completed"], s["failed"]) == (n, 0), (name, s)
    assert kv["preemptions"] > 0, kv  # memory ran out: the KV-centric policy had to preempt
    assert kun["drops"] > 0, kun  # ... and kunserve dropped parameters instead
    assert kun["ttft_p99_s"] < kv["ttft_p99_s"], (kun, kv)
