"""Closed-form theory: Marchenko-Pastur, LeCun's outlier, quadratic-model GD facts."""

import math

import numpy as np
import pytest
from scipy import integrate, stats

from hessspec.analysis import theory


def _correlation_eigs(rng, num_inputs, num_samples, mean, variance):
    x = mean + math.sqrt(variance) * rng.standard_normal((num_samples, num_inputs))
    return np.linalg.eigvalsh(x.T @ x / num_samples), x


# ------------------------------------------------------------------ Marchenko-Pastur


@pytest.mark.parametrize("ratio", [0.25, 1.0, 3.0])
def test_mp_edges_and_zero_mass(ratio):
    mp = theory.marchenko_pastur(ratio, variance=2.0)
    assert mp.lower_edge == pytest.approx(2.0 * (1 - math.sqrt(ratio)) ** 2, rel=1e-15, abs=1e-15)
    assert mp.upper_edge == pytest.approx(2.0 * (1 + math.sqrt(ratio)) ** 2, rel=1e-15)
    assert mp.zero_mass == pytest.approx(max(0.0, 1 - 1 / ratio), abs=1e-15)


@pytest.mark.parametrize("ratio", [0.3, 1.0, 2.5])
def test_mp_density_integrates_and_cdf_matches_quadrature(ratio):
    mp = theory.marchenko_pastur(ratio, variance=1.7)
    a, b = mp.lower_edge, mp.upper_edge
    total, _ = integrate.quad(mp.density, a, b, limit=200)
    np.testing.assert_allclose(total, 1 - mp.zero_mass, rtol=1e-9)
    xs = np.linspace(a, b, 9)[1:-1]
    quad = np.array([integrate.quad(mp.density, a, x, limit=200)[0] for x in xs]) + mp.zero_mass
    np.testing.assert_allclose(mp.cdf(xs), quad, atol=1e-10)
    # Outside the support: no density; cdf 0 below 0, the atom on [0, a], 1 from b on.
    assert np.all(mp.density(np.array([-1.0, 0.5 * a, b, 2 * b])) == 0.0)
    np.testing.assert_array_equal(mp.cdf(np.array([-1e-3, 2 * b, b])), [0.0, 1.0, 1.0])
    assert mp.cdf(0.0) == pytest.approx(mp.zero_mass, abs=1e-15)
    grid = np.linspace(-1.0, 1.2 * b, 2001)
    assert np.all(np.diff(mp.cdf(grid)) >= 0)
    np.testing.assert_allclose(mp.bulk_cdf(np.array([0.0, b])), [0.0, 1.0], atol=1e-15)


@pytest.mark.parametrize(("num_inputs", "num_samples"), [(200, 500), (200, 80)])
def test_mp_matches_sampled_correlation_spectrum(rng, num_inputs, num_samples):
    variance = 2.0
    eigs, _ = _correlation_eigs(rng, num_inputs, num_samples, 0.0, variance)
    mp = theory.marchenko_pastur(num_inputs / num_samples, variance)
    null = eigs <= 1e-9 * eigs.max()
    assert null.mean() == pytest.approx(mp.zero_mass, abs=1e-12)
    assert stats.kstest(eigs[~null], mp.bulk_cdf).statistic < 0.05
    if mp.zero_mass == 0:
        assert stats.kstest(eigs, mp.cdf).statistic < 0.05
    assert eigs.max() < 1.05 * mp.upper_edge


@pytest.mark.parametrize(("ratio", "variance"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, -2.0)])
def test_mp_rejects_non_positive(ratio, variance):
    with pytest.raises(ValueError, match="> 0"):
        theory.marchenko_pastur(ratio, variance)


# ------------------------------------------------------------------ LeCun's outlier


def test_lecun_outlier_value_and_errors():
    assert theory.lecun_outlier(100, 0.5, 2.0) == 100 * 0.25 + 2.0
    assert theory.lecun_outlier(100, -0.5, 2.0) == 100 * 0.25 + 2.0
    with pytest.raises(ValueError):
        theory.lecun_outlier(0, 1.0, 1.0)
    with pytest.raises(ValueError):
        theory.lecun_outlier(10, 1.0, -1.0)


def test_prediction_fields():
    pred = theory.input_correlation_spectrum_prediction(200, 100, 1.0, 2.0)
    assert pred.ratio == 2.0
    assert pred.outlier == 202.0
    assert pred.outlier_finite_ratio == pytest.approx(202.0 * (1 + 2.0 * 2.0 / 200.0))
    assert pred.outlier_separated
    assert pred.zero_mass == pytest.approx(0.5)
    assert (pred.lower_edge, pred.upper_edge) == pytest.approx(
        (2.0 * (1 - math.sqrt(2)) ** 2, 2.0 * (1 + math.sqrt(2)) ** 2)
    )
    centred = theory.input_correlation_spectrum_prediction(200, 100, 0.0, 2.0)
    assert not centred.outlier_separated and math.isnan(centred.outlier_finite_ratio)
    with pytest.raises(ValueError):
        theory.input_correlation_spectrum_prediction(200, 0, 1.0, 2.0)
    with pytest.raises(ValueError):
        theory.input_correlation_spectrum_prediction(200, 100, 1.0, 0.0)


