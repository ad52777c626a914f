"""Online cost model of one engine step, fitted from the engine's own step timings.

    step seconds ~= a * prefill_tokens + b * decode_tokens + c * context_tokens + d

The coefficients are a ridge regression towards a prior, on exponentially forgotten data: the
normal equations A = sum(g^k x x^T), y = sum(g^k x s) are kept, and each prediction solves
(A + lam*I) theta = y + lam*theta0. Before any data arrives theta = theta0 (the prior); after a
few hundred steps the prior is a small pull. Features are scaled to units of similar size
(100 prefill tokens, 10 decode tokens, 1000 context tokens, 1 step) so that one ridge weight
suits them all. Coefficients are kept non-negative: a step never gets cheaper with more work.

On top of the regression, a fast moving average of (measured / predicted) over the latest
steps, the *slowdown*, scales predictions up when steps run slower than the fit says (another
process on the same cores, a GPU clocking down); the regression, which forgets slowly,
catches up later and the slowdown returns to 1. It never scales predictions down.

Pure: plain numbers in, seconds out; nothing here knows about processes or the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from kunlite.engine.messages import StepTiming

_SCALE = np.array([1 / 100, 1 / 10, 1 / 1000, 1.0])  # prefill, decode, context, constant
# Seconds per scaled unit before any data: a small model on one CPU thread, roughly.
DEFAULT_PRIOR = (0.5, 0.05, 0.005, 0.05)


def _features(prefill: float, decode: float, context: float) -> np.ndarray:
    return np.array([prefill, decode, context, 1.0]) * _SCALE


@dataclass
class StepCostModel:
    prior: tuple[float, float, float, float] = DEFAULT_PRIOR
    prior_weight: float = 1.0  # the prior counts as this many (scaled) observations
    forget: float = 0.998  # per observed step: about the last 500 steps matter
    slowdown_alpha: float = 0.1  # weight of the latest step in the slowdown average
    num_observed: int = 0
    slowdown: float = 1.0  # recent measured / predicted step time, averaged
    _a: np.ndarray = field(default_factory=lambda: np.zeros((4, 4)))
    _y: np.ndarray = field(default_factory=lambda: np.zeros(4))
    _theta: np.ndarray | None = None  # cached solution; None after new data

    def observe(self, timings: Iterable[StepTiming]) -> None:
        for t in timings:
            if not (t.seconds >= 0.0) or t.num_prefill_tokens + t.num_decode_tokens <= 0:
                continue
            x = _features(t.num_prefill_tokens, t.num_decode_tokens, t.num_context_tokens)
            ratio = t.seconds / max(float(x @ self.theta), 1e-6)
            self.slowdown += self.slowdown_alpha * (min(ratio, 10.0) - self.slowdown)
            self._a = self.forget * self._a + np.outer(x, x)
            self._y = self.forget * self._y + x * t.seconds
            self.num_observed += 1
            self._theta = None

    @property
    def theta(self) -> np.ndarray:
        """Seconds per scaled unit: (per 100 prefill tokens, per 10 decode tokens,
        per 1000 context tokens, per step)."""
        if self._theta is None:
            prior = np.asarray(self.prior, dtype=float)
            lam = self.prior_weight * np.eye(4)
            theta = np.linalg.solve(self._a + lam, self._y + lam @ prior)
            # Projected onto theta >= 0: refit the free coefficients with the clipped ones at 0.
            for _ in range(4):
                neg = theta < 0
                if not neg.any():
                    break
                keep = ~neg
                theta[neg] = 0.0
                a = (self._a + lam)[np.ix_(keep, keep)]
                theta[keep] = np.linalg.solve(a, (self._y + lam @ prior)[keep])
            self._theta = np.maximum(theta, 0.0)
        return self._theta

    def step_seconds(self, prefill: float = 0, decode: float = 0, context: float = 0) -> float:
        """Predicted duration of one step with that much work; never below 1 microsecond."""
        fit = float(_features(prefill, decode, context) @ self.theta)
        return max(fit * max(self.slowdown, 1.0), 1e-6)
