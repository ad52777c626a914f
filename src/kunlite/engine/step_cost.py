"""The cost of one engine step, from the shape of its batch: a fitted linear model.

A step runs a batch of sequences; sequence i brings q_i new tokens (its query length: 1 for a
decode, a chunk for a prefill) on top of c_i tokens already in its KV cache (its context
before the step). The step's features:

    T = sum q_i                        tokens: the linear layers and the FFN, per token
    A = sum q_i * (c_i + (q_i + 1)/2)  attention pairs: token j of the chunk (0-based) attends
                                       the c_i cached keys and the j + 1 keys of the chunk up
                                       to itself, and sum_j (c_i + j + 1) = q_i (c_i + (q_i+1)/2)
    B = number of sequences            per-sequence work: sampling, the LM head, bookkeeping
    1                                  the fixed cost of a step

    step_seconds = w_T * T + w_A * A + w_B * B + w_0,   every w >= 0

The weights are fitted by non-negative least squares (Lawson-Hanson, numpy only) from
measured (batch, seconds) samples, by default on relative errors (each row divided by its
measured time) so that a 10 ms decode step counts as much as a 1 s prefill.

`StepCost` is the interface the simulator costs a pipeline stage with; `FittedStepCost` is this
model behind it, `kunlite.sim.hardware.AnalyticStepCost` the analytic one. Pure: plain numbers
in, seconds out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

Batch = Sequence[tuple[int, int]]  # (query_len q_i >= 1, context_len c_i >= 0) per sequence
FEATURES = ("tokens", "attention_pairs", "sequences", "constant")


class StepCost(Protocol):
    def step_seconds(self, batch: Batch, layers: tuple[int, int]) -> float:
        """Seconds for a device holding decoder layers [l0, l1) to run one step of the batch
        (its share of the step when the model is split into pipeline stages). The stage with
        l0 == 0 also embeds the tokens; the one with l1 == num_layers applies the LM head."""
        ...


def step_features(batch: Batch) -> tuple[int, int, int, int]:
    """(T, A, B, 1) of a batch, as integers: q (q + 1) is even, so A is whole."""
    t = a = 0
    for q, c in batch:
        if q < 1 or c < 0:
            raise ValueError(f"a sequence needs q >= 1 and c >= 0, got (q={q}, c={c})")
        t += q
        a += q * c + q * (q + 1) // 2
    return t, a, len(batch), 1


def feature_matrix(batches: Sequence[Batch]) -> np.ndarray:
    """(n, 4) float64 features of n batches, columns as FEATURES."""
    return np.array([step_features(b) for b in batches], dtype=np.float64).reshape(-1, len(FEATURES))


@dataclass(frozen=True)
class StepCostWeights:
    """Seconds per token, per attention pair, per sequence and per step; all >= 0."""

    per_token: float
    per_attention_pair: float
    per_sequence: float
    per_step: float

    def __post_init__(self) -> None:
        if not (self.per_token >= 0.0 and self.per_attention_pair >= 0.0 and self.per_sequence >= 0.0
                and self.per_step >= 0.0):  # also rejects NaN
            raise ValueError(f"step cost weights must be >= 0: {self}")

    def as_array(self) -> np.ndarray:
        return np.array([self.per_token, self.per_attention_pair, self.per_sequence, self.per_step])

    def predict(self, batch: Batch) -> float:
        """Seconds for the whole model to run one step of the batch."""
        t, a, b, _ = step_features(batch)
        return self.predict_features(t, a, b)

    def predict_features(self, t: int, a: int, b: int) -> float:
        """predict() of a batch of t tokens, a attention pairs and b sequences."""
        return self.per_token * t + self.per_attention_pair * a + self.per_sequence * b + self.per_step * 1

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepCostWeights":
        return cls(**{k: float(d[k]) for k in ("per_token", "per_attention_pair", "per_sequence", "per_step")})


@dataclass(frozen=True)
class FittedStepCost:
    """`StepCost` from weights measured on the whole model of num_layers layers.

    A stage holding layers [l0, l1) costs share * (w_T T + w_A A + w_B B) + w_0 with share =
    (l1 - l0) / num_layers. This is an approximation: the embedding and the LM head (inside
    w_T and w_B) are spread over the layers instead of charged to the first and last stage,
    and every stage pays the whole fixed cost w_0 of a step (scheduling, launches).
    """

    weights: StepCostWeights
    num_layers: int

    def step_seconds(self, batch: Batch, layers: tuple[int, int]) -> float:
        l0, l1 = layers
        if not 0 <= l0 < l1 <= self.num_layers:
            raise ValueError(f"layer range {layers} is not inside [0, {self.num_layers})")
        t, a, b, _ = step_features(batch)
        return self._seconds(t, a, b, layers)

    def decode_steps_seconds(self, num_seqs: int, context_sum: int, steps: int,
                             layers: tuple[int, int]) -> np.ndarray:
        """(steps,) step_seconds of num_seqs decodes (q = 1) whose contexts sum to context_sum
        in the first step and grow by one each a step, without the batches (the simulator's
        fast-forward); the same floats."""
        n = num_seqs
        a = context_sum + n * np.arange(steps, dtype=np.int64) + n  # (steps,) attention pairs
        return self._seconds(n, a, n, layers)  # type: ignore[arg-type]

    def decode_step_seconds(self, num_seqs: int, context_sum: int, layers: tuple[int, int]) -> float:
        """step_seconds of num_seqs decodes (q = 1) whose contexts sum to context_sum, without
        the batch; the same float."""
        return self._seconds(num_seqs, context_sum + num_seqs, num_seqs, layers)

    def decode_seconds_at(self, num_seqs: int, layers: tuple[int, int]) -> Any:
        """decode_step_seconds(num_seqs, context_sum, layers) as a function of context_sum."""
        return lambda context_sum: self._seconds(num_seqs, context_sum + num_seqs, num_seqs, layers)

    def _seconds(self, t: int, a: int, b: int, layers: tuple[int, int]) -> float:
        l0, l1 = layers
        w = self.weights
        share = (l1 - l0) / self.num_layers
        return share * (w.per_token * t + w.per_attention_pair * a + w.per_sequence * b) + w.per_step


# ---------------------------------------------------------------------------- fitting


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin ||a x - b||_2 subject to x >= 0 (Lawson and Hanson's active-set method).

    Columns are scaled to unit norm first (the features span many orders of magnitude); an
    all-zero column gets weight 0. Returns x >= 0 exactly (no negative entry ever).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    m, n = a.shape
    norms = np.sqrt(np.add.reduce(a * a, axis=0))  # (n,) np.linalg.norm(a, axis=0), its operations
    positive = norms > 0  # (n,)
    live = positive.tolist()
    scale = np.where(positive, norms, 1.0)
    s = a / scale  # (m, n) unit-norm columns (zero columns stay zero)
    tol = 10 * _EPS * max(m, n) * max(math.sqrt(float(np.dot(b, b))), 1.0)  # as with np.linalg.norm(b)
    rhs = b[:, None]  # (m, 1)
    # The n-vectors are Python floats (the same IEEE operations as numpy's, elementwise);
    # the (m, n) products and the least squares stay numpy's.
    x = [0.0] * n
    passive = [False] * n  # invariant: x[j] == 0 where not passive
    for _ in range(max_iter or 3 * n + 10):
        w = (s.T @ (b - s @ np.array(x))).tolist()  # negative gradient of the half squared residual
        free = [j for j in range(n) if not passive[j] and live[j]]
        if not free or max(w[j] for j in free) <= tol:
            break
        passive[max(free, key=w.__getitem__)] = True  # the first of the largest, as argmax
        for _ in range(n):  # each pass that does not finish drops at least one passive entry
            cols = [j for j in range(n) if passive[j]]
            z = [0.0] * n
            for j, v in zip(cols, _lstsq(s[:, cols], rhs)):
                z[j] = v
            if all(z[j] > 0 for j in cols):
                x = z
                break
            # Step from x towards z until the first passive entry reaches 0; drop those.
            steps = [x[j] / (x[j] - z[j]) if x[j] != z[j] else math.nan for j in cols if z[j] <= 0]  # 0/0: numpy's nan
            alpha = math.nan if any(v != v for v in steps) else min(steps)  # np.min's nan
            x = [xj + alpha * (zj - xj) for xj, zj in zip(x, z)]
            passive = [p and xj > tol for p, xj in zip(passive, x)]
            x = [xj if p else 0.0 for p, xj in zip(passive, x)]
    return np.maximum(np.array(x), 0.0) / scale


_EPS = float(np.finfo(np.float64).eps)


def _lstsq(a: np.ndarray, b: np.ndarray) -> list[float]:
    """np.linalg.lstsq(a, b[:, 0], rcond=None)[0] of a float64 (m, k) a and (m, 1) b: the
    same LAPACK call (gelsd) on the same arrays, without the wrapper's checks and copies
    (three of them in a refit of a pipeline's cost fit, thousands in a simulated hour)."""
    if _umath_lstsq is None:
        return np.linalg.lstsq(a, b[:, 0], rcond=None)[0].tolist()
    m, k = a.shape
    with np.errstate(call=_lstsq_failed, invalid="call", over="ignore", divide="ignore", under="ignore"):
        x = _umath_lstsq(a, b, _EPS * max(m, k), signature="ddd->ddid")[0]  # (k, 1)
    return x[:, 0].tolist()


def _lstsq_failed(err: str, flag: int) -> None:
    raise np.linalg.LinAlgError("SVD did not converge in Linear Least Squares")


try:  # numpy's own kernel behind np.linalg.lstsq (numpy 1.x and 2.x)
    from numpy.linalg._umath_linalg import lstsq as _umath_lstsq  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover
    _umath_lstsq = None


def fit_weights(batches: Sequence[Batch], seconds: Sequence[float], *, relative: bool = True,
                sample_weights: Sequence[float] | None = None) -> StepCostWeights:
    """Non-negative least-squares weights from measured steps.

    relative=True minimises sum ((pred - s) / s)^2, the relative errors; False the absolute
    ones; each term times its sample weight if given. With collinear features (every step a
    decode: T == B) the split between the collinear weights is arbitrary but the predictions
    on such batches stay right.
    """
    return fit_feature_weights(feature_matrix(batches), seconds, relative=relative, sample_weights=sample_weights)


def fit_feature_weights(x: np.ndarray, seconds: Sequence[float], *, relative: bool = True,
                        sample_weights: Sequence[float] | None = None) -> StepCostWeights:
    """fit_weights from the (n, 4) feature matrix of the batches (FEATURES' columns)."""
    y = np.asarray(seconds, dtype=np.float64)
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need as many seconds as batches, and at least one: {len(x)} vs {len(y)}")
    if not (y > 0).all():
        raise ValueError("every measured step must take > 0 seconds")
    row = 1.0 / y if relative else np.ones_like(y)
    if sample_weights is not None:
        row = row * np.sqrt(np.asarray(sample_weights, dtype=np.float64))  # (n,) squared in the loss
    w = nnls(x * row[:, None], y * row)
    return StepCostWeights(*w.tolist())


@dataclass(frozen=True)
class FitReport:
    """How well weights predict measured steps. Relative errors are |pred - s| / s."""

    num_fit: int  # samples the evaluated weights were fitted on
    num_eval: int  # samples evaluated
    held_out: bool  # whether the evaluated samples were left out of that fit
    r2: float  # on seconds; 0.0 when the measured seconds do not vary
    median_rel_error: float
    p90_rel_error: float
    max_rel_error: float
    max_abs_error_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        where = "held-out" if self.held_out else "in-sample"
        return (f"fit on {self.num_fit} steps, {where} on {self.num_eval}: R^2 {self.r2:.4f}, relative error "
                f"median {self.median_rel_error:.1%} P90 {self.p90_rel_error:.1%} max {self.max_rel_error:.1%}, "
                f"max error {self.max_abs_error_s * 1000:.2f} ms")


def evaluate(weights: StepCostWeights, batches: Sequence[Batch], seconds: Sequence[float], *,
             num_fit: int, held_out: bool) -> FitReport:
    y = np.asarray(seconds, dtype=np.float64)
    pred = feature_matrix(batches) @ weights.as_array()
    err = pred - y
    ss_res, ss_tot = float(err @ err), float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 if ss_res == 0 else (1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0)
    rel = np.abs(err) / y
    return FitReport(num_fit=num_fit, num_eval=len(y), held_out=held_out, r2=r2,
                     median_rel_error=float(np.median(rel)), p90_rel_error=float(np.percentile(rel, 90)),
                     max_rel_error=float(rel.max()), max_abs_error_s=float(np.abs(err).max()))


def fit_with_report(batches: Sequence[Batch], seconds: Sequence[float], *, holdout_every: int = 4,
                    relative: bool = True, sample_weights: Sequence[float] | None = None,
                    ) -> tuple[StepCostWeights, FitReport]:
    """Weights fitted on every sample, and the report of a fit that left every
    `holdout_every`-th sample out, evaluated on those (in-sample below 2 * holdout_every
    samples, where a hold-out would leave too little to fit)."""
    n = len(batches)
    weights = fit_weights(batches, seconds, relative=relative, sample_weights=sample_weights)
    if n < 2 * holdout_every:
        return weights, evaluate(weights, batches, seconds, num_fit=n, held_out=False)
    test = np.zeros(n, dtype=bool)
    test[holdout_every - 1 :: holdout_every] = True
    train_i, test_i = np.flatnonzero(~test).tolist(), np.flatnonzero(test).tolist()
    w_train = fit_weights([batches[i] for i in train_i], [seconds[i] for i in train_i], relative=relative,
                          sample_weights=None if sample_weights is None else [sample_weights[i] for i in train_i])
    report = evaluate(w_train, [batches[i] for i in test_i], [seconds[i] for i in test_i],
                      num_fit=len(train_i), held_out=True)
    return weights, report
