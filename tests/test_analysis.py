"""Outlier/bulk split and gradient energy on constructed cases with known answers."""

import math

import numpy as np
import pytest

import hessspec as hs


@pytest.fixture
def basis():
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((50, 50)))
    return q.T  # orthonormal rows


def test_gradient_energy_known_fractions(basis):
    top = basis[:3]
    g = 3.0 * basis[0] + 4.0 * basis[1] + 12.0 * basis[10]  # ||g||^2 = 9 + 16 + 144 = 169
    frac = hs.gradient_energy(g, top)
    np.testing.assert_allclose(frac, [9 / 169, 25 / 169, 25 / 169], atol=1e-14)
    # several gradients at once, and the full basis captures everything
    stack = np.stack([g, basis[2], basis[2] + basis[40]])
    out = hs.gradient_energy(stack, top)
    assert out.shape == (3, 3)
    np.testing.assert_allclose(out[0], frac, atol=1e-14)
    np.testing.assert_allclose(out[1], [0.0, 0.0, 1.0], atol=1e-14)
    np.testing.assert_allclose(out[2], [0.0, 0.0, 0.5], atol=1e-14)
    np.testing.assert_allclose(hs.gradient_energy(g, basis)[-1], 1.0, atol=1e-14)
    assert np.all(np.diff(hs.gradient_energy(stack, basis), axis=1) >= -1e-15)


@pytest.mark.parametrize(
    ("g", "vectors", "match"),
    [
        (np.ones(49), None, "g must be \\(n,\\) or \\(b, n\\) with n = 50"),
        (np.ones((2, 2, 50)), None, "g must be"),
        (np.ones(50), np.ones(50), "vectors must be \\(k, n\\)"),
        (np.zeros(50), None, "exactly zero"),
        (np.full(50, np.nan), None, "NaN/Inf"),
        (np.ones(50), 2 * np.eye(50)[:3], "not orthonormal"),
    ],
)
def test_gradient_energy_errors(basis, g, vectors, match):
    with pytest.raises(ValueError, match=match):
        hs.gradient_energy(g, basis[:3] if vectors is None else vectors)


def test_outlier_split_known_case():
    # three outliers above a gap, given unsorted, K = 3 classes
    top = np.array([5.0, 100.0, 4.5, 60.0, 3.0, 80.0, 4.0])
    out = hs.outlier_split(top, num_classes=3)
    assert out.num_outliers == 3
    assert out.bulk_edge == 5.0
    assert out.outlier_ratio == pytest.approx(20.0)
    assert out.ratio_to_kth == pytest.approx(100.0 / 60.0)
    assert out.reference_count == 3
    np.testing.assert_allclose(
        out.relative_gaps, [0.2, 0.25, 55 / 60, 0.1, 0.5 / 4.5, 0.25], atol=1e-15
    )


def test_outlier_split_degenerate_cases():
    flat = hs.outlier_split(np.full(6, 2.0), num_classes=2)  # no gap at all
    assert (flat.num_outliers, flat.bulk_edge, flat.outlier_ratio) == (0, 2.0, 1.0)
    # only positive pairs count: the drop from 8 to -0.1 is not a relative gap
    mixed = hs.outlier_split([10.0, 9.0, 8.0, -0.1, -0.2], num_classes=2)
    assert mixed.num_outliers == 2 and mixed.bulk_edge == 8.0
    assert np.isnan(mixed.relative_gaps[2:]).all()
    one_positive = hs.outlier_split([3.0, -1.0, -2.0], num_classes=1)
    assert one_positive.num_outliers == 0 and one_positive.bulk_edge == 3.0
    negative = hs.outlier_split([-1.0, -2.0], num_classes=2)
    assert negative.num_outliers == 0
    assert math.isnan(negative.outlier_ratio) and math.isnan(negative.ratio_to_kth)
    single = hs.outlier_split([10.0, 1.0, 0.9, 0.8], num_classes=1)
    assert single.num_outliers == 1 and single.outlier_ratio == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("values", "k", "match"),
    [
        ([1.0], 1, "need at least max\\(2, num_classes=1\\)"),
        ([3.0, 2.0, 1.0], 4, "need at least"),
        ([3.0, 2.0], 0, "num_classes=0 must be at least 1"),
        ([[3.0, 2.0]], 1, "finite 1-D"),
        ([3.0, np.nan], 1, "finite 1-D"),
    ],
)
def test_outlier_split_errors(values, k, match):
    with pytest.raises(ValueError, match=match):
        hs.outlier_split(values, num_classes=k)


def test_subspace_overlap_closed_forms(rng):
    """cos^2 of the angle for lines; 1 for the same space in another basis (rotated within,
    signs flipped); 1 for a space inside a larger one; 0 for orthogonal spaces; about k/n for
    random spaces."""
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    a = q[:, :5].T
    theta = 0.3
    line_a = q[:, 0]
    line_b = np.cos(theta) * q[:, 0] + np.sin(theta) * q[:, 1]
    assert hs.subspace_overlap(line_a[None], line_b[None]) == pytest.approx(np.cos(theta) ** 2)
    rot, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    assert hs.subspace_overlap(a, -(rot @ a)) == pytest.approx(1.0, abs=1e-12)
    assert hs.subspace_overlap(a[:2], a) == pytest.approx(1.0, abs=1e-12)
    assert hs.subspace_overlap(a, q[:, 5:10].T) == pytest.approx(0.0, abs=1e-12)
    n, k = 2000, 10
    rand = [np.linalg.qr(rng.standard_normal((n, k)))[0].T for _ in range(2)]
    assert hs.subspace_overlap(*rand) == pytest.approx(k / n, rel=0.5)
    with pytest.raises(ValueError, match="not orthonormal"):
        hs.subspace_overlap(2 * a, a)
    with pytest.raises(ValueError, match="same n"):
        hs.subspace_overlap(a, a[:, :-1])


def test_js_distance_closed_form():
    """Uniform on [0, 2] against uniform on [1, 3]: the divergence is 1/2 bit, the distance
    sqrt(1/2); equal densities are at 0 and disjoint ones at 1."""
    grid = np.linspace(-1.0, 4.0, 50001)
    p = ((grid >= 0) & (grid <= 2)) / 2.0
    q = ((grid >= 1) & (grid <= 3)) / 2.0
    r = ((grid >= 3.5) & (grid <= 4.0)) * 2.0
    dist = hs.density_js_distance(np.stack([p, q, p, r]), grid)
    assert dist[0, 1] == pytest.approx(np.sqrt(0.5), abs=1e-3)
    assert dist[0, 2] == 0.0 and dist[0, 3] == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_array_equal(dist, dist.T)
    np.testing.assert_array_equal(np.diag(dist), 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        hs.density_js_distance(np.stack([p, -q]), grid)
