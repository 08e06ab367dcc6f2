"""Lanczos (tridiagonalization, extreme eigenpairs) against numpy.linalg.eigh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import counting_operator, dense_op, matrix_with_spectrum

import hessspec as hs
from hessspec.linalg import lanczos
from hessspec.linalg.lanczos import breakdown_tolerance, default_tolerance

N = 200
M = 30  # one basis size for most tests: one compilation of the Lanczos loop


def outliers_and_bulk(seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([[50.0, 30.0, 20.0, 12.0, 8.0], rng.uniform(-1.0, 1.0, N - 5)])


def assert_pairs_match(res, a, ref_values, ref_vectors, rel=1e-8):
    """values to ``rel``, vectors up to sign, residuals recomputed, orthonormal rows."""
    k = ref_values.size
    scale = np.max(np.abs(np.linalg.eigvalsh(a)))
    np.testing.assert_allclose(res.values, ref_values, rtol=0, atol=rel * scale)
    vecs = np.asarray(res.vectors)
    assert vecs.shape == (k, a.shape[0]) and vecs.dtype == np.float64
    overlaps = np.abs(np.sum(vecs * ref_vectors.T, axis=1))
    assert np.all(overlaps >= 1 - 1e-8), overlaps
    recomputed = np.linalg.norm(vecs @ a - res.values[:, None] * vecs, axis=1)
    np.testing.assert_allclose(res.residuals, recomputed, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(k), rtol=0, atol=1e-12)
    assert res.converged.dtype == bool and np.all(res.converged)


def test_largest_outliers_over_bulk():
    a, ev, q = matrix_with_spectrum(outliers_and_bulk())
    res = hs.top_eigenpairs(dense_op(a), 5, num_steps=M)
    assert_pairs_match(res, a, ev[::-1][:5], q[:, ::-1][:, :5])
    assert np.all(res.residuals <= 1e-6 * 50.0)
    assert res.num_matvecs >= M


def test_smallest_and_largest_of_indefinite():
    rng = np.random.default_rng(1)
    spec = np.concatenate(
        [[60.0, 35.0, -30.0, -20.0, -12.0, -9.0, -6.0], rng.uniform(-1, 1, N - 7)]
    )
    a, ev, q = matrix_with_spectrum(spec, seed=1)
    op = dense_op(a)
    low = hs.top_eigenpairs(op, 5, num_steps=M, which="smallest")
    np.testing.assert_array_equal(low.values, np.sort(low.values))  # most negative first
    assert_pairs_match(low, a, ev[:5], q[:, :5])
    high = hs.top_eigenpairs(op, 5, num_steps=M, which="largest")
    assert_pairs_match(high, a, ev[::-1][:5], q[:, ::-1][:, :5])
    np.testing.assert_allclose(high.values[:2], [60.0, 35.0], rtol=1e-12)


def test_near_degenerate_clusters():
    rng = np.random.default_rng(2)
    cluster = [20.0, 20.0 - 2e-4, 20.0 - 4e-4, 10.0, 10.0 - 1e-4]
    a, ev, q = matrix_with_spectrum(np.concatenate([cluster, rng.uniform(0, 1, N - 5)]), seed=2)
    res = hs.top_eigenpairs(dense_op(a), 5, num_steps=M, tol=1e-11)
    assert_pairs_match(res, a, ev[::-1][:5], q[:, ::-1][:, :5])


def test_exact_multiplicity_is_found():
    """[10, 10, 10, 9] over a bulk: one start vector sees one direction of the 10-eigenspace;
    the verification/restart cycles must still find all three copies."""
    rng = np.random.default_rng(3)
    a, ev, q = matrix_with_spectrum(
        np.concatenate([[10.0, 10.0, 10.0, 9.0], rng.uniform(0, 1, N - 4)]), seed=3
    )
    res = hs.top_eigenpairs(dense_op(a), 5, num_steps=M)
    np.testing.assert_allclose(res.values[:4], [10.0, 10.0, 10.0, 9.0], rtol=1e-12)
    vecs = np.asarray(res.vectors)
    top = q[:, -3:]  # the 10-eigenspace
    np.testing.assert_allclose(vecs[:3].T @ vecs[:3], top @ top.T, atol=1e-8)
    assert abs(vecs[3] @ q[:, -4]) >= 1 - 1e-8


def test_breakdown_three_distinct_eigenvalues():
    a, _, q = matrix_with_spectrum(np.repeat([3.0, 1.0, -2.0], [70, 65, 65]), seed=4)
    op = dense_op(a)
    lz = hs.lanczos_tridiag(op, jnp.ones(N), M)
    assert int(lz.num_steps_done) == 3
    for arr in lz:
        assert np.all(np.isfinite(np.asarray(arr)))
    np.testing.assert_array_equal(np.asarray(lz.alphas[3:]), 0.0)
    np.testing.assert_array_equal(np.asarray(lz.betas[2:]), 0.0)
    np.testing.assert_array_equal(np.asarray(lz.basis[3:]), 0.0)
    basis = np.asarray(lz.basis[:3])
    np.testing.assert_allclose(basis @ basis.T, np.eye(3), atol=1e-13)
    t = np.diag(lz.alphas[:3]) + np.diag(lz.betas[:2], 1) + np.diag(lz.betas[:2], -1)
    np.testing.assert_allclose(np.linalg.eigvalsh(t), [-2.0, 1.0, 3.0], atol=1e-12)

    # top-5 needs five copies of 3: random restarts after each breakdown reach them
    res = hs.top_eigenpairs(op, 5, num_steps=M)
    np.testing.assert_allclose(res.values, 3.0, rtol=1e-12)
    vecs = np.asarray(res.vectors)
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(5), atol=1e-12)
    eigenspace = q[:, -70:]
    np.testing.assert_allclose(np.linalg.norm(vecs @ eigenspace, axis=1), 1.0, atol=1e-10)
    low = hs.top_eigenpairs(op, 5, num_steps=M, which="smallest")
    np.testing.assert_allclose(low.values, -2.0, rtol=1e-12)


def test_start_vector_in_invariant_subspace():
    a, ev, q = matrix_with_spectrum(outliers_and_bulk(5), seed=5)
    op = dense_op(a)
    v0 = q[:, 0] + 2.0 * q[:, -1]
    lz = hs.lanczos_tridiag(op, v0, M)
    assert int(lz.num_steps_done) == 2
    t = np.array([[lz.alphas[0], lz.betas[0]], [lz.betas[0], lz.alphas[1]]])
    np.testing.assert_allclose(np.linalg.eigvalsh(t), [ev[0], ev[-1]], atol=1e-12)
    assert np.all(np.isfinite(np.asarray(lz.basis)))
    # a zero start vector: nothing to do, no NaN
    lz0 = hs.lanczos_tridiag(op, np.zeros(N), M)
    assert int(lz0.num_steps_done) == 0 and np.all(np.asarray(lz0.alphas) == 0)


def test_full_space_and_tiny_dims():
    for n in (1, 6):
        a, ev, q = matrix_with_spectrum(np.linspace(-3.0, 4.0, n), seed=n)
        op = dense_op(a)
        lz = hs.lanczos_tridiag(op, np.ones(n), n)
        d = int(lz.num_steps_done)
        t = np.diag(lz.alphas[:d]) + np.diag(lz.betas[: d - 1], 1) + np.diag(lz.betas[: d - 1], -1)
        np.testing.assert_allclose(np.linalg.eigvalsh(t), ev, atol=1e-12)
        for which, ref, refq in (("largest", ev[::-1], q[:, ::-1]), ("smallest", ev, q)):
            res = hs.top_eigenpairs(op, n, which=which)  # k == dim: the whole space, exact
            assert_pairs_match(res, a, ref, refq, rel=1e-12)


def test_float32_operator_runs_lanczos_in_float64():
    a, ev, _ = matrix_with_spectrum(outliers_and_bulk(6), seed=6)
    seen = []

    def apply32(v, m):
        seen.append(v.dtype)
        return m @ v

    op = hs.LinearOperator(
        apply=apply32, operand=jnp.asarray(a, jnp.float32), dim=N, dtype=np.float32
    )
    lz = hs.lanczos_tridiag(op, np.ones(N, np.float32), 10)
    assert lz.basis.dtype == jnp.float64 and lz.alphas.dtype == jnp.float64
    basis = np.asarray(lz.basis)
    np.testing.assert_allclose(basis @ basis.T, np.eye(10), atol=1e-14)  # float64-orthonormal
    res = hs.top_eigenpairs(op, 5, num_steps=M)
    assert res.vectors.dtype == jnp.float64
    assert set(seen) == {np.dtype(np.float32)}  # the matvec itself stays float32
    np.testing.assert_allclose(res.values, ev[::-1][:5], rtol=1e-5)
    assert np.all(res.residuals <= default_tolerance(np.float32) * 50.0)
    assert default_tolerance(np.float32) == 1e-3 and default_tolerance(np.float64) == 1e-6
    assert breakdown_tolerance(np.float64) < breakdown_tolerance(np.float32)


def test_nonconvergence_warns_and_flags_pairs():
    a, _, _ = matrix_with_spectrum(np.random.default_rng(7).uniform(0, 1, N), seed=7)
    with pytest.warns(hs.LanczosConvergenceWarning, match=r"pairs \(index \d+, value .*residual"):
        res = hs.top_eigenpairs(dense_op(a), 5, num_steps=8, max_restarts=0)
    assert not np.all(res.converged)
    assert res.converged.shape == (5,) and np.all(np.isfinite(res.residuals))
    assert res.num_matvecs == 8 + 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k=0 must be at least 1"),
        ({"k": N + 1}, "exceeds the operator's dim"),
        ({"k": 5, "num_steps": N + 1}, "num_steps=201 exceeds dim"),
        ({"k": 5, "num_steps": 4}, "must exceed k"),
        ({"k": 5, "num_steps": 5}, "must exceed k"),
        ({"k": 5, "which": "top"}, "must be 'largest' or 'smallest'"),
        ({"k": 5, "tol": 0.0}, "tol=0.0 must be positive"),
    ],
)
def test_top_eigenpairs_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hs.top_eigenpairs(dense_op(np.eye(N)), **kwargs)


def test_lanczos_tridiag_errors():
    op = dense_op(np.eye(4))
    with pytest.raises(ValueError, match="num_steps <= dim"):
        hs.lanczos_tridiag(op, np.ones(4), 5)
    with pytest.raises(ValueError, match="flat vector"):
        hs.lanczos_tridiag(op, np.ones((4, 1)), 2)


def test_nan_matvec_raises():
    a = np.eye(N)
    a[3, 7] = np.nan
    with pytest.raises(FloatingPointError, match="Hessian-vector product .* not finite"):
        hs.top_eigenpairs(dense_op(a), 5, num_steps=M)
    a[3, 7] = np.inf
    with pytest.raises(FloatingPointError, match="parameters and the data for NaN/Inf"):
        hs.top_eigenpairs(dense_op(a), 5, num_steps=M)


def test_plain_callable_reproducible_and_no_recompilation():
    a, ev, _ = matrix_with_spectrum(outliers_and_bulk(8), seed=8)
    matvec, op, traces = counting_operator(a)
    first = hs.top_eigenpairs(op, 5, num_steps=M)
    count = len(traces)
    assert count >= 1
    again = hs.top_eigenpairs(op, 5, num_steps=M)
    other = hs.top_eigenpairs(op, 5, num_steps=M, key=jax.random.key(42))
    assert len(traces) == count, "a second call on the same operator recompiled"
    np.testing.assert_array_equal(first.values, again.values)  # key=None is a fixed key
    np.testing.assert_allclose(other.values, ev[::-1][:5], rtol=1e-10)
    # plain callable with dim=
    direct = hs.top_eigenpairs(matvec, 5, num_steps=M, dim=N)
    np.testing.assert_allclose(direct.values, first.values, rtol=1e-13)
    np.testing.assert_allclose(direct.residuals, first.residuals, rtol=1e-6, atol=1e-13)


def test_blocked_basis_matches_one_block(monkeypatch):
    """Large bases are stored in row blocks and reorthogonalized only against the filled
    ones; force that layout on a small problem and compare with the one-block results."""
    from hessspec.linalg import krylov

    a, ev, q = matrix_with_spectrum(outliers_and_bulk(9), seed=9)
    op = dense_op(a)
    v0 = np.random.default_rng(9).normal(size=N)
    one = hs.lanczos_tridiag(op, v0, M)
    low = hs.top_eigenpairs(op, 5, num_steps=M, which="smallest")
    b, _, _ = matrix_with_spectrum(np.repeat([3.0, 1.0, -2.0], [70, 65, 65]), seed=4)
    monkeypatch.setattr(krylov, "BLOCKED_MIN_ELEMENTS", 0)
    assert krylov.num_blocks(krylov.basis_rows(M), N) == krylov.NUM_BASIS_BLOCKS
    blocked = hs.lanczos_tridiag(op, v0, M)
    np.testing.assert_allclose(blocked.alphas, one.alphas, rtol=0, atol=1e-10)
    np.testing.assert_allclose(blocked.betas, one.betas, rtol=0, atol=1e-10)
    basis = np.asarray(blocked.basis)
    np.testing.assert_allclose(basis @ basis.T, np.eye(M), atol=1e-13)
    # thick restarts, verification, and fresh vectors after breakdowns, all in blocks
    res = hs.top_eigenpairs(op, 5, num_steps=M, which="smallest")
    assert_pairs_match(res, a, ev[:5], q[:, :5])
    np.testing.assert_allclose(res.values, low.values, rtol=1e-12)
    res = hs.top_eigenpairs(dense_op(b), 5, num_steps=M)
    np.testing.assert_allclose(res.values, 3.0, rtol=1e-12)
    vecs = np.asarray(res.vectors)
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(5), atol=1e-12)


def test_basis_in_host_memory(monkeypatch):
    """basis_memory="host": the basis (in blocks) lives in the pinned_host memory space
    through the compiled Lanczos steps and thick restarts, and every result equals the
    device-memory run."""
    from hessspec.linalg import krylov, krylov_runner

    monkeypatch.setattr(krylov, "BLOCKED_MIN_ELEMENTS", 0)
    a, ev, q = matrix_with_spectrum(outliers_and_bulk(5), seed=5)
    op = dense_op(a)
    v0 = np.random.default_rng(5).normal(size=N)

    runner = krylov_runner.KrylovRunner(
        op, krylov.basis_rows(M), basis_dtype=np.float64, host=True, key=jax.random.key(0)
    )
    assert runner.state.basis.sharding.memory_kind == "pinned_host"
    runner.lanczos(0, M, stop_at_breakdown=False, start=v0)
    assert runner.state.basis.sharding.memory_kind == "pinned_host"
    runner.restart(np.eye(M)[:, :3], np.ones(3), 3)
    assert runner.state.basis.sharding.memory_kind == "pinned_host"

    dev = hs.top_eigenpairs(op, 5, num_steps=M)
    host = hs.top_eigenpairs(op, 5, num_steps=M, basis_memory="host")
    assert_pairs_match(host, a, ev[::-1][:5], q[:, ::-1][:, :5])
    np.testing.assert_allclose(host.values, dev.values, rtol=1e-13)
    assert host.num_matvecs == dev.num_matvecs
    tri_dev = hs.lanczos_tridiag(op, v0, M)
    tri_host = hs.lanczos_tridiag(op, v0, M, basis_memory="host")
    assert isinstance(tri_host.basis, np.ndarray)
    np.testing.assert_allclose(tri_host.basis, tri_dev.basis, rtol=0, atol=1e-14)
    np.testing.assert_allclose(tri_host.alphas, tri_dev.alphas, rtol=0, atol=1e-12)
    sd_dev = hs.spectral_density(op, 3, M)
    sd_host = hs.spectral_density(op, 3, M, basis_memory="host")
    np.testing.assert_allclose(sd_host.nodes, sd_dev.nodes, rtol=0, atol=1e-12)


def test_bad_basis_memory():
    op = dense_op(np.eye(4))
    with pytest.raises(ValueError, match="basis_memory='gpu' must be 'device' or 'host'"):
        hs.top_eigenpairs(op, 1, basis_memory="gpu")
    with pytest.raises(ValueError, match="basis_memory"):
        hs.spectral_density(op, 1, 2, basis_memory="disk")


def test_per_pair_convergence_on_a_clustered_indefinite_spectrum():
    """Top 10 eigenvalues clustered in [1, 1.05] over a bulk in [-1, 0.99] and one at -155,
    float32 matvecs. Judged relative to ||A|| (155) the cluster looked converged at 13 %
    error; judged pair by pair (residual <= tol |theta|, floored at a few eps ||A||) every
    pair is refined, and every returned error bound holds."""
    rng = np.random.default_rng(0)
    spec = np.concatenate([rng.uniform(1.0, 1.05, 10), rng.uniform(-1.0, 0.99, 589), [-155.0]])
    a, ev, q = matrix_with_spectrum(spec, seed=0)
    op = dense_op(a, np.float32)
    res = hs.top_eigenpairs(op, 10)
    ref = ev[::-1][:10]
    assert np.all(res.converged)
    floor = lanczos.RESIDUAL_FLOOR * np.finfo(np.float32).eps * 155.0
    assert np.all(res.residuals <= np.maximum(1e-3 * np.abs(res.values), floor))
    np.testing.assert_allclose(res.values, ref, rtol=1e-4)
    assert np.all(np.abs(res.values - ref) <= res.error_bounds + 1e-6)  # float32 rounding
    assert np.all(res.error_bounds <= res.residuals)
    overlaps = np.abs(np.sum(res.vectors * q[:, ::-1][:, :10].T, axis=1))
    assert np.all(overlaps >= 0.99)


def test_unconverged_pairs_are_named_with_error_bounds():
    """A budget too small for the cluster: the warning names each unconverged pair with its
    residual and error bound, and the bounds hold."""
    rng = np.random.default_rng(1)
    spec = np.concatenate([rng.uniform(1.0, 1.01, 5), rng.uniform(-1.0, 0.999, 194), [-50.0]])
    a, ev, _ = matrix_with_spectrum(spec, seed=1)
    with pytest.warns(hs.LanczosConvergenceWarning, match=r"error bound \d"):
        res = hs.top_eigenpairs(dense_op(a), 5, num_steps=12, max_restarts=1, verify=False)
    assert not np.all(res.converged)
    bad = ~res.converged
    nearest = np.min(np.abs(ev[None, :] - res.values[:, None]), axis=1)
    assert np.all(nearest[bad] <= res.error_bounds[bad] * (1 + 1e-9))


def test_dgks_reorthogonalizes_when_a_pass_cancels():
    """A vector almost entirely inside the basis: one classical Gram-Schmidt pass leaves
    rounding-level components along the basis (~1e-8 of what is left); the DGKS criterion
    (a pass that shrinks the vector below 0.7 of its norm is repeated) removes them."""
    from hessspec.linalg import krylov

    rng = np.random.default_rng(11)
    n = 500
    basis_rows, _ = np.linalg.qr(rng.standard_normal((n, 4)))
    stored = np.zeros((1, 8, n))
    stored[0, :4] = basis_rows.T
    leftover = rng.standard_normal(n)
    leftover -= basis_rows @ (basis_rows.T @ leftover)
    leftover /= np.linalg.norm(leftover)
    w = jnp.asarray(1e8 * basis_rows @ rng.standard_normal(4) + leftover)
    once, _ = krylov._gs_pass(jnp.asarray(stored), w, 4)
    twice, _ = krylov._orthogonalize(jnp.asarray(stored), w, 4, 1)
    err_once = np.abs(basis_rows.T @ np.asarray(once)).max() / np.linalg.norm(once)
    err_dgks = np.abs(basis_rows.T @ np.asarray(twice)).max() / np.linalg.norm(twice)
    assert err_once > 1e-10 and err_dgks < 1e-14
    np.testing.assert_allclose(np.asarray(twice), leftover, atol=1e-7)
