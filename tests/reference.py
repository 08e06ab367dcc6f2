"""Exact references shared by the tests: matrices with chosen spectra."""

import numpy as np


def matrix_with_spectrum(eigenvalues, seed=0):
    """A dense symmetric matrix Q diag(eigenvalues) Q^T with a random orthogonal Q (float64).

    Returns (A, eigenvalues sorted ascending, Q with columns matching the sorted order).
    """
    eigenvalues = np.sort(np.asarray(eigenvalues, dtype=np.float64))
    n = eigenvalues.size
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    q = q * np.sign(np.diag(r))
    return (q * eigenvalues) @ q.T, eigenvalues, q
