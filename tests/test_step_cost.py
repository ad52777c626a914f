"""`engine/step_cost.py`: features, the non-negative fit, the report, the layer share."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kunlite.engine.step_cost import (FittedStepCost, StepCost, StepCostWeights, fit_weights,
                                      fit_with_report, nnls, step_features)

TRUE = StepCostWeights(per_token=2e-4, per_attention_pair=4e-8, per_sequence=1e-3, per_step=5e-3)


def random_batches(rng: np.random.Generator, n: int) -> list[list[tuple[int, int]]]:
    """A mix of prefill chunks, decode batches and mixed steps."""
    out = []
    for _ in range(n):
        kind = rng.integers(3)
        decodes = [(1, int(c)) for c in rng.integers(16, 2048, size=rng.integers(1, 33))]
        chunk = [(int(rng.choice([16, 64, 256, 512])), int(rng.integers(0, 1024)))]
        out.append(chunk if kind == 0 else decodes if kind == 1 else decodes + chunk)
    return out


def measured(batches: list[list[tuple[int, int]]], rng: np.random.Generator, noise: float) -> list[float]:
    return [TRUE.predict(b) * float(rng.lognormal(0.0, noise)) for b in batches]


def test_features_by_hand() -> None:
    # A decode at context 10 attends 11 keys; a 4-token chunk at context 0 attends 1+2+3+4.
    assert step_features([(1, 10), (4, 0)]) == (5, 21, 2, 1)
    assert step_features([(3, 5)]) == (3, 3 * 5 + 6, 1, 1)
    with pytest.raises(ValueError):
        step_features([(0, 3)])


def test_fit_recovers_known_weights_from_noisy_steps() -> None:
    rng = np.random.default_rng(0)
    batches = random_batches(rng, 300)
    w = fit_weights(batches, measured(batches, rng, noise=0.03))
    for got, want in zip(w.as_array(), TRUE.as_array()):
        assert got == pytest.approx(want, rel=0.1)


def test_noiseless_report_is_exact_and_held_out() -> None:
    rng = np.random.default_rng(1)
    batches = random_batches(rng, 40)
    w, report = fit_with_report(batches, measured(batches, rng, noise=0.0))
    assert report.held_out and report.num_eval == 10 and report.num_fit == 30
    assert report.median_rel_error < 1e-6 and report.max_rel_error < 1e-6
    assert report.r2 == pytest.approx(1.0)
    assert np.allclose(w.as_array(), TRUE.as_array(), rtol=1e-6)
    assert "held-out on 10" in report.format()


def test_small_sample_report_is_in_sample() -> None:
    batches = [[(1, 10)], [(16, 0)], [(1, 100)] * 4]
    _, report = fit_with_report(batches, [TRUE.predict(b) for b in batches])
    assert not report.held_out and report.num_eval == 3


def test_weights_never_negative_when_a_true_weight_is_zero() -> None:
    # No fixed cost at all: noise alone would push an unconstrained w_0 below zero.
    rng = np.random.default_rng(2)
    batches = random_batches(rng, 100)
    zero = StepCostWeights(2e-4, 4e-8, 1e-3, 0.0)
    seconds = [zero.predict(b) * float(rng.lognormal(0.0, 0.05)) for b in batches]
    w = fit_weights(batches, seconds, relative=False)
    assert (w.as_array() >= 0).all()
    unconstrained = np.linalg.lstsq(np.array([step_features(b) for b in batches], float), seconds, rcond=None)[0]
    assert unconstrained.min() < 0  # the constraint did something here


def test_all_decode_data_still_gives_a_sane_fit() -> None:
    # Every step a decode: T == B, so w_T and w_B cannot be told apart; predictions still can.
    rng = np.random.default_rng(3)
    batches = [[(1, int(c)) for c in rng.integers(64, 1024, size=b)] for b in rng.integers(1, 33, size=60)]
    seconds = measured(batches, rng, noise=0.02)
    w, report = fit_with_report(batches, seconds)
    assert np.isfinite(w.as_array()).all() and (w.as_array() >= 0).all()
    assert report.median_rel_error < 0.05
    fresh = [[(1, 500)] * 16, [(1, 80)], [(1, 1000)] * 32]
    for b in fresh:
        assert w.predict(b) == pytest.approx(TRUE.predict(b), rel=0.05)


def test_one_sample_and_constant_seconds() -> None:
    w = fit_weights([[(1, 10)]], [0.01])
    assert w.predict([(1, 10)]) == pytest.approx(0.01)
    batches = [[(1, c)] for c in range(10, 90, 10)]
    _, report = fit_with_report(batches, [0.02] * len(batches))
    assert report.median_rel_error < 1e-6


def test_fit_rejects_bad_samples() -> None:
    with pytest.raises(ValueError):
        fit_weights([[(1, 1)]], [0.0])
    with pytest.raises(ValueError):
        fit_weights([[(1, 1)]], [0.1, 0.2])
    with pytest.raises(ValueError):
        StepCostWeights(-1e-9, 0, 0, 0)


@settings(max_examples=200, deadline=None)
@given(a=arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 5)),
                elements=st.floats(-1e3, 1e3, allow_nan=False)),
       data=st.data())
def test_nnls_meets_the_kkt_conditions(a: np.ndarray, data: st.DataObject) -> None:
    b = data.draw(arrays(np.float64, a.shape[0], elements=st.floats(-1e3, 1e3, allow_nan=False)))
    x = nnls(a, b)
    assert (x >= 0).all() and np.isfinite(x).all()
    # Optimality: no feasible direction lowers the residual. The gradient g = a^T (a x - b)
    # is >= 0 everywhere and ~0 where x > 0 (in column-normalised units).
    norms = np.linalg.norm(a, axis=0)
    live = norms > 1e-9
    g = (a[:, live] / norms[live]).T @ (a @ x - b)
    tol = 1e-6 * max(1.0, float(np.linalg.norm(b)))
    assert (g >= -tol).all()
    assert (np.abs(g[x[live] > 1e-12]) <= tol).all()


def test_nnls_equals_the_best_of_every_active_set() -> None:
    # Brute force: the optimum is the unconstrained least squares on some subset of columns
    # with every entry >= 0; try them all. Some of these cases need the backtracking step.
    rng = np.random.default_rng(4)
    for _ in range(300):
        m, n = int(rng.integers(2, 10)), int(rng.integers(2, 5))
        a, b = rng.normal(size=(m, n)) * rng.choice([1e-3, 1.0, 1e3], size=n), rng.normal(size=m)
        best = float(b @ b)
        for mask in range(1, 2 ** n):
            cols = [j for j in range(n) if mask >> j & 1]
            z = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
            if (z >= 0).all():
                r = a[:, cols] @ z - b
                best = min(best, float(r @ r))
        r = a @ nnls(a, b) - b
        assert float(r @ r) == pytest.approx(best, rel=1e-7, abs=1e-12)


def _nnls_on_arrays(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Lawson-Hanson as nnls() does it, every vector a numpy array (nnls keeps its n-vectors
    in Python floats): the reference its floats must equal, since the pipelines' online fits,
    and so the simulator's tables, depend on them to the last bit."""
    m, n = a.shape
    norms = np.linalg.norm(a, axis=0)
    live = norms > 0
    scale = np.where(live, norms, 1.0)
    s = a / scale
    tol = 10 * np.finfo(np.float64).eps * max(m, n) * max(float(np.linalg.norm(b)), 1.0)
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(3 * n + 10):
        w = s.T @ (b - s @ x)
        free = ~passive & live
        if not free.any() or w[free].max() <= tol:
            break
        passive[np.argmax(np.where(free, w, -np.inf))] = True
        for _ in range(n):
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(s[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            x = x + np.min(x[neg] / (x[neg] - z[neg])) * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return np.maximum(x, 0.0) / scale


def test_nnls_gives_the_reference_floats() -> None:
    rng = np.random.default_rng(1)
    for trial in range(400):
        m = int(rng.integers(4, 300))
        if trial % 3 == 0:  # decode steps only (T == B: collinear), as a pipeline's window sees
            b_, c = rng.integers(1, 8, m), rng.integers(0, 5000, m)
            x = np.stack([b_, c + b_, b_, np.ones(m)], 1).astype(float)
        elif trial % 3 == 1:
            q, c, b_ = rng.integers(1, 600, m), rng.integers(0, 3000, m), rng.integers(1, 20, m)
            x = np.stack([q + b_, q * c + b_ * 100, b_, np.ones(m)], 1).astype(float)
        else:
            x = rng.standard_normal((m, 4))
        w = rng.random(4) * np.array([1e-4, 1e-8, 1e-4, 1e-2]) * (rng.random(4) > 0.3)
        y = np.abs(x @ w) * (1 + 0.05 * rng.standard_normal(m)) + 1e-6
        a, b = x / y[:, None], np.ones(m)
        assert nnls(a, b).tolist() == _nnls_on_arrays(a, b).tolist()


def test_fitted_cost_charges_a_stage_its_share_of_layers() -> None:
    cost: StepCost = FittedStepCost(TRUE, num_layers=30)
    batch = [(1, 100)] * 8 + [(128, 0)]
    assert cost.step_seconds(batch, (0, 30)) == pytest.approx(TRUE.predict(batch))
    variable = TRUE.predict(batch) - TRUE.per_step
    assert cost.step_seconds(batch, (10, 20)) == pytest.approx(variable / 3 + TRUE.per_step)
    halves = cost.step_seconds(batch, (0, 15)) + cost.step_seconds(batch, (15, 30))
    assert halves == pytest.approx(TRUE.predict(batch) + TRUE.per_step)  # each stage pays w_0
    with pytest.raises(ValueError):
        cost.step_seconds(batch, (20, 31))
