"""Serving figures over the last minute, for `/v1/cluster` (the live view): TTFT and TPOT
percentiles and output tokens per second. Prometheus histograms are cumulative, so a recent
percentile needs the samples themselves; these deques keep the last WINDOW_S of them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 60.0


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[k]


@dataclass
class RecentServing:
    window_s: float = WINDOW_S
    ttft: deque[tuple[float, float]] = field(default_factory=deque)  # (time, seconds)
    tpot: deque[tuple[float, float]] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (time, output tokens)

    def add(self, series: str, now: float, value: float) -> None:
        q: deque = getattr(self, series)
        q.append((now, value))
        while q and q[0][0] < now - self.window_s:
            q.popleft()

    def summary(self, now: float) -> dict[str, float | None]:
        since = now - self.window_s
        ttft = [v for t, v in self.ttft if t >= since]
        tpot = [v for t, v in self.tpot if t >= since]
        tokens = sum(n for t, n in self.tokens if t >= since)
        return {"window_s": self.window_s, "ttft_p50_s": _percentile(ttft, 50), "ttft_p99_s": _percentile(ttft, 99),
                "tpot_p50_s": _percentile(tpot, 50), "tpot_p99_s": _percentile(tpot, 99),
                "output_tokens_per_s": tokens / self.window_s, "requests_finished": len(tpot)}
