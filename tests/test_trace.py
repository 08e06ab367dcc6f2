"""Hutchinson and Hutch++ trace estimates against the exact trace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import counting_operator, dense_op, matrix_with_spectrum

import hessspec as hs

N = 200
BUDGET = 150


@pytest.fixture(scope="module")
def low_rank_plus_noise():
    """Ten eigenvalues in [50, 100] over a small symmetric bulk: a Hessian-like spectrum."""
    rng = np.random.default_rng(0)
    spec = np.concatenate([rng.uniform(50.0, 100.0, 10), rng.normal(0.0, 0.3, N - 10)])
    a, ev, _ = matrix_with_spectrum(spec)
    return a, ev


def test_estimates_within_three_stderr(low_rank_plus_noise):
    a, ev = low_rank_plus_noise
    exact = ev.sum()
    op = dense_op(a)
    hutch = hs.trace(op, num_matvecs=BUDGET, method="hutchinson")
    plus = hs.trace(op, num_matvecs=BUDGET, method="hutch++")
    for est in (hutch, plus):
        assert est.num_matvecs == BUDGET
        assert abs(est.value - exact) <= 3 * est.stderr, (est, exact)
    # Hutchinson's stderr matches its theory: sqrt(2 (||A||_F^2 - sum_i A_ii^2) / m)
    theory = np.sqrt(2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)) / BUDGET)
    assert hutch.stderr == pytest.approx(theory, rel=0.3)
    # deflating the ten large eigenvalues leaves only the small bulk: far smaller error bars
    assert plus.stderr < hutch.stderr / 10


def test_hutchpp_exact_when_sketch_spans_everything(low_rank_plus_noise):
    a, ev = low_rank_plus_noise
    est = hs.trace(dense_op(a), num_matvecs=3 * N)
    assert est.num_matvecs == 2 * N + 2
    assert est.value == pytest.approx(ev.sum(), rel=1e-12)
    assert est.stderr <= 1e-10


def test_plain_callable_keys_and_no_recompilation(low_rank_plus_noise):
    a = jnp.asarray(low_rank_plus_noise[0])
    matvec, op, traces = counting_operator(a)
    first = hs.trace(op, num_matvecs=BUDGET)
    count = len(traces)
    again = hs.trace(op, num_matvecs=BUDGET)
    other = hs.trace(op, num_matvecs=BUDGET, key=jax.random.key(7))
    assert len(traces) == count, "a second call on the same operator recompiled"
    assert first == again  # key=None is a fixed key
    assert other.value != first.value
    direct = hs.trace(matvec, num_matvecs=BUDGET, dim=N)
    assert direct.value == pytest.approx(first.value, rel=1e-12)
    hs.trace(op, num_matvecs=BUDGET // 2)
    hs.trace(op, num_matvecs=BUDGET, method="hutchinson")
    assert len(traces) == count, "another budget or method recompiled"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "exact"}, "must be 'hutch\\+\\+' or 'hutchinson'"),
        ({"method": "hutchinson", "num_matvecs": 1}, "too small for Hutchinson"),
        ({"method": "hutch++", "num_matvecs": 3}, "too small for Hutch\\+\\+"),
    ],
)
def test_trace_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hs.trace(dense_op(np.eye(4)), **kwargs)


def test_nan_matvec_raises(low_rank_plus_noise):
    a = np.array(low_rank_plus_noise[0])
    a[2, 3] = np.inf
    with pytest.raises(FloatingPointError, match="Hessian-vector product .* not finite"):
        hs.trace(dense_op(a), num_matvecs=BUDGET)
