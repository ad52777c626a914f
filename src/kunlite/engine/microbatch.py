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

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from kunlite.engine.step_cost import Batch, StepCostWeights, fit_feature_weights, step_features

MODES = ("balanced", "even")


@dataclass
class OnlineStepCost:
    keep: int = 256  # the latest samples the fit uses
    refit_every: int = 16
    min_samples: int = 12
    samples: deque[tuple[tuple[int, int, int, int], float]] = field(default_factory=deque)  # (features, seconds)
    weights: StepCostWeights | None = None
    _since_fit: int = 0

    def observe(self, batch: Batch, seconds: float) -> None:
        if seconds <= 0 or not batch:
            return
        self.samples.append((step_features(batch), seconds))
        while len(self.samples) > self.keep:
            self.samples.popleft()
        self._since_fit += 1
        if len(self.samples) >= self.min_samples and (self.weights is None or self._since_fit >= self.refit_every):
            x = np.array([f for f, _ in self.samples], dtype=np.float64)  # (n, 4) as feature_matrix's
            self.weights = fit_feature_weights(x, [s for _, s in self.samples])
            self._since_fit = 0

    def share(self, batch: Batch, parts: int) -> float:
        """The cost of one of `parts` microbatches that split `batch`: each pays the per-step
        constant, and a part of the rest."""
        fixed = self.weights.per_step if self.weights is not None else 0.0
        return (self.predict(batch) - fixed) / parts + fixed

    def predict(self, batch: Batch) -> float:
        """Seconds (or, before a fit, a token count) of one step of `batch`."""
        if self.weights is None:
            return float(sum(q for q, _ in batch) + len(batch))
        return self.weights.predict(batch)


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
