"""Microbatches of balanced cost for a pipeline instance, and how much its stages idle.

A pipeline of K stages keeps K microbatches in flight; a stage idles whenever the microbatch it
waits for took longer upstream than the one it just finished (a bubble). Splitting work by
counts (half the decodes, half the token budget) balances decodes but not a prompt chunk
against decodes of long contexts. `balanced` microbatching looks ahead at the work the
scheduler could run now (every running sequence's next tokens, the queue's prompts up to the
budget), predicts its cost with the step model (tokens, attention pairs, sequences, a constant:
`engine/step_cost.py`), and cuts microbatches of 1/K of it each.

The model is fitted online from the instance's own steps: each committed microbatch gives its
(new tokens, context) pairs and the slowest stage's compute time. Until enough steps are seen,
the cost is the token count (one unit per token, a sequence's worth per step).

`BubbleMeter` measures the bubble fraction: 1 - (compute time summed over stages) / (stages x
the wall time during which the instance had a step in flight).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kunlite.engine.step_cost import Batch, StepCostWeights, fit_feature_weights, step_features

MODES = ("balanced", "even")


@dataclass
class OnlineStepCost:
    keep: int = 256  # the latest samples the fit uses
    refit_every: int = 64  # a quarter of the samples new: every 16 cost 4x the refits for no better splits
    min_samples: int = 12
    weights: StepCostWeights | None = None
    _since_fit: int = 0
    # The samples, a ring: the i-th oldest of the _count kept is row (_next - _count + i) % keep
    _x: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]  # (keep, 4) step_features
    _y: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]  # (keep,) seconds
    _count: int = 0
    _next: int = 0
    # Flat views of _x and _y: a sample is written with five item stores, not numpy's
    # conversion of a tuple into a row (the ring is written once for each step)
    _xv: memoryview = field(init=False, repr=False)
    _yv: memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self._x is None:
            self._x = np.zeros((self.keep, 4), dtype=np.float64)  # (keep, 4)
            self._y = np.zeros(self.keep, dtype=np.float64)  # (keep,)
        self._xv = memoryview(self._x).cast("B").cast("d")  # (keep * 4,) row-major
        self._yv = memoryview(self._y)  # (keep,)

    def observe(self, batch: Batch, seconds: float, fitted: StepCostWeights | None = None) -> None:
        if batch:
            self.observe_features(step_features(batch), seconds, fitted)

    def observe_features(self, features: tuple[int, int, int, int], seconds: float,
                         fitted: StepCostWeights | None = None) -> None:
        """observe() a batch of these step_features. `fitted`: the weights a refit due now
        gives (the simulator replays steps whose fit it has computed already)."""
        if seconds <= 0:
            return
        i, keep = self._next, self.keep
        xv, j = self._xv, 4 * i
        xv[j], xv[j + 1], xv[j + 2], xv[j + 3] = features
        self._yv[i] = seconds
        self._next = i + 1 if i + 1 < keep else 0
        if self._count < keep:
            self._count += 1
        self._since_fit += 1
        if self._count >= self.min_samples and (self.weights is None or self._since_fit >= self.refit_every):
            if fitted is None:
                if self._count < self.keep:
                    x, y = self._x[:self._count], self._y[:self._count]  # (n, 4), (n,) oldest first
                else:
                    x = np.concatenate((self._x[self._next:], self._x[:self._next]))
                    y = np.concatenate((self._y[self._next:], self._y[:self._next]))
                fitted = fit_feature_weights(x, y)
            self.weights = fitted
            self._since_fit = 0

    def copy(self) -> "OnlineStepCost":
        return OnlineStepCost(self.keep, self.refit_every, self.min_samples, self.weights, self._since_fit,
                              self._x.copy(), self._y.copy(), self._count, self._next)

    def share(self, batch: Batch, parts: int) -> float:
        """The cost of one of `parts` microbatches that split `batch`."""
        return self.split(self.predict(batch), parts)

    def split(self, cost: float, parts: int) -> float:
        """The cost of one of `parts` microbatches that split work of this cost: each pays the
        per-step constant, and a part of the rest."""
        fixed = self.weights.per_step if self.weights is not None else 0.0
        return (cost - fixed) / parts + fixed

    def predict(self, batch: Batch) -> float:
        """Seconds (or, before a fit, a token count) of one step of `batch`."""
        if len(batch) == 1:  # the scheduler costs one sequence at a time: step_features of it
            q, c = batch[0]
            if q >= 1 and c >= 0:
                return self.predict_features(q, q * c + q * (q + 1) // 2, 1)
        t, a, b, _ = step_features(batch)
        return self.predict_features(t, a, b)

    def predict_features(self, t: int, a: int, b: int) -> float:
        """predict() of a batch of t tokens, a attention pairs and b sequences."""
        if self.weights is None:
            return float(t + b)  # a sequence's worth per step
        return self.weights.predict_features(t, a, b)


@dataclass
class BubbleMeter:
    stages: int
    busy: float = 0.0  # compute seconds, summed over stages
    wall: float = 0.0  # seconds with a step in flight
    _since: float | None = None

    def started(self, now: float) -> None:
        if self._since is None:
            self._since = now

    def idle(self, now: float) -> None:
        if self._since is not None:
            self.wall += now - self._since
            self._since = None

    def stage_done(self, seconds: float) -> None:
        self.busy += seconds

    def fraction(self, now: float) -> float:
        wall = self.wall + (now - self._since if self._since is not None else 0.0)
        return max(0.0, 1.0 - self.busy / (self.stages * wall)) if wall > 0 else 0.0
