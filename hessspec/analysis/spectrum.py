"""What a spectrum says: outliers against the bulk, gradient energy in the top eigenspace.

Pure array functions (numpy in, numpy out, float64); they know nothing of models or files.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "OutlierSplit",
    "density_js_distance",
    "gradient_energy",
    "outlier_split",
    "subspace_overlap",
]


def _rows_orthonormal(v: np.ndarray, caller: str, name: str) -> None:
    gram_err = float(np.max(np.abs(v @ v.T - np.eye(v.shape[0])))) if v.shape[0] else 0.0
    if gram_err > 1e-3:
        raise ValueError(
            f"{caller}: the rows of {name} are not orthonormal (max |V V^T - I| = "
            f"{gram_err:.3g}); pass eigenvectors as rows, e.g. top_eigenpairs(...).vectors."
        )


def subspace_overlap(vectors_a: Any, vectors_b: Any) -> float:
    """Overlap of two eigenspaces (Gur-Ari, Roberts & Dyer 2018):
    ``||Q_a^T Q_b||_F^2 / k`` for orthonormal rows ``Q_a`` ``(k_a, n)`` and ``Q_b``
    ``(k_b, n)``, ``k = min(k_a, k_b)``.

    1 when the smaller space lies inside the other, 0 when they are orthogonal; for two
    random ``k``-dimensional subspaces of ``R^n`` about ``max(k_a, k_b) / n``. Signs and the
    order of the vectors within a space do not matter.

    Raises:
        ValueError: shapes that do not match, non-finite entries or non-orthonormal rows.
    """
    a = np.asarray(vectors_a, dtype=np.float64)
    b = np.asarray(vectors_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not a.size or not b.size:
        raise ValueError(
            f"subspace_overlap: vectors must be (k, n) arrays with eigenvectors as rows and the "
            f"same n, got {a.shape} and {b.shape}."
        )
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("subspace_overlap: the vectors contain NaN/Inf.")
    _rows_orthonormal(a, "subspace_overlap", "vectors_a")
    _rows_orthonormal(b, "subspace_overlap", "vectors_b")
    return float(np.sum((a @ b.T) ** 2) / min(a.shape[0], b.shape[0]))


def density_js_distance(densities: Any, grid: Any) -> np.ndarray:
    """Pairwise Jensen-Shannon distances between spectral densities on one grid.

    Each density (a row of ``densities``, values on ``grid``) is turned into a probability
    vector by its Riemann masses on the grid; the distance is the square root of the
    Jensen-Shannon divergence in bits (``scipy.spatial.distance.jensenshannon``, base 2), so
    it lies in ``[0, 1]``: 0 for equal densities, 1 for disjoint supports. Zhang et al. (2024)
    compare the Hessian spectra of a network's blocks this way.

    Args:
        densities: ``(B, G)`` non-negative values of ``B`` densities on the ``(G,)`` grid
            (e.g. :meth:`hessspec.SpectralDensity.density` on a common grid and width).
        grid: ``(G,)`` increasing points.

    Returns:
        ``(B, B)`` symmetric distances with a zero diagonal.
    """
    from scipy.spatial.distance import jensenshannon

    dens = np.asarray(densities, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    if dens.ndim != 2 or grid.ndim != 1 or dens.shape[1] != grid.size or grid.size < 2:
        raise ValueError(
            f"density_js_distance: densities must be (B, G) on a (G,) grid, got "
            f"{dens.shape} and {grid.shape}."
        )
    if np.any(~np.isfinite(dens)) or np.any(dens < 0):
        raise ValueError("density_js_distance: densities must be finite and non-negative.")
    widths = np.gradient(grid)
    masses = dens * widths
    totals = masses.sum(axis=1)
    if np.any(totals <= 0):
        raise ValueError("density_js_distance: a density has no mass on the grid.")
    masses /= totals[:, None]
    # subnormal masses (far Gaussian tails) would make (p + q) / 2 underflow to 0 where p > 0,
    # and the divergence infinite: they are zero to double precision anyway
    masses[masses < np.finfo(np.float64).tiny] = 0.0
    b = dens.shape[0]
    out = np.zeros((b, b))
    for i in range(b):
        for j in range(i + 1, b):
            out[i, j] = out[j, i] = float(jensenshannon(masses[i], masses[j], base=2))
    return out


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
    _rows_orthonormal(v, "gradient_energy", "vectors")
    norms2 = np.sum(g * g, axis=-1)
    if np.any(norms2 == 0):
        raise ValueError(
            "gradient_energy: a gradient is exactly zero, so the fraction ||P g||^2/||g||^2 "
            "is undefined."
        )
    coeffs2 = (g @ v.T) ** 2
    return np.cumsum(coeffs2, axis=-1) / norms2[..., None]


class OutlierSplit(NamedTuple):
    """Outliers against the bulk, from the top eigenvalues (see :func:`outlier_split`): Python
    numbers and one float64 NumPy array.

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
