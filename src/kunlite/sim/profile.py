"""`python -m kunlite profile`: measure engine steps over a grid and fit the step cost model.

Runs the real engine in-process (`EngineCore`, with the usual engine flags: --model,
--device, --dtype, --threads, --device-memory, ...) over the grid of `profile_grid` (prefill
chunks, decode batches, mixed steps), after a warm-up; every cell is run `repeats` times and
each distinct step keeps the median of its times. Then it fits `engine.step_cost` and writes
a JSON profile:

    {"format": 1, "device": "cpu", "device_name": "...", "model": "<--model>",
     "num_layers": L, "dtype": "bfloat16", "threads": 1, "page_size": 16, "grid": "full",
     "samples": [{"cell": "...", "batch": [[q, c], ...], "seconds": s, "repeats": n}, ...],
     "fit": {"features": [...], "relative": true, "weights": {...}, "report": {...}},
     "p2p": null}

"p2p" is left for the measured point-to-point transfer table (a list of [bytes, seconds],
read by `sim.link.MeasuredLink.from_pairs`); null until something measures it. The engine's
token budget is raised to what the grid needs, prefix caching is on (the grid relies on it),
and nothing in the timings is asserted: it prints what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kunlite.engine.args import add_engine_args, options_from_args
from kunlite.engine.step_cost import FEATURES, FittedStepCost, StepCostWeights, fit_with_report
from kunlite.sim.link import MeasuredLink
from kunlite.sim.profile_grid import FULL, QUICK, Batch, Grid, Sample, median_samples, reconstruct


class Driver:
    """Feeds one EngineCore and turns each step's timing into a (cell, batch, seconds) row."""

    def __init__(self, core: Any, vocab_size: int, seed: int = 0) -> None:
        self.core = core
        self.vocab = vocab_size
        self.rng = np.random.default_rng(seed)
        self.live: dict[str, list[int]] = {}  # request id -> [prompt length, tokens generated]
        self.rows: list[tuple[str, Batch, float]] = []
        self.skipped = 0  # steps whose batch could not be recovered
        self._next = 0

    def tokens(self, n: int) -> list[int]:
        return self.rng.integers(3, self.vocab, size=n).tolist()

    def submit(self, prompt: list[int], max_tokens: int) -> None:
        from kunlite.engine.messages import EngineRequest
        from kunlite.sampling_params import SamplingParams

        rid = f"p{self._next}"
        self._next += 1
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.core.add_request(EngineRequest(rid, prompt, params, time.time()))
        self.live[rid] = [len(prompt), 0]

    def step(self, cell: str | None) -> None:
        """One engine step; recorded under `cell` unless None (warm-up)."""
        decoding = [p + g - 1 for p, g in self.live.values() if g > 0]  # contexts before the step
        outputs = self.core.step()
        for out in outputs:
            self.live[out.request_id][1] += len(out.new_token_ids)
            if out.finish_reason is not None:
                del self.live[out.request_id]
        for t in self.core.take_timings():
            batch = reconstruct(t.num_prefill_tokens, t.num_decode_tokens, t.num_context_tokens, decoding)
            if batch is None:
                self.skipped += 1
            elif cell is not None:
                self.rows.append((cell, batch, t.seconds))

    def drain(self, cell: str | None) -> None:
        while self.core.has_unfinished:
            self.step(cell)


def run_grid(driver: Driver, grid: Grid, docs: list[list[int]], log: Any = print) -> None:
    """Every cell of the grid, `grid.repeats` times, recorded in the driver."""
    d = driver
    for r in range(grid.repeats):
        for q, c in grid.prefill:
            d.submit(docs[r][:c] + d.tokens(q), 1)
            d.drain(f"prefill q={q} c={c}")
        for b, c in grid.decode:
            for i in range(b):
                d.submit(docs[i][:c] + d.tokens(1), grid.decode_steps + 1)
            d.drain(f"decode B={b} c={c}")
        for b, c_d, q, c_p in grid.mixed:
            cell = f"mixed B={b} c={c_d} + q={q} c={c_p}"
            for i in range(b):
                d.submit(docs[i][:c_d] + d.tokens(1), 3)
            d.step(cell)  # the decodes' prompt tails: now all of them decode
            d.submit(docs[r][:c_p] + d.tokens(q), 1)
            d.drain(cell)
        log(f"  repeat {r + 1}/{grid.repeats} done")


