"""Exact references shared by the tests: matrices with chosen spectra, and operators of
explicit matrices."""

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

import hessspec as hs


def matrix_with_spectrum(eigenvalues, seed=0):
    """A dense symmetric matrix Q diag(eigenvalues) Q^T with a random orthogonal Q (float64).

    Returns (A, eigenvalues sorted ascending, Q with columns matching the sorted order).
    """
    eigenvalues = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    n = eigenvalues.size
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    q = q * np.sign(np.diag(r))
    return (q * eigenvalues) @ q.T, eigenvalues, q


def _dense_apply(v, a):
    return a @ v


def dense_op(a, dtype=np.float64):
    """A LinearOperator for a dense matrix; one module-level apply, so operators of matrices
    of the same shape share compiled programs."""
    a = jnp.asarray(a, dtype=dtype)
    return hs.LinearOperator(apply=_dense_apply, operand=a, dim=a.shape[0], dtype=dtype)


class CountingOperator(NamedTuple):
    """A plain matvec callable, its operator, and a list that grows by one each time JAX
    traces the callable (so a recompilation shows as a longer list)."""

    matvec: Callable
    op: hs.LinearOperator
    traces: list


def counting_operator(a) -> CountingOperator:
    """The :class:`CountingOperator` of ``v -> a @ v``, its trace count at zero."""
    a = jnp.asarray(a)
    traces = []

    def matvec(v):
        traces.append(1)  # runs only while jax traces
        return a @ v

    op = hs.as_operator(matvec, dim=a.shape[0])
    traces.clear()
    return CountingOperator(matvec, op, traces)
