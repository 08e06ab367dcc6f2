"""Memory estimates, the refusal before a run that cannot fit, and float32 Krylov bases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import dense_op, matrix_with_spectrum

import hessspec as hs
from hessspec.linalg import krylov, krylov_runner, memory

N = 200
M = 30


def spectrum(seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([[50.0, 30.0, 20.0, 12.0, 8.0], rng.uniform(-1.0, 1.0, N - 5)])


@pytest.mark.parametrize("basis_dtype", [None, "float32"])
def test_estimates_equal_the_arrays_allocated(basis_dtype):
    a, _, _ = matrix_with_spectrum(spectrum())
    op = dense_op(a)
    itemsize = 8 if basis_dtype is None else 4
    rows = krylov.basis_rows(M)
    # lanczos_tridiag: the engine's basis, and the basis it returns on the host
    est = memory.estimate_memory(op, num_steps=M, basis_dtype=basis_dtype)
    lz = hs.lanczos_tridiag(op, np.ones(N), M, basis_dtype=basis_dtype)
    assert est.solver == "lanczos_tridiag"
    assert est.basis == rows * N * itemsize
    assert est.probes >= lz.basis.nbytes
    assert est.operator == op.operand.nbytes == N * N * 8
    # top_eigenpairs: the blocked basis the engine allocates, and a restart's copy of it
    big_n = 10_000
    est = memory.estimate_memory(big_n, k=20, basis_dtype=basis_dtype)
    runner = krylov_runner.KrylovRunner(
        dense_op(np.eye(4)),
        krylov.basis_rows(60),
        basis_dtype=est_dtype(basis_dtype),
        host=False,
        key=jax.random.key(0),
    )
    assert runner.state.basis.nbytes == rows * 4 * itemsize  # the same rows for k = 20
    assert krylov.num_blocks(rows, big_n) > 1
    assert est.basis == est.workspace == rows * big_n * itemsize
    assert est.operator == est.hvp == 0  # a bare dimension: solver arrays only
    # spectral_density: one basis, whatever the number of probes
    few = memory.estimate_memory(op, num_steps=M, num_probes=2, basis_dtype=basis_dtype)
    many = memory.estimate_memory(op, num_steps=M, num_probes=50, basis_dtype=basis_dtype)
    assert few == many and few.basis == rows * N * itemsize and few.workspace == 0
    # trace: Hutch++ keeps its 50 sketch vectors in the basis; more need a larger basis
    est = memory.estimate_memory(op, num_matvecs=150)
    assert est.solver == "trace" and est.basis == rows * N * 8
    assert memory.estimate_memory(op, num_matvecs=600).basis == 2 * rows * N * 8
    total = est.basis + est.probes + est.operator + est.hvp + est.workspace
    assert est.total == total


def est_dtype(basis_dtype):
    return np.float64 if basis_dtype is None else np.float32


def test_hvp_working_set_of_a_dense_matvec_and_caching():
    a, _, _ = matrix_with_spectrum(spectrum())
    op = dense_op(a)
    one = memory.hvp_working_set(op, 1)
    assert one == N * 8  # just the product
    assert memory.hvp_working_set(op, 4) >= 4 * N * 8
    traces = []
    mat = jnp.asarray(a)

    def matvec(v):
        traces.append(1)
        return mat @ v

    first = memory.estimate_memory(matvec, k=5, num_steps=M, dim=N)
    count = len(traces)
    again = memory.estimate_memory(matvec, k=5, num_steps=M, dim=N)
    assert first == again
    assert len(traces) == count  # the HVP working sets are cached per callable


def test_memory_error_before_starting_names_the_options():
    a, _, _ = matrix_with_spectrum(spectrum())
    mat = jnp.asarray(a)
    traces = []

    def matvec(v):
        traces.append(1)
        return mat @ v

    op = hs.as_operator(matvec, dim=N)
    traces.clear()
    with pytest.raises(MemoryError, match=r"needs about .* but only 1 KiB is available") as err:
        hs.top_eigenpairs(op, 5, num_steps=M, check_memory=1024)
    message = str(err.value)
    assert 'basis_dtype="float32"' in message
    assert "check_memory=False" in message
    estimated_traces = len(traces)  # the estimate traces the matvec; the solver never did
    with pytest.raises(MemoryError, match='basis_dtype="float32"'):
        hs.spectral_density(op, num_probes=10, num_steps=M, check_memory=1024)
    with pytest.raises(MemoryError, match="smaller batch_size for the operator"):
        hs.trace(op, num_matvecs=30, check_memory=1024)
    assert len(traces) <= estimated_traces + 2  # only the estimates' traces
    # enough memory: runs; check_memory=False skips the check
    assert hs.trace(op, num_matvecs=30, check_memory=1e12).num_matvecs == 30
    assert hs.trace(op, num_matvecs=30, check_memory=False).num_matvecs == 30
    # the operator option appears for a real operator with an HVP working set
    est = memory.estimate_memory(op, k=5, num_steps=M)
    with pytest.raises(MemoryError, match="smaller batch_size for the operator"):
        memory.check_fits(est, available=est.total - 1)
    assert memory.check_fits(est, available=est.total) is est


def test_available_memory_and_summary():
    host = memory.available_memory()
    assert isinstance(host, int) and host > 0

    class FakeGPU:
        platform = "gpu"

        def memory_stats(self):
            return {"bytes_limit": 80 * 2**30, "bytes_in_use": 2**30}

    class NoStats:
        platform = "gpu"

        def memory_stats(self):
            return None

    assert memory.available_memory(FakeGPU()) == 79 * 2**30
    assert memory.available_memory(NoStats()) > 0  # falls back to host RAM
    est = memory.estimate_memory(10**6, num_steps=90, num_probes=10)
    line = memory.summarize([est, memory.estimate_memory(10**6, k=20)], available=2**34)
    assert line.startswith("this run needs about ") and "16 GiB available" in line
    assert "peak in top_eigenpairs" in line  # the basis and a restart's copy of it
    assert memory.format_bytes(3 * 2**30) == "3 GiB" and memory.format_bytes(512) == "512 B"


def test_float32_basis_keeps_eigenvalues_accurate():
    a, ev, q = matrix_with_spectrum(spectrum(3), seed=3)
    op = dense_op(a)
    lz = hs.lanczos_tridiag(op, np.ones(N), M, basis_dtype="float32")
    assert lz.basis.dtype == jnp.float32 and lz.alphas.dtype == jnp.float64
    basis = np.asarray(lz.basis, np.float64)
    np.testing.assert_allclose(basis @ basis.T, np.eye(M), atol=1e-6)
    res = hs.top_eigenpairs(op, 5, num_steps=M, basis_dtype="float32", tol=1e-5)
    np.testing.assert_allclose(res.values, ev[::-1][:5], rtol=1e-5)
    assert res.vectors.dtype == jnp.float64 and np.all(res.converged)
    overlaps = np.abs(np.sum(np.asarray(res.vectors) * q[:, ::-1][:, :5].T, axis=1))
    assert np.all(overlaps >= 1 - 1e-6)
    # SLQ: the nodes and weights of a float32 basis match the float64 ones closely
    sd64 = hs.spectral_density(op, num_probes=4, num_steps=M)
    sd32 = hs.spectral_density(op, num_probes=4, num_steps=M, basis_dtype="float32")
    np.testing.assert_allclose(sd32.lambda_max, sd64.lambda_max, rtol=1e-5)
    np.testing.assert_allclose(sd32.nodes[:, -3:], sd64.nodes[:, -3:], rtol=1e-5)
    np.testing.assert_allclose(sd32.weights.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize(
    ("basis_dtype", "match"),
    [("float16", "must be 'float32' or 'float64'"), ("int32", "must be 'float32'")],
)
def test_bad_basis_dtype(basis_dtype, match):
    with pytest.raises(ValueError, match=match):
        hs.top_eigenpairs(dense_op(np.eye(N)), 5, num_steps=M, basis_dtype=basis_dtype)
