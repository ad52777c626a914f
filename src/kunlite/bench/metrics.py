"""Per-request records and the serving metrics computed from them (vLLM's definitions).

All times in a `RequestRecord` are seconds; the reported metrics are milliseconds.

- TTFT: from sending the request to the first SSE chunk that carries text.
- ITL: the gaps between consecutive text-carrying chunks after the first (a chunk that carries
  several tokens is one gap).
- TPOT, per request: (E2E - TTFT) / (output tokens - 1); undefined for fewer than 2 tokens.
- E2E ("e2el"): from sending the request to the end of the stream.
- Goodput (DistServe, vLLM `--goodput`): completed requests that meet every given SLO, per
  second of benchmark duration. A request with no TPOT (one output token) counts TPOT as 0.

Only completed requests (status "ok") enter latency statistics, token totals and throughput;
rejected (HTTP 429) and failed requests are only counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

OK, REJECTED, FAILED = "ok", "rejected", "failed"
SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS: tuple[tuple[str, str, str], ...] = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


@dataclass
class RequestRecord:
    index: int
    arrival: float  # scheduled arrival, s since the benchmark started
    prompt_len: int  # usage.prompt_tokens when the server reports it, else the dataset's
    max_tokens: int
    start: float | None = None  # sent (after the concurrency cap); arrival <= start
    end: float | None = None  # response over, whatever its status; start <= end
    status: str = "pending"  # ok | rejected | failed once finished
    http_status: int | None = None
    ttft: float | None = None  # s after start; ok => not None and ttft <= e2e
    itl: list[float] = field(default_factory=list)  # sum(itl) <= e2e - ttft
    e2e: float | None = None  # s after start; ok => not None
    output_tokens: int = 0
    prompt_tokens_source: str = "dataset"  # usage | dataset
    output_tokens_source: str = "none"  # usage | tokenizer | chunks
    error: str | None = None
    retry_after: float | str | None = None  # from a 429's Retry-After header

    @property
    def tpot(self) -> float | None:
        if self.status != OK or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tpot"] = self.tpot
        return d


def parse_percentiles(text: str) -> list[float]:
    try:
        ps = [float(p) for p in text.split(",") if p.strip()]
    except ValueError as e:
        raise ValueError(f"--percentiles: not a comma-separated list of numbers: {text!r}") from e
    if not ps or any(not 0 < p < 100 for p in ps):
        raise ValueError(f"--percentiles: each must be in (0, 100): {text!r}")
    return ps


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        for part in item.split():
            name, sep, value = part.partition(":")
            if not sep or name not in SLO_METRICS:
                raise ValueError(
                    f"--goodput: expected NAME:MS with NAME in {SLO_METRICS}: {part!r}"
                )
            try:
                ms = float(value)
            except ValueError as e:
                raise ValueError(f"--goodput: not a number of ms: {part!r}") from e
            if not ms > 0:
                raise ValueError(f"--goodput: an SLO must be > 0 ms: {part!r}")
            slos[name] = ms
    return slos


def meets_slos(rec: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a request completed and meets every SLO (ms)."""
    if rec.status != OK or rec.ttft is None or rec.e2e is None:
        return False
    values = {"ttft": rec.ttft, "tpot": rec.tpot or 0.0, "e2el": rec.e2e}
    return all(values[name] * 1000.0 <= ms for name, ms in slos.items())


def pkey(p: float) -> str:
    """50.0 -> "p50", 99.9 -> "p99.9"."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def summarize(values_s: list[float], percentiles: list[float]) -> dict[str, float | None]:
    """mean, median, std and the percentiles (linear interpolation) in ms; None when empty."""
    keys = ["mean", "median", "std"] + [pkey(p) for p in percentiles]
    if not values_s:
        return dict.fromkeys(keys, None)
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    out: dict[str, float | None] = {
        "mean": float(ms.mean()),
        "median": float(np.median(ms)),
        "std": float(ms.std()),
    }
    for p in percentiles:
        out[pkey(p)] = float(np.percentile(ms, p))
    return out


def compute_metrics(
    records: list[RequestRecord],
    duration: float,
    percentiles: list[float],
    slos: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The flat result dict: counts, totals, throughputs, goodput and latency summaries."""
    done = [r for r in records if r.status == OK]
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_tokens for r in done)
    m: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "rejected": sum(r.status == REJECTED for r in records),
        "failed": sum(r.status == FAILED for r in records),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": rate(len(done)),
        "request_goodput": rate(sum(meets_slos(r, slos) for r in done)) if slos else None,
        "output_throughput": rate(total_out),
        "total_token_throughput": rate(total_in + total_out),
    }
    series: dict[str, list[float]] = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [t for t in (r.tpot for r in done) if t is not None],
        "itl": [g for r in done for g in r.itl],
        "e2el": [r.e2e for r in done if r.e2e is not None],
    }
    for name, values in series.items():
        for stat, v in summarize(values, percentiles).items():
            m[f"{stat}_{name}_ms"] = v
    return m


def format_report(m: dict[str, Any], percentiles: list[float], label: str | None = None) -> str:
    """A table like vLLM's "Serving Benchmark Result"."""

    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    if label:
        lines.append(f"{'Label:':<40}{label:>10}")
    rows: list[tuple[str, Any, str]] = [
        ("Successful requests:", m["completed"], "d"),
        ("Rejected requests (429):", m["rejected"], "d"),
        ("Failed requests:", m["failed"], "d"),
        ("Benchmark duration (s):", m["duration"], ".2f"),
        ("Total input tokens:", m["total_input_tokens"], "d"),
        ("Total generated tokens:", m["total_output_tokens"], "d"),
        ("Request throughput (req/s):", m["request_throughput"], ".2f"),
    ]
    if m.get("request_goodput") is not None:
        rows.append(("Request goodput (req/s):", m["request_goodput"], ".2f"))
    rows += [
        ("Output token throughput (tok/s):", m["output_throughput"], ".2f"),
        ("Total token throughput (tok/s):", m["total_token_throughput"], ".2f"),
    ]
    lines += [f"{name:<40}{num(v, fmt):>10}" for name, v, fmt in rows]
    for key, short, title in LATENCY_METRICS:
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        stats = [("Mean", "mean"), ("Median", "median")]
        stats += [(f"P{pkey(p)[1:]}", pkey(p)) for p in percentiles]
        for word, stat in stats:
            lines.append(f"{f'{word} {short} (ms):':<40}{num(m[f'{stat}_{key}_ms'], '.2f'):>10}")
    lines.append("=" * 50)
    return "\n".join(lines)
