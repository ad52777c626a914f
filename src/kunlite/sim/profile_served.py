"""`python -m kunlite profile --served`: step costs as a served cluster pays them.

`kunlite profile` times steps of an in-process engine on quiet cores. A server pays more per
step: the coordinator plans, messages each worker and commits; the front end detokenizes and
streams every token; the clients read them; all on the same cores as the workers. This mode
measures that: it starts `kunlite serve` with the engine flags given and `--step-log`, times
single requests on the idle server (the front end's ingress and egress latency, which the
simulator adds to every request), drives a calibration load through the OpenAI API (waves of
requests at once over a grid of prompt lengths and counts, long generations, and gamma-arrival
bursts), stops the server, and fits the step cost model to the logged steps, decode steps and
steps with a prompt weighted equally.

A step's seconds here are what the simulator's clock needs between one commit and the next:
from its commit back to its plan, or to the previous commit of the same instance if that came
later (the coordinator's turnaround between steps is part of the cost). Only replicas' steps
(one stage) are used; the fit is scaled to the layers the simulator gives each device, as the
grid profile's is.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from kunlite.sim.profile_grid import Batch, median_samples

SERVED = "calibration"


def calibration_waves(max_model_len: int, quick: bool = False) -> list[list[Any]]:
    """The load, as waves (each a list of `BurstRequest`s) run one after another: requests at
    once over prompt lengths x counts, long generations, then arrivals spread over time
    (`quick`: a few of each, for tests)."""
    from kunlite.bench.arrivals import gamma_arrivals
    from kunlite.bench.burst import BurstRequest

    def req(t: float, prompt: int, out: int, kind: str = "short") -> Any:
        prompt = min(prompt, max_model_len // 2)
        return BurstRequest(t, prompt, max(min(out, max_model_len - prompt - 8), 1), kind)  # (the client adds a few)

    prompts, counts, longs, bursts = ((16, 64, 160), (1, 4, 12, 24), (2, 4),
                                      tuple((p, 24.0, 24) for p in (24, 48, 100))) if quick else \
        ((16, 64, 160), (1, 2, 4, 8, 16, 24, 32, 48), (2, 4, 8),
         tuple((p, r, 48) for p in (24, 48, 100) for r in (6.0, 12.0, 24.0)))
    waves = [[req(0.0, p, 48) for _ in range(n)] for p in prompts for n in counts]
    waves += [[req(0.0, 100, 300, "long") for _ in range(n)] for n in longs]
    rng = np.random.default_rng(0)
    # Arrivals while others decode: steps of one or two prompts among the decodes, as in a burst.
    for prompt, rate, n in bursts:
        waves.append([req(float(t), prompt, 48, "burst") for t in gamma_arrivals(n, rate, 0.5, rng)])
    return waves


def step_kind(batch: Batch) -> str:
    """decode (every sequence one token) or prefill (a prompt's chunk in it)."""
    return "decode" if all(q == 1 for q, _ in batch) else "prefill"


def balanced_weights(batches: list[Batch]) -> list[float]:
    """Sample weights under which decode steps and steps with a prefill count the same in all
    (a served load has a hundred decodes for each prefill; TTFT hangs on the latter)."""
    kinds = [step_kind(b) for b in batches]
    count = {k: kinds.count(k) for k in set(kinds)}
    return [len(kinds) / (len(count) * count[k]) for k in kinds]


def probe_frontend(url: str, tokens: Any, repeats: int = 3) -> list[tuple[float, float]]:
    """Single requests on an idle server, each timed against the step log's clock (monotonic,
    the same on both sides): ingress is from sending to its first step's plan, egress from
    that step's commit to the first token at the client (HTTP, tokenization, the engine
    pipe; detokenization and the stream back)."""
    out: list[tuple[float, float]] = []
    rng = np.random.default_rng(1)
    for prompt_len in (16, 64, 160):
        for _ in range(repeats):
            prompt, _ = tokens.random_prompt(prompt_len, rng)
            sent = time.monotonic()
            first = None
            body = {"model": SERVED, "prompt": prompt, "max_tokens": 2, "stream": True, "ignore_eos": True,
                    "temperature": 0.0}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if first is None and line.startswith("data:"):
                        first = time.monotonic()
            out.append((sent, first or time.monotonic()))
            time.sleep(0.3)  # its steps are logged (the log is written after each step)
    return out


def frontend_latency(probes: list[tuple[float, float]], lines: list[dict[str, Any]]) -> dict[str, float]:
    """Median ingress and egress seconds of the probes (see probe_frontend) from the step log."""
    ins, outs = [], []
    for sent, first in probes:
        step = min((x for x in lines if x["started"] >= sent), key=lambda x: x["started"], default=None)
        if step is not None and step["ended"] <= first:
            ins.append(step["started"] - sent)
            outs.append(first - step["ended"])
    if not ins:
        return {"ingress_s": 0.0, "egress_s": 0.0, "probes": 0}
    return {"ingress_s": float(np.median(ins)), "egress_s": float(np.median(outs)), "probes": len(ins)}


def served_seconds(lines: Iterable[dict[str, Any]]) -> list[tuple[Batch, float]]:
    """(batch, seconds) of each replica step of a --step-log: from its commit back to its plan
    or to the same instance's previous commit, whichever is later."""
    by_instance: dict[int, list[dict[str, Any]]] = {}
    for x in lines:
        if x["stages"] == 1 and x["batch"]:
            by_instance.setdefault(x["instance"], []).append(x)
    out = []
    for steps in by_instance.values():
        steps.sort(key=lambda x: x["ended"])
        previous = -np.inf
        for x in steps:
            out.append(([(int(q), int(c)) for q, c in x["batch"]], x["ended"] - max(x["started"], previous)))
            previous = x["ended"]
    return out


def read_step_log(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def serve_and_log(engine_argv: list[str], model: str, step_log: Path, quick: bool = False,
                  log: Any = print) -> list[tuple[float, float]]:
    """Start `kunlite serve` with `engine_argv` and `--step-log`, time single requests
    (`probe_frontend`), run the calibration waves, stop it; returns the probes."""
    from kunlite.bench.burst import run
    from kunlite.bench.datasets import TextTokens
    from kunlite.bench.server import start_server, stop_server

    out = step_log.with_suffix(".server.log")
    proc, url = start_server([*engine_argv, "--model", model, "--served-model-name", SERVED, "--no-access-log",
                              "--step-log", str(step_log)], out)
    try:
        info = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
        tokens = TextTokens(model)
        waves = calibration_waves(int(info.get("max_model_len") or 512), quick)
        t0 = time.perf_counter()
        probes = probe_frontend(url, tokens)
        for i, wave in enumerate(waves):
            res = run(url, SERVED, wave, tokens, slos={"ttft": 1e9, "tpot": 1e9}, seed=i)
            if res["all"]["failed"]:
                raise RuntimeError(f"calibration wave {i}: {res['all']['failed']} requests failed; see {out}")
        log(f"{len(probes)} single requests and {len(waves)} calibration waves served in "
            f"{time.perf_counter() - t0:.0f} s")
    finally:
        stop_server(proc)
    return probes


def served_profile(engine_argv: list[str], model: str, from_steps: str | None = None, quick: bool = False,
                   step_log: str | None = None, log: Any = print) -> dict[str, Any]:
    """Serve the calibration load, logging its steps to `step_log` (default: a temporary file),
    or read `from_steps` instead; fit, and return the profile dict (the grid profile's
    format, "grid": "served")."""
    from kunlite.engine.step_cost import FEATURES, fit_with_report
    from kunlite.sim.profile import device_name, format_table

    probes: list[tuple[float, float]] = []
    if from_steps is None:
        path = Path(step_log) if step_log else Path(tempfile.mkdtemp(prefix="kunlite-profile-")) / "steps.jsonl"
        path.unlink(missing_ok=True)  # the log appends
        probes = serve_and_log(engine_argv, model, path, quick, log)
    else:
        path = Path(from_steps)
    lines = read_step_log(path)
    steps = served_seconds(lines)
    if len(steps) < 20:
        raise RuntimeError(f"{path}: {len(steps)} replica steps logged; too few to fit")
    samples = median_samples([(step_kind(batch), batch, s) for batch, s in steps])
    batches = [s.batch for s in samples]
    weights, report = fit_with_report(batches, [s.seconds for s in samples], sample_weights=balanced_weights(batches))
    frontend = frontend_latency(probes, lines)
    log(f"{len(steps)} steps from {path}, {len(samples)} distinct; front end: ingress "
        f"{frontend['ingress_s'] * 1e3:.1f} ms, egress {frontend['egress_s'] * 1e3:.1f} ms ({frontend['probes']} probes)")
    log(format_table(samples, weights.predict))
    log(report.format())
    log("weights: " + ", ".join(f"{k} {v:.4g}" for k, v in weights.to_dict().items()))
    cfg = json.loads((Path(model) / "config.json").read_text())
    engine = _engine_options(engine_argv)
    return {
        "format": 1, "device": "cpu", "device_name": device_name("cpu"), "model": model,
        "model_name": Path(model).name, "num_layers": int(cfg["num_hidden_layers"]),
        "dtype": engine.dtype, "threads": engine.threads or 0, "page_size": engine.page_size,
        "grid": "served-quick" if quick else "served",
        "served": {"engine_args": engine_argv, "steps": len(steps)}, "frontend": frontend,
        "samples": [s.to_json() for s in samples],
        "fit": {"features": list(FEATURES), "relative": True, "weights": weights.to_dict(),
                "report": report.to_dict()},
        "p2p": None,
    }


def _engine_options(engine_argv: list[str]) -> Any:
    """The EngineOptions the server was started with, parsed as `kunlite serve` parses them."""
    import argparse

    from kunlite.engine.args import add_engine_args, options_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return options_from_args(parser.parse_args(engine_argv))
