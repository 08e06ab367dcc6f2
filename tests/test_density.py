"""Stochastic Lanczos quadrature against exact eigenvalue distributions."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from reference import counting_operator, dense_op, matrix_with_spectrum
from scipy.stats import wasserstein_distance

import hessspec as hs
from hessspec.linalg.density import ghorbani_sigma

N = 300
PROBES, STEPS = 10, 80  # one (probes, steps, dim) shape: one compilation of the SLQ program


@pytest.fixture(scope="module")
def outlier_matrix():
    rng = np.random.default_rng(0)
    spec = np.concatenate([[40.0, 25.0, 15.0, 10.0, 6.0], rng.normal(0.0, 0.5, N - 5)])
    a, ev, _ = matrix_with_spectrum(spec)
    return a, ev


def test_slq_matches_exact_spectrum(outlier_matrix):
    a, ev = outlier_matrix
    sd = hs.spectral_density(dense_op(a), num_probes=PROBES, num_steps=STEPS)
    assert sd.nodes.shape == sd.weights.shape == (PROBES, STEPS)
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(sd.weights >= 0) and np.all(sd.num_steps_done == STEPS)
    points, masses = sd.quadrature()
    spectral_range = ev[-1] - ev[0]
    w1 = wasserstein_distance(points, ev, u_weights=masses)
    assert w1 <= 0.01 * spectral_range, w1 / spectral_range
    # the extreme nodes converge to the extreme eigenvalues
    np.testing.assert_allclose([sd.lambda_min, sd.lambda_max], [ev[0], ev[-1]], rtol=1e-8)

    sigma = sd.default_sigma
    assert sigma == pytest.approx(np.sqrt(1e-5 * (sd.lambda_max - sd.lambda_min)))
    assert ghorbani_sigma(0.0, 0.5) == pytest.approx(np.sqrt(1e-5))  # floor max(1, range)
    grid = np.linspace(sd.lambda_min - 10 * sigma, sd.lambda_max + 10 * sigma, 40001)
    dens = sd.density(grid)
    assert dens.shape == grid.shape and np.all(dens >= 0)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-6)
    wide_grid = np.linspace(sd.lambda_min - 5.0, sd.lambda_max + 5.0, 4001)
    wide = sd.density(wide_grid, sigma=0.5)
    assert np.trapezoid(wide, wide_grid) == pytest.approx(1.0, abs=1e-6)
    # the mean of the density is the SLQ estimate of tr(A) / n
    assert np.trapezoid(grid * dens, grid) == pytest.approx(np.sum(points * masses), rel=1e-6)


def test_breakdown_gives_zero_weight_padding():
    """Three distinct eigenvalues: every probe's Krylov space is 3-dimensional, so the
    quadrature is exact with 3 nodes and the other slots get weight 0 (not garbage)."""
    a, _, q = matrix_with_spectrum(np.repeat([-2.0, 1.0, 3.0], [150, 100, 50]), seed=1)
    sd = hs.spectral_density(dense_op(a), num_probes=PROBES, num_steps=STEPS)
    np.testing.assert_array_equal(sd.num_steps_done, 3)
    np.testing.assert_allclose(sd.nodes[:, :3], np.tile([-2.0, 1.0, 3.0], (PROBES, 1)), atol=1e-12)
    np.testing.assert_array_equal(sd.weights[:, 3:], 0.0)
    assert np.all(sd.nodes[:, 3:] == sd.nodes[:, 2:3])  # padding repeats the largest node
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(np.isfinite(sd.nodes)) and (sd.lambda_min, sd.lambda_max) == pytest.approx(
        (-2.0, 3.0)
    )
    # mass on each eigenvalue ~ its multiplicity / n (Rademacher probes, 10 of them)
    np.testing.assert_allclose(sd.weights[:, :3].mean(axis=0), [0.5, 1 / 3, 1 / 6], atol=0.03)


def test_full_krylov_space_is_exact():
    n = 12
    a, ev, q = matrix_with_spectrum(np.linspace(-1.0, 2.0, n), seed=2)
    sd = hs.spectral_density(lambda v: jnp.asarray(a) @ v, num_probes=2, num_steps=n, dim=n)
    np.testing.assert_allclose(sd.nodes, np.tile(ev, (2, 1)), atol=1e-12)
    # each probe's weights are (z . q_i)^2 / n for a vector z of +-1 entries: some choice of
    # signs of sqrt(n w_i) rebuilds such a z exactly
    signs = 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    for w in sd.weights:
        candidates = (signs * np.sqrt(n * w)) @ q.T
        assert np.min(np.max(np.abs(np.abs(candidates) - 1.0), axis=1)) < 1e-10


def test_gaussian_quadrature_against_dense_eigh():
    rng = np.random.default_rng(3)
    alphas, betas = rng.normal(size=(2, 6)), np.abs(rng.normal(size=(2, 5)))
    nodes, weights = hs.gaussian_quadrature(alphas, betas)
    for p in range(2):
        t = np.diag(alphas[p]) + np.diag(betas[p], 1) + np.diag(betas[p], -1)
        tau, u = np.linalg.eigh(t)
        np.testing.assert_allclose(nodes[p], tau, atol=1e-12)
        np.testing.assert_allclose(weights[p], u[0] ** 2, atol=1e-12)
    # breakdown after 4 and 1 steps: only the leading block counts
    nodes, weights = hs.gaussian_quadrature(alphas, betas, num_steps_done=[4, 1])
    tau = scipy.linalg.eigvalsh_tridiagonal(alphas[0, :4], betas[0, :3])
    np.testing.assert_allclose(nodes[0, :4], tau, atol=1e-12)
    np.testing.assert_array_equal(nodes[0, 4:], tau[-1])
    np.testing.assert_array_equal(weights[:, 4:], 0.0)
    assert nodes[1, 0] == alphas[1, 0] and weights[1, 0] == 1.0
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="shapes"):
        hs.gaussian_quadrature(alphas, betas[:, :3])


def test_no_recompilation_for_keys_probes_and_steps(outlier_matrix):
    _, op, traces = counting_operator(outlier_matrix[0])
    first = hs.spectral_density(op, num_probes=PROBES, num_steps=STEPS)
    count = len(traces)
    second = hs.spectral_density(op, num_probes=PROBES, num_steps=STEPS, key=jax.random.key(1))
    assert len(traces) == count, "a second call on the same operator recompiled"
    assert not np.allclose(first.nodes, second.nodes)  # a different key, different probes
    fewer = hs.spectral_density(op, num_probes=PROBES // 2, num_steps=STEPS // 2)
    assert len(traces) == count, "fewer probes or steps recompiled"
    assert fewer.nodes.shape == (PROBES // 2, STEPS // 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_steps": N + 1}, "num_steps=301 exceeds the operator's dim=300"),
        ({"num_probes": 0}, "num_probes=0 must be at least 1"),
        ({"num_steps": 0}, "num_steps=0 must be at least 1"),
    ],
)
def test_spectral_density_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hs.spectral_density(dense_op(np.eye(N)), **kwargs)


def test_density_errors_and_nan_matvec(outlier_matrix):
    a = np.array(outlier_matrix[0])
    sd = hs.gaussian_quadrature(np.ones((1, 1)), np.ones((1, 0)))
    assert sd[1][0, 0] == 1.0
    a[0, 5] = np.nan
    with pytest.raises(FloatingPointError, match="Hessian-vector product .* not finite"):
        hs.spectral_density(dense_op(a), num_probes=PROBES, num_steps=STEPS)
    dens = hs.SpectralDensity(
        nodes=np.zeros((1, 2)), weights=np.array([[1.0, 0.0]]), num_steps_done=np.ones(1), dim=2
    )
    with pytest.raises(ValueError, match="sigma"):
        dens.density(np.zeros(3), sigma=0.0)
    with pytest.raises(ValueError, match="1-D"):
        dens.density(np.zeros((3, 2)))


def test_blocked_basis_matches_one_block(outlier_matrix, monkeypatch):
    from hessspec.linalg import krylov

    op = dense_op(outlier_matrix[0])
    one = hs.spectral_density(op, num_probes=3, num_steps=STEPS)
    monkeypatch.setattr(krylov, "BLOCKED_MIN_ELEMENTS", 0)
    blocked = hs.spectral_density(op, num_probes=3, num_steps=STEPS)
    np.testing.assert_allclose(blocked.nodes, one.nodes, atol=1e-9)
    np.testing.assert_allclose(blocked.weights, one.weights, atol=1e-9)


@pytest.fixture(scope="module")
def outlier_over_bulk():
    """One eigenvalue 1e4 over a bulk uniform in [0, 0.1] (1999 of them), dense float64."""
    rng = np.random.default_rng(0)
    bulk = rng.uniform(0.0, 0.1, 1999)
    a, _, q = matrix_with_spectrum(np.concatenate([[1e4], bulk]), seed=1)
    return a, bulk, q


def _bulk_w1(sd, bulk, width):
    """Wasserstein-1 distance, as a fraction of the bulk's width, between the SLQ measure
    below 1 (renormalized) and the bulk's eigenvalues."""
    points, masses = sd.quadrature()
    inside = points < 1.0
    return wasserstein_distance(points[inside], bulk, masses[inside]) / width


