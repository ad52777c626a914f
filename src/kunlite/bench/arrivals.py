"""Arrival processes for `bench serve`: each returns the send times of n requests.

Invariant of every process: a non-decreasing float64 array of length n whose first element
is 0.0 (the first request goes out when the benchmark starts), in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def gamma_arrivals(
    n: int, rate: float, burstiness: float, rng: np.random.Generator
) -> np.ndarray:
    """Gaps drawn from Gamma(shape=burstiness, scale=1/(rate*burstiness)).

    The mean gap is 1/rate whatever the burstiness; the gaps' coefficient of variation is
    1/sqrt(burstiness): burstiness 1 is a Poisson process, below 1 is burstier, above 1 is
    more regular. rate=inf sends everything at once.
    """
    if n <= 0:
        return np.zeros(0)
    if not rate > 0:
        raise ValueError("--request-rate must be > 0")
    if not burstiness > 0:
        raise ValueError("--burstiness must be > 0")
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def trace_arrivals(timestamps: Sequence[float], time_scale: float = 1.0) -> np.ndarray:
    """Replay recorded timestamps (in order, one per request) relative to the first, divided
    by time_scale.

    time_scale 2 replays the trace twice as fast; 0.5 half as fast.
    """
    if not time_scale > 0:
        raise ValueError("--trace-time-scale must be > 0")
    ts = np.asarray(timestamps, dtype=np.float64)
    if ts.size == 0:
        return ts
    if np.any(np.diff(ts) < 0):
        raise ValueError("trace timestamps must be in non-decreasing order")
    return (ts - ts[0]) / time_scale