def profile(options: Any, grid: Grid, *, grid_name: str, log: Any = print) -> dict[str, Any]:
    """Build the engine, warm it up, cache the documents, run the grid, fit; print a summary
    table and the fit report; return the profile dict."""
    from kunlite.engine.core import EngineCore

    core = EngineCore(options.build())
    cfg = core.config
    grid = grid.fit_to(core.max_model_len)
    driver = Driver(core, cfg.model.vocab_size, seed=cfg.seed)
    preemptions = core.stats().num_preemptions_total
    t0 = time.perf_counter()
    driver.submit(driver.tokens(min(64, core.max_model_len // 2)), 4)  # warm-up: not recorded
    for _ in range(4):
        driver.submit(driver.tokens(8), 4)
    driver.drain(None)
    lengths = grid.doc_lengths()
    log(f"documents: {len(lengths)} prompts, {sum(lengths)} tokens to cache")
    docs = [driver.tokens(n) for n in lengths]
    for doc in docs:  # not recorded: they run first, while the engine still warms up
        if doc:
            driver.submit(doc, 1)
            driver.drain(None)
    run_grid(driver, grid, docs, log)
    if core.stats().num_preemptions_total != preemptions:
        log("warning: the engine preempted sequences; raise --device-memory for a clean profile")
    samples = median_samples(driver.rows)
    weights, report = fit_with_report([s.batch for s in samples], [s.seconds for s in samples])
    log(f"{len(driver.rows)} steps timed in {time.perf_counter() - t0:.1f} s, {len(samples)} distinct, "
        f"{driver.skipped} unreadable")
    log(format_table(samples, weights.predict))
    log(report.format())
    log("weights: " + ", ".join(f"{k} {v:.4g}" for k, v in weights.to_dict().items()))
    dev = cfg.device
    return {
        "format": 1, "device": dev.device, "device_name": device_name(dev.device),
        "model": cfg.model_dir, "model_name": Path(cfg.model_dir).name, "num_layers": cfg.model.num_layers,
        "dtype": str(core.runner.dtype).removeprefix("torch."), "threads": dev.threads or _torch_threads(),
        "page_size": cfg.cache.page_size, "grid": grid_name,
        "samples": [s.to_json() for s in samples],
        "fit": {"features": list(FEATURES), "relative": True, "weights": weights.to_dict(),
                "report": report.to_dict()},
        "p2p": None,
    }


def load_profile(source: str | Path | dict[str, Any]) -> tuple[FittedStepCost, MeasuredLink | None]:
    """The step cost of a profile (a path or its parsed JSON), and its measured
    point-to-point link when "p2p" holds one."""
    p = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    if p.get("format") != 1:
        raise ValueError(f"not a kunlite profile (format {p.get('format')!r})")
    cost = FittedStepCost(StepCostWeights.from_dict(p["fit"]["weights"]), int(p["num_layers"]))
    return cost, (MeasuredLink.from_pairs(p["p2p"]) if p.get("p2p") else None)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def format_table(samples: Sequence[Sample], predict: Any) -> str:
    """Per kind of cell: samples, median measured ms, median relative error of the fit."""
    kinds: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        kinds.setdefault(s.cell.split()[0], []).append((s.seconds, abs(predict(s.batch) - s.seconds) / s.seconds))
    lines = [f"{'kind':<10}{'steps':>7}{'median ms':>12}{'median err':>12}{'max err':>10}"]
    for kind, rows in kinds.items():
        secs, errs = zip(*rows)
        lines.append(f"{kind:<10}{len(rows):>7}{np.median(secs) * 1000:>12.2f}{np.median(errs):>12.1%}{max(errs):>10.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kunlite profile",
                                     description="Time engine steps over a grid and fit the step cost model.")
    add_engine_args(parser)
    parser.add_argument("--quick", action="store_true",
                        help="a short grid (about 30 s on the default model); with --served, a short calibration load")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each cell (default: 3, quick 2)")
    parser.add_argument("--out", default=None, help="JSON file (default: profile-<model>-<device>.json)")
    parser.add_argument("--p2p", action="store_true",
                        help="also measure P2P between two workers by message size (transfer.probe; gloo on CPU)")
    parser.add_argument("--served", action="store_true",
                        help="time steps as a server pays them: `kunlite serve` with these engine flags (e.g. "
                             "--devices 2) under a calibration load through the API, fitted from its --step-log")
    parser.add_argument("--from-steps", default=None, metavar="PATH",
                        help="with --served: fit an existing --step-log instead of serving")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.served:
        from kunlite.engine.pull import resolve_model
        from kunlite.sim.profile_served import served_profile

        # What is left once this command's own flags are taken is what `kunlite serve` gets.
        own = argparse.ArgumentParser(add_help=False)
        for flag in ("--quick", "--p2p", "--served"):
            own.add_argument(flag, action="store_true")
        for flag in ("--repeats", "--out", "--from-steps", "--model", "--step-log"):
            own.add_argument(flag)
        _, engine_argv = own.parse_known_args(argv)
        result = served_profile(engine_argv, str(resolve_model(args.model)), args.from_steps, args.quick,
                                args.step_log)
    else:
        grid = QUICK if args.quick else FULL
        if args.repeats is not None:
            if args.repeats < 1:
                parser.error("--repeats must be >= 1")
            grid = dataclasses.replace(grid, repeats=args.repeats)
        base = options_from_args(args)
        options = dataclasses.replace(base, enable_prefix_caching=True,
                                      max_num_batched_tokens=max(grid.budget, base.max_num_batched_tokens or 0),
                                      max_num_seqs=max(grid.max_seqs, base.max_num_seqs))
        result = profile(options, grid, grid_name="quick" if args.quick else "full")
    if args.p2p:
        from kunlite.transfer.probe import measure

        latency, samples = measure(device="cuda" if options.device.startswith("cuda") else "cpu")
        # One-way time by size; a message's latency is half the measured 4-byte round trip.
        result["p2p"] = [[4, latency / 2]] + [[s.num_bytes, s.seconds + latency / 2] for s in samples]
        print(f"p2p: round trip {latency * 1e6:.0f} us; {samples[-1].gb_per_s:.2f} GB/s at "
              f"{samples[-1].num_bytes >> 20} MiB")
    out = Path(args.out or f"profile-{result['model_name']}-{result['device'].replace(':', '')}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0