def test_outlier_and_bulk_match_sampled_biased_inputs(rng):
    n, p, m, v = 200, 800, 1.0, 2.0
    eigs, x = _correlation_eigs(rng, n, p, m, v)
    pred = theory.input_correlation_spectrum_prediction(n, p, m, v)
    assert eigs[-1] == pytest.approx(pred.outlier, rel=0.03)
    assert eigs[-1] == pytest.approx(pred.outlier_finite_ratio, rel=0.02)
    assert eigs[-2] < 1.05 * pred.upper_edge
    mp = theory.marchenko_pastur(n / p, v)
    assert stats.kstest(eigs[:-1], mp.cdf).statistic < 0.05
    # Centering removes the outlier: everything stays in the bulk.
    xc = x - x.mean(axis=0)
    assert np.linalg.eigvalsh(xc.T @ xc / p).max() < 1.05 * pred.upper_edge


# ------------------------------------------------------------------ GD on a quadratic


def _gd_error_ratio(eigenvalues, lr, steps, direction):
    """||e_t|| / ||e_0|| of GD on 0.5 e^T diag(lam) e from e_0 = direction (simulated)."""
    e = direction.astype(np.float64).copy()
    for _ in range(steps):
        e = e - lr * eigenvalues * e
    return np.linalg.norm(e) / np.linalg.norm(direction)


def test_stable_learning_rate_and_time_constant():
    lam = np.array([0.1, 1.0, 4.0])
    lr = theory.stable_learning_rate(4.0)
    assert lr == 0.5
    e0 = np.ones(3)
    assert _gd_error_ratio(lam, 0.99 * lr, 400, e0) < 1e-3
    assert _gd_error_ratio(lam, 1.01 * lr, 400, e0) > 1e3
    assert theory.slowest_time_constant(0.5, 0.1) == pytest.approx(20.0)
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError):
            theory.stable_learning_rate(bad)
        with pytest.raises(ValueError):
            theory.slowest_time_constant(bad, 1.0)
        with pytest.raises(ValueError):
            theory.slowest_time_constant(1.0, bad)


@pytest.mark.parametrize("lr", [0.05, 0.3, 0.45])
def test_gd_steps_match_simulation(lr):
    lam = np.array([0.0, 0.2, 1.0, 4.0])
    tol = 1e-3
    conv = theory.gd_steps_to_tolerance(lam, lr, tol)
    factors = np.abs(1 - lr * lam[1:])
    assert conv.rate == pytest.approx(factors.max(), rel=1e-15)
    assert conv.num_null == 1
    assert conv.limiting_eigenvalue == lam[1:][np.argmax(factors)]
    worst = (lam == conv.limiting_eigenvalue).astype(float)
    assert _gd_error_ratio(lam, lr, conv.steps, worst) <= tol
    assert _gd_error_ratio(lam, lr, conv.steps - 1, worst) > tol
    # No initial error in the non-null space does worse than the bound.
    others = np.random.default_rng(1).standard_normal(4) * (lam > 0)
    assert _gd_error_ratio(lam, lr, conv.steps, others) <= tol


def test_gd_steps_edge_cases_and_errors():
    assert theory.gd_steps_to_tolerance([2.0, 2.0], 0.5, 1e-6).steps == 1  # rate 0
    assert theory.gd_steps_to_tolerance([1.0, 4.0], 0.5, 1e-3).steps == math.inf  # lr = 2/max
    with pytest.raises(ValueError, match="negative eigenvalue"):
        theory.gd_steps_to_tolerance([-1.0, 2.0], 0.1, 1e-3)
    with pytest.raises(ValueError, match="positive maximum"):
        theory.gd_steps_to_tolerance([0.0, 0.0], 0.1, 1e-3)
    with pytest.raises(ValueError):
        theory.gd_steps_to_tolerance([], 0.1, 1e-3)
    with pytest.raises(ValueError):
        theory.gd_steps_to_tolerance([1.0], 0.0, 1e-3)
    for tol in (0.0, 1.0, 2.0):
        with pytest.raises(ValueError, match="tol"):
            theory.gd_steps_to_tolerance([1.0], 0.1, tol)


def test_centering_speeds_up_gd(rng):
    """LeCun et al.: with biased inputs the outlier caps lr and the bulk crawls."""
    n, p, m, v = 100, 400, 1.0, 1.0
    biased, x = _correlation_eigs(rng, n, p, m, v)
    xc = x - x.mean(axis=0)
    centred = np.linalg.eigvalsh(xc.T @ xc / p)
    steps = {}
    for name, lam in (("biased", biased), ("centred", centred)):
        lr = theory.stable_learning_rate(lam.max()) / 2  # lr = 1 / lambda_max
        steps[name] = theory.gd_steps_to_tolerance(lam, lr, 1e-3).steps
    pred = theory.input_correlation_spectrum_prediction(n, p, m, v)
    # The slowdown is about outlier / upper edge of the bulk.
    assert steps["biased"] / steps["centred"] > 0.5 * pred.outlier / pred.upper_edge
