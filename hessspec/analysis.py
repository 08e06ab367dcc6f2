"""What a spectrum says: outliers against the bulk, gradient energy in the top eigenspace.

Pure array functions (numpy in, numpy out, float64); they know nothing of models or files.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = ["OutlierSplit", "gradient_energy", "outlier_split"]


def gradient_energy(g: Any, vectors: Any) -> np.ndarray:
    """Fraction of a gradient's squared norm in the span of the top eigenvectors.

    With orthonormal rows ``v_1, ..., v_k`` of ``vectors`` and ``P_j`` the orthogonal projector
    onto ``span(v_1..v_j)`` (Ghorbani, Krishnan & Xiao 2019)::

        frac[j-1] = ||P_j g||^2 / ||g||^2 = sum_{i <= j} (v_i . g)^2 / ||g||^2,  j = 1..k,

    non-decreasing in ``j`` and in ``[0, 1]``.

    Args:
        g: ``(n,)`` gradient, or ``(b, n)`` several gradients (e.g. mini-batch gradients).
        vectors: ``(k, n)`` orthonormal rows (``top_eigenpairs(...).vectors``).

    Returns:
        ``(k,)`` fractions for a single gradient, ``(b, k)`` for a stack.

    Raises:
        ValueError: shapes do not match, non-finite entries, a zero gradient (the fraction is
            undefined), or rows of ``vectors`` not orthonormal (``|V V^T - I| > 1e-3``).
    """
    g = np.asarray(g, dtype=np.float64)
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(
            f"gradient_energy: vectors must be (k, n) with eigenvectors as rows, got {v.shape}."
        )
    if g.ndim not in (1, 2) or g.shape[-1] != v.shape[1]:
        raise ValueError(
            f"gradient_energy: g must be (n,) or (b, n) with n = {v.shape[1]} (the "
            f"eigenvectors' length), got {g.shape}; flatten the gradient with op.ravel."
        )
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(v))):
        raise ValueError("gradient_energy: g or vectors contain NaN/Inf.")
    gram_err = float(np.max(np.abs(v @ v.T - np.eye(v.shape[0])))) if v.shape[0] else 0.0
    if gram_err > 1e-3:
        raise ValueError(
            f"gradient_energy: the rows of vectors are not orthonormal (max |V V^T - I| = "
            f"{gram_err:.3g}); pass eigenvectors as rows, e.g. top_eigenpairs(...).vectors."
        )
    norms2 = np.sum(g * g, axis=-1)
    if np.any(norms2 == 0):
        raise ValueError(
            "gradient_energy: a gradient is exactly zero, so the fraction ||P g||^2/||g||^2 "
            "is undefined."
        )
    coeffs2 = (g @ v.T) ** 2
    return np.cumsum(coeffs2, axis=-1) / norms2[..., None]


class OutlierSplit(NamedTuple):
    """Outliers against the bulk, from the top eigenvalues (see :func:`outlier_split`).

    Attributes:
        num_outliers: count ``c`` of eigenvalues above the largest relative gap (0 if none).
        bulk_edge: ``lambda_{c+1}``, the largest eigenvalue that is not an outlier.
        outlier_ratio: ``lambda_1 / bulk_edge`` (NaN if ``bulk_edge <= 0``).
        ratio_to_kth: ``lambda_1 / lambda_K`` with ``K = num_classes`` (NaN if
            ``lambda_K <= 0``).
        reference_count: ``K = num_classes`` (Papyan: about ``K`` outliers for ``K`` classes).
        relative_gaps: ``(len - 1,)`` the gaps ``r_i`` defined in :func:`outlier_split`
            (NaN where undefined).
    """

    num_outliers: int
    bulk_edge: float
    outlier_ratio: float
    ratio_to_kth: float
    reference_count: int
    relative_gaps: np.ndarray


def outlier_split(top_eigenvalues: Any, num_classes: int) -> OutlierSplit:
    """Split the top of a spectrum into outliers and bulk at the largest relative gap.

    Sort the given eigenvalues descending, ``lambda_1 >= lambda_2 >= ... >= lambda_k``. For
    ``i = 1..k-1`` with ``lambda_{i+1} > 0`` (both positive) the relative gap is::

        r_i = (lambda_i - lambda_{i+1}) / lambda_i  in [0, 1),

    (equivalently the ratio ``lambda_i / lambda_{i+1}``, which is scale-free); pairs with
    ``lambda_{i+1} <= 0`` have no relative gap (NaN) and are not candidates. The outlier
    count is ``c = argmax_i r_i`` (the first index on ties), i.e. the eigenvalues above the
    largest relative gap. Degenerate cases give ``c = 0`` (no outliers, ``bulk_edge =
    lambda_1``): fewer than two positive eigenvalues, or all candidate gaps ``<= 1e-12``
    (a flat top). The split can only fall inside the given list, so pass more eigenvalues
    than the expected count (``2 K`` is a good choice).

    Args:
        top_eigenvalues: ``(k,)`` the largest eigenvalues (any order), ``k >= max(2, K)``.
        num_classes: ``K >= 1``, the reference count.

    Returns:
        :class:`OutlierSplit`.

    Raises:
        ValueError: not a 1-D finite array, fewer than 2 or fewer than ``K`` values, or
            ``K < 1``.
    """
    lam = np.asarray(top_eigenvalues, dtype=np.float64)
    num_classes = int(num_classes)
    if lam.ndim != 1 or not np.all(np.isfinite(lam)):
        raise ValueError(
            f"outlier_split: top_eigenvalues must be a finite 1-D array, got shape {lam.shape}."
        )
    if num_classes < 1:
        raise ValueError(f"outlier_split: num_classes={num_classes} must be at least 1.")
    if lam.size < max(2, num_classes):
        raise ValueError(
            f"outlier_split: got {lam.size} eigenvalues; need at least max(2, num_classes="
            f"{num_classes}) (2 * num_classes recommended) to locate the gap and lambda_K."
        )
    lam = np.sort(lam)[::-1]
    gaps = np.full(lam.size - 1, np.nan)
    ok = lam[1:] > 0
    gaps[ok] = (lam[:-1][ok] - lam[1:][ok]) / lam[:-1][ok]
    if np.any(ok) and np.nanmax(gaps) > 1e-12:
        num_outliers = int(np.nanargmax(gaps)) + 1
    else:
        num_outliers = 0
    bulk_edge = float(lam[num_outliers])
    lam_k = float(lam[num_classes - 1])
    return OutlierSplit(
        num_outliers=num_outliers,
        bulk_edge=bulk_edge,
        outlier_ratio=float(lam[0] / bulk_edge) if bulk_edge > 0 else float("nan"),
        ratio_to_kth=float(lam[0] / lam_k) if lam_k > 0 else float("nan"),
        reference_count=num_classes,
        relative_gaps=gaps,
    )
