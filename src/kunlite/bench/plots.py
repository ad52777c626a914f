"""`bench serve --plot DIR`: a TTFT CDF and a timeline of arrivals, TTFTs and queue length.

matplotlib is an optional dependency (the `bench` extra); it is imported only here, and only
with the Agg backend, so that the benchmark runs without it and without a display.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kunlite.bench.metrics import FAILED, OK, REJECTED, RequestRecord


def require_matplotlib() -> None:
    """Fail before the benchmark runs, not after, when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            "--plot needs matplotlib: pip install matplotlib (or kunlite[bench])"
        ) from e


def _figure(height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(9, height), layout="constrained")


def occupancy(
    begins: Sequence[float], ends: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """How many intervals [begin, end) are open over time, as a step function.

    Returns (times, counts): counts[i] holds from times[i] until times[i+1]. Starts from
    (0, 0) so that a plot begins at the benchmark's start. Invariant: counts >= 0 whenever
    every begin <= its end.
    """
    b = np.asarray(begins, dtype=np.float64)
    e = np.asarray(ends, dtype=np.float64)
    times = np.concatenate([[0.0], b, e])
    steps = np.concatenate([[0], np.ones(b.size, dtype=np.int64), -np.ones(e.size, dtype=np.int64)])
    # At equal times, ends (-1) before begins (+1): a back-to-back hand-over is not an overlap.
    order = np.lexsort((steps, times))
    return times[order], np.cumsum(steps[order])


def write_plots(
    records: list[RequestRecord], out_dir: str, ttft_slo_ms: float | None = None,
    label: str | None = None,
) -> list[str]:
    """Write ttft_cdf.png and timeline.png into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    title = f" ({label})" if label else ""
    done = [r for r in records if r.status == OK and r.ttft is not None]

    fig = _figure(4.5)
    ax = fig.add_subplot(1, 1, 1)
    ttfts = np.sort(np.array([r.ttft for r in done], dtype=np.float64) * 1000.0)
    if ttfts.size:
        ax.step(ttfts, np.arange(1, ttfts.size + 1) / ttfts.size, where="post", label="TTFT")
    if ttft_slo_ms is not None:
        ax.axvline(ttft_slo_ms, color="tab:red", linestyle="--", label=f"SLO {ttft_slo_ms:g} ms")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of completed requests")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"TTFT CDF, {len(done)} completed of {len(records)}{title}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    cdf_path = os.path.join(out_dir, "ttft_cdf.png")
    fig.savefig(cdf_path, dpi=110)

    fig = _figure(8.0)
    ax_rate, ax_ttft, ax_q = fig.subplots(3, 1, sharex=True)
    arrivals = np.array([r.arrival for r in records], dtype=np.float64)
    span = max([r.end or r.arrival for r in records] + [1e-3])
    width = span / 60.0
    counts, edges = np.histogram(arrivals, bins=np.arange(0.0, span + width, width))
    ax_rate.stairs(counts / width, edges, fill=True, alpha=0.4, label="arrival rate")
    if len(records) <= 2000:
        ax_rate.plot(arrivals, np.zeros_like(arrivals), "|", color="k", markersize=8,
                     label="arrivals")
    ax_rate.set_ylabel("req/s")
    ax_rate.legend(loc="upper right")
    ax_rate.set_title(f"Timeline{title}")

    ax_ttft.plot([r.arrival for r in done], [r.ttft * 1000.0 for r in done], ".",
                 markersize=4, label="TTFT (completed)")
    for status, marker, color in ((REJECTED, "x", "tab:orange"), (FAILED, "v", "tab:red")):
        xs = [r.arrival for r in records if r.status == status]
        if xs:
            ax_ttft.plot(xs, np.zeros(len(xs)), marker, color=color, linestyle="none",
                         label=f"{status} ({len(xs)})")
    if ttft_slo_ms is not None:
        ax_ttft.axhline(ttft_slo_ms, color="tab:red", linestyle="--", linewidth=1)
    ax_ttft.set_ylabel("TTFT (ms) at arrival")
    ax_ttft.legend(loc="upper right")

    # Queued at the client: [arrival, start); in flight: [start, end). A finished record has
    # both start and end; the fallbacks only keep a partial record from breaking the plot.
    starts = [r.arrival if r.start is None else r.start for r in records]
    ends = [s if r.end is None else r.end for r, s in zip(records, starts)]
    q_t, q_n = occupancy([r.arrival for r in records], starts)
    f_t, f_n = occupancy(starts, ends)
    ax_q.step(f_t, f_n, where="post", label="in flight")
    ax_q.step(q_t, q_n, where="post", label="queued at client")
    ax_q.set_ylabel("requests")
    ax_q.set_xlabel("time since start (s)")
    ax_q.legend(loc="upper right")
    for a in (ax_rate, ax_ttft, ax_q):
        a.grid(alpha=0.3)
    timeline_path = os.path.join(out_dir, "timeline.png")
    fig.savefig(timeline_path, dpi=110)
    return [cdf_path, timeline_path]
