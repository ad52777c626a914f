"""`python -m kunlite profile --served`: step costs as a served cluster pays them.

`kunlite profile` times steps of an in-process engine on quiet cores. A server pays more per
step: the coordinator plans, messages each worker and commits; the front end detokenizes and
streams every token; the clients read them; all on the same cores as the workers. This mode
measures that: it starts `kunlite serve` with the engine flags given and `--step-log`, drives
a calibration load through the OpenAI API (waves of requests at once over a grid of prompt
lengths and counts, long generations, and a gamma-arrival burst), stops the server, and fits
the step cost model to the logged steps.

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

    prompts, counts, longs, burst = ((16, 64), (1, 4, 12), (2,), 12) if quick else \
        ((16, 64, 160), (1, 2, 4, 8, 16, 24, 32, 48), (2, 4, 8), 48)
    waves = [[req(0.0, p, 48) for _ in range(n)] for p in prompts for n in counts]
    waves += [[req(0.0, 100, 300, "long") for _ in range(n)] for n in longs]
    rng = np.random.default_rng(0)
    waves.append([req(float(t), 48, 48, "burst") for t in gamma_arrivals(burst, 12.0, 0.5, rng)])
    return waves


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


def serve_and_log(engine_argv: list[str], model: str, step_log: Path, quick: bool = False, log: Any = print) -> None:
    """Start `kunlite serve` with `engine_argv` and `--step-log`, run the calibration waves,
    stop it."""
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
        for i, wave in enumerate(waves):
            res = run(url, SERVED, wave, tokens, slos={"ttft": 1e9, "tpot": 1e9}, seed=i)
            if res["all"]["failed"]:
                raise RuntimeError(f"calibration wave {i}: {res['all']['failed']} requests failed; see {out}")
        log(f"{len(waves)} calibration waves served in {time.perf_counter() - t0:.0f} s")
    finally:
        stop_server(proc)


def served_profile(engine_argv: list[str], model: str, from_steps: str | None = None, quick: bool = False,
                   step_log: str | None = None, log: Any = print) -> dict[str, Any]:
    """Serve the calibration load, logging its steps to `step_log` (default: a temporary file),
    or read `from_steps` instead; fit, and return the profile dict (the grid profile's
    format, "grid": "served")."""
    from kunlite.engine.step_cost import FEATURES, fit_with_report
    from kunlite.sim.profile import device_name, format_table

    if from_steps is None:
        path = Path(step_log) if step_log else Path(tempfile.mkdtemp(prefix="kunlite-profile-")) / "steps.jsonl"
        path.unlink(missing_ok=True)  # the log appends
        serve_and_log(engine_argv, model, path, quick, log)
    else:
        path = Path(from_steps)
    steps = served_seconds(read_step_log(path))
    if len(steps) < 20:
        raise RuntimeError(f"{path}: {len(steps)} replica steps logged; too few to fit")
    samples = median_samples([("served", batch, s) for batch, s in steps])
    weights, report = fit_with_report([s.batch for s in samples], [s.seconds for s in samples])
    log(f"{len(steps)} steps from {path}, {len(samples)} distinct")
    log(format_table(samples, weights.predict))
    log(report.format())
    log("weights: " + ", ".join(f"{k} {v:.4g}" for k, v in weights.to_dict().items()))
    cfg = json.loads((Path(model) / "config.json").read_text())
    return {
        "format": 1, "device": "cpu", "device_name": device_name("cpu"), "model": model,
        "model_name": Path(model).name, "num_layers": int(cfg["num_hidden_layers"]),
        "dtype": _flag(engine_argv, "--dtype", "float32"), "threads": int(_flag(engine_argv, "--threads", "0")),
        "page_size": int(_flag(engine_argv, "--page-size", "16")), "grid": "served-quick" if quick else "served",
        "served": {"engine_args": engine_argv, "steps": len(steps)},
        "samples": [s.to_json() for s in samples],
        "fit": {"features": list(FEATURES), "relative": True, "weights": weights.to_dict(),
                "report": report.to_dict()},
        "p2p": None,
    }


def _flag(argv: list[str], name: str, default: str) -> str:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default