def test_float32_resolves_a_bulk_under_a_large_outlier(outlier_over_bulk):
    """A float32 operator whose outlier dwarfs the bulk: breakdown is judged against each
    step's own product, so every probe runs its 80 steps through the bulk and recovers it as
    well as float64 does (the old threshold, 100 eps x the outlier, stopped after 2 steps
    with a Wasserstein error of 0.12 of the width)."""
    a, bulk, q = outlier_over_bulk
    op32 = dense_op(a, np.float32)
    sd = hs.spectral_density(op32, num_probes=10, num_steps=80)
    assert np.all(sd.num_steps_done == 80)
    assert np.mean(np.sum(sd.nodes < 1.0, axis=1)) >= 75
    assert _bulk_w1(sd, bulk, 0.1) <= 0.01
    assert sd.lambda_max == pytest.approx(1e4, rel=1e-6)


def test_a_bulk_below_float32_resolution_is_reported(outlier_over_bulk):
    """The same outlier over a bulk of width 1e-4, below what float32 matvecs resolve
    (12 eps x 1e4 ~ 0.014): SLQ says so instead of silently lumping the bulk into a node;
    in float64 the same bulk is resolved and nothing is said."""
    a, bulk, q = outlier_over_bulk
    narrow = bulk * 1e-3
    a = (q * np.sort(np.concatenate([[1e4], narrow]))) @ q.T
    ops = {dt: dense_op(a, dt) for dt in (np.float32, np.float64)}
    with pytest.warns(hs.SpectralResolutionWarning, match=r"float32 matvecs resolve \(about"):
        hs.spectral_density(ops[np.float32], num_probes=4, num_steps=80)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hs.SpectralResolutionWarning)
        sd64 = hs.spectral_density(ops[np.float64], num_probes=4, num_steps=80)
    assert _bulk_w1(sd64, narrow, 1e-4) <= 0.01


def test_slq_trace_is_a_hutchinson_estimate(outlier_matrix):
    """n sum_l w_l tau_l = n v^T A v per probe: the SLQ trace lies within a few of its
    standard errors of tr(A), and for a 1-dimensional probe set its error is NaN."""
    a, ev = outlier_matrix
    sd = hs.spectral_density(dense_op(a), num_probes=PROBES, num_steps=STEPS)
    value, stderr = sd.trace()
    assert abs(value - np.sum(ev)) <= 4 * stderr and 0 < stderr < 0.2 * np.abs(ev).sum()
    one = hs.spectral_density(dense_op(a), num_probes=1, num_steps=STEPS)
    assert np.isnan(one.trace()[1])
