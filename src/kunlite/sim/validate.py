"""The simulator against the real cluster: a real run's requests replayed through `simulate`.

`scripts/bench_burst.py` keeps every request's record (arrival, prompt tokens as the server
counted them, output tokens, TTFT, ITLs); `simulate_records` replays exactly those requests on
2 simulated devices with a CPU profile (`kunlite profile --served`), and `compare` puts the
real and simulated TTFT P50 and P99 and TPOT P50 side by side. scripts/validate_sim.py prints
the table; tests/test_sim_validation.py runs a small version in CI.
"""

from __future__ import annotations

from typing import Any

METRICS = (("p50_ttft_ms", "TTFT P50"), ("p99_ttft_ms", "TTFT P99"), ("p50_tpot_ms", "TPOT P50"))


def trace_of(records: list[dict[str, Any]]) -> list[Any]:
    """The requests a real run served: arrival, prompt tokens (the server's count: the client
    puts an index in front of each prompt), output tokens."""
    from kunlite.sim.traces import TraceRequest

    return [TraceRequest(r["arrival"], r["prompt_len"], r["max_tokens"]) for r in records]


def simulate_records(policy: str, records: list[dict[str, Any]], profile: str, device_memory: str,
                     max_model_len: int, model: str | None = None, devices: int = 2) -> dict[str, Any]:
    """The metrics (compute_metrics' keys, and "counters") of `records` simulated under
    `policy` (a name of sim.simulate.POLICIES) with the profile at path `profile`."""
    from kunlite.sim import cli
    from kunlite.sim.simulate import run_policies

    argv = ["--devices", str(devices), "--profile", profile, "--device-memory", device_memory,
            "--max-model-len", str(max_model_len), "--policies", policy, "--duration", "1"]
    if model:
        argv += ["--model", model]
    args = cli._resolve(cli.build_parser().parse_args(argv))
    opts, hw, _ = cli.setup(args)
    (result,) = run_policies(opts, hw, trace_of(records), [policy], slos={"ttft": 5e3, "tpot": 5e2})
    return {**result.metrics, "counters": result.counters}


def compare(real: dict[str, Any], sim: dict[str, Any]) -> dict[str, tuple[float, float, float | None]]:
    """{metric: (real s, simulated s, relative error)} of two compute_metrics dicts."""
    out = {}
    for m, _ in METRICS:
        r, s = real[m], sim[m]
        out[m] = (r / 1e3, s / 1e3, (s - r) / r if r else None)
    return out
