"""Closed-form predictions that the measured spectra are compared against.

Pure numpy functions, no JAX: random-matrix laws for the input correlation matrix of a
linear model (Marchenko-Pastur bulk, LeCun's outlier from a non-zero input mean) and the
quadratic-model facts that turn eigenvalues into statements about gradient descent
(largest stable step, slowest time constant, steps to a tolerance).

Notation, as in docs/design.md: a linear model with squared loss on ``p`` samples of ``N`` inputs
``X in R^{p x N}`` has Hessian ``R = X^T X / p`` (``N x N``, LeCun, Kanter & Solla 1991).
``ratio = N / p``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = [
    "GDConvergence",
    "InputCorrelationPrediction",
    "MarchenkoPastur",
    "gd_steps_to_tolerance",
    "input_correlation_spectrum_prediction",
    "lecun_outlier",
    "marchenko_pastur",
    "slowest_time_constant",
    "stable_learning_rate",
]


def check_positive(name: str, value) -> float:
    """``float(value)``; TypeError if it is not a real number, ValueError unless it is finite
    and > 0 (the message names ``name``)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}.") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}.")
    return value


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


class MarchenkoPastur(NamedTuple):
    """The Marchenko-Pastur law of ``R = X^T X / p`` for ``X`` with i.i.d. entries of mean 0
    and variance ``v``, in the limit ``N, p -> inf`` with ``N / p -> ratio = y``.

    The continuous part lives on ``[a, b]``, ``a, b = v (1 -+ sqrt(y))^2``, with density

        f(x) = sqrt((b - x)(x - a)) / (2 pi v y x),

    which integrates to ``min(1, 1/y)``; for ``y > 1`` (fewer samples than inputs) the rest,
    ``1 - 1/y = 1 - p/N``, is an atom at zero (``R`` has rank ``p``).

    Attributes:
        ratio: ``y = N / p``.
        variance: ``v``, the variance of the entries.
        lower_edge: ``a = v (1 - sqrt(y))^2``.
        upper_edge: ``b = v (1 + sqrt(y))^2``.
        zero_mass: ``max(0, 1 - 1/y)``, the mass of the atom at 0.
    """

    ratio: float
    variance: float
    lower_edge: float
    upper_edge: float
    zero_mass: float

    def density(self, x) -> np.ndarray:
        """Density of the continuous part, ``f(x)`` above; 0 outside ``(a, b)``.

        Args:
            x: array of any shape.

        Returns:
            Array shaped like ``x`` (float64); it integrates to ``1 - zero_mass`` (the atom
            at 0 is not a density and is left out, see :meth:`cdf`).
        """
        x = np.asarray(x, dtype=np.float64)
        a, b = self.lower_edge, self.upper_edge
        inside = (x > a) & (x < b)
        xi = np.where(inside, x, 0.5 * (a + b))  # a safe value off the support
        f = np.sqrt((b - xi) * (xi - a)) / (2.0 * np.pi * self.variance * self.ratio * xi)
        return np.where(inside, f, 0.0)

    def cdf(self, x) -> np.ndarray:
        """Cumulative distribution ``P(lambda <= x)``, the atom at 0 included.

        Closed form of ``int_a^x f``, in units ``u = x / v`` (edges ``a, b`` in the same
        units, ``c = (a + b)/2 = 1 + y``, ``r = (b - a)/2 = 2 sqrt(y)``, ``sqrt(ab) = |1-y|``):

            2 pi y F(u) = sqrt((b-u)(u-a)) + c (asin((u-c)/r) + pi/2)
                          - sqrt(ab) (asin(((a+b) u - 2ab) / ((b-a) u)) + pi/2),

        which at ``u = b`` gives ``pi (c - |1-y|) = 2 pi min(1, y)``, i.e. total mass
        ``min(1, 1/y)``. For Kolmogorov tests with ``y <= 1``:
        ``scipy.stats.kstest(eigs, mp.cdf)``; with an atom (``y > 1``) kstest's continuity
        assumption fails at 0, so test the non-zero eigenvalues against :meth:`bulk_cdf`.

        Args:
            x: array of any shape.

        Returns:
            Array shaped like ``x`` with values in ``[0, 1]``, non-decreasing in ``x``.
        """
        u = np.asarray(x, dtype=np.float64) / self.variance
        y = self.ratio
        a, b = (1.0 - math.sqrt(y)) ** 2, (1.0 + math.sqrt(y)) ** 2
        c, r, sab = 1.0 + y, 2.0 * math.sqrt(y), abs(1.0 - y)
        inside = (u > a) & (u < b)
        ui = np.where(inside, u, 0.5 * (a + b))
        t1 = np.sqrt((b - ui) * (ui - a))
        t2 = c * (np.arcsin(np.clip((ui - c) / r, -1.0, 1.0)) + 0.5 * np.pi)
        arg = ((a + b) * ui - 2.0 * a * b) / ((b - a) * ui)
        t3 = sab * (np.arcsin(np.clip(arg, -1.0, 1.0)) + 0.5 * np.pi)
        continuous_mass = 1.0 - self.zero_mass
        cont = np.where(inside, (t1 + t2 - t3) / (2.0 * np.pi * y), 0.0)
        cont = np.where(u >= b, continuous_mass, np.clip(cont, 0.0, continuous_mass))
        return np.where(u >= 0.0, self.zero_mass, 0.0) + cont

    def bulk_cdf(self, x) -> np.ndarray:
        """CDF of the continuous part alone, renormalised to 1: the law of the non-zero
        eigenvalues, ``(cdf(x) - zero_mass) / (1 - zero_mass)`` for ``x >= 0``.

        Args:
            x: array of any shape.

        Returns:
            Array shaped like ``x``, 0 below ``lower_edge`` and 1 from ``upper_edge`` on.
        """
        x = np.asarray(x, dtype=np.float64)
        continuous = self.cdf(x) - np.where(x >= 0.0, self.zero_mass, 0.0)
        return continuous / (1.0 - self.zero_mass)


def marchenko_pastur(ratio: float, variance: float = 1.0) -> MarchenkoPastur:
    """The Marchenko-Pastur law for ``ratio = N / p`` and entry variance ``variance``.

    Args:
        ratio: ``y = N / p`` (N inputs, p samples), > 0.
        variance: ``v``, the variance of the i.i.d. entries, > 0.

    Returns:
        A :class:`MarchenkoPastur` with edges ``v (1 -+ sqrt(y))^2``, the zero mass
        ``max(0, 1 - 1/y)``, and ``density``/``cdf`` methods.

    Raises:
        ValueError: ``ratio <= 0`` or ``variance <= 0`` (or not finite).
    """
    y = check_positive("ratio", ratio)
    v = check_positive("variance", variance)
    return MarchenkoPastur(
        ratio=y,
        variance=v,
        lower_edge=v * (1.0 - math.sqrt(y)) ** 2,
        upper_edge=v * (1.0 + math.sqrt(y)) ** 2,
        zero_mass=max(0.0, 1.0 - 1.0 / y),
    )


def lecun_outlier(num_inputs: int, mean: float, variance: float) -> float:
    """LeCun, Kanter & Solla's outlier eigenvalue of the input correlation matrix.

    Inputs ``x in R^N`` with i.i.d. components of mean ``m`` and variance ``v`` have second
    moment ``E[x x^T] = v I + m^2 1 1^T``; ``R = X^T X / p`` approaches it for many samples.
    ``1 1^T`` has eigenvalue ``N`` along ``1 / sqrt(N)`` and 0 on its complement, so ``R``
    has one eigenvalue ``v + N m^2`` along ``1 / sqrt(N)``: it grows with the number of
    inputs while the rest stay near ``v`` (spread by Marchenko-Pastur at finite ``p``), and
    it sets the largest stable learning rate. Centering the inputs (``m = 0``) removes it.

    Args:
        num_inputs: ``N``, the input dimension.
        mean: ``m``, the mean of each input component (any sign; only ``m^2`` enters).
        variance: ``v >= 0``, the variance of each component.

    Returns:
        ``N m^2 + v``.

    Raises:
        ValueError: ``num_inputs < 1``, negative ``variance`` or non-finite inputs.
    """
    n = _positive_int("num_inputs", num_inputs)
    m, v = float(mean), float(variance)
    if not (math.isfinite(m) and math.isfinite(v)) or v < 0.0:
        raise ValueError(
            f"mean must be finite and variance finite and >= 0, got {mean}, {variance}."
        )
    return n * m * m + v


class InputCorrelationPrediction(NamedTuple):
    """Predicted spectrum of ``R = X^T X / p`` for inputs with mean ``m``, variance ``v``.

    Attributes:
        num_inputs: ``N``.
        num_samples: ``p``.
        ratio: ``y = N / p``.
        outlier: LeCun's ``N m^2 + v`` (the population eigenvalue along ``1 / sqrt(N)``).
        outlier_finite_ratio: the outlier's limit at finite ``y`` (Baik-Ben Arous-Peche /
            Benaych-Georges-Nadakuditi for the rank-one mean ``m 1 1^T``):
            ``(v + N m^2)(1 + y v / (N m^2))``, which tends to ``outlier`` for
            ``N m^2 >> v y``; NaN when the outlier is not separated.
        outlier_separated: ``N m^2 > v sqrt(y)``, the threshold above which the outlier leaves
            the bulk (below it, it sticks to the upper edge).
        lower_edge, upper_edge: Marchenko-Pastur edges ``v (1 -+ sqrt(y))^2`` of the bulk.
        zero_mass: fraction ``max(0, 1 - p/N)`` of zero eigenvalues (``R`` has rank ``p``).
    """

    num_inputs: int
    num_samples: int
    ratio: float
    outlier: float
    outlier_finite_ratio: float
    outlier_separated: bool
    lower_edge: float
    upper_edge: float
    zero_mass: float


def input_correlation_spectrum_prediction(
    num_inputs: int, num_samples: int, mean: float, variance: float
) -> InputCorrelationPrediction:
    """Outlier plus bulk of the Hessian ``R = X^T X / p`` of a linear model, squared loss.

    ``X = m 1_p 1_N^T + Z`` with ``Z`` i.i.d. of mean 0 and variance ``v``: the bulk of ``R``
    follows Marchenko-Pastur with ``y = N / p`` (a rank-one mean moves one eigenvalue only,
    by interlacing), and the mean gives one outlier near ``N m^2 + v`` (see
    :func:`lecun_outlier`). For ``p < N`` a fraction ``1 - p/N`` of the eigenvalues is 0.

    Args:
        num_inputs: ``N >= 1``.
        num_samples: ``p >= 1``.
        mean: ``m``; 0 for centred inputs (then ``outlier_separated`` is False).
        variance: ``v > 0``.

    Returns:
        An :class:`InputCorrelationPrediction`.

    Raises:
        ValueError: non-positive sizes or variance, non-finite mean.
    """
    n = _positive_int("num_inputs", num_inputs)
    p = _positive_int("num_samples", num_samples)
    v = check_positive("variance", variance)
    mp = marchenko_pastur(n / p, v)
    outlier = lecun_outlier(n, mean, v)
    spike = outlier - v  # N m^2
    separated = spike > v * math.sqrt(mp.ratio)
    finite = outlier * (1.0 + mp.ratio * v / spike) if separated else math.nan
    return InputCorrelationPrediction(
        num_inputs=n,
        num_samples=p,
        ratio=mp.ratio,
        outlier=outlier,
        outlier_finite_ratio=finite,
        outlier_separated=bool(separated),
        lower_edge=mp.lower_edge,
        upper_edge=mp.upper_edge,
        zero_mass=mp.zero_mass,
    )


def stable_learning_rate(lambda_max: float) -> float:
    """Largest stable learning rate of gradient descent on a quadratic, ``2 / lambda_max``.

    GD on ``0.5 (x - x*)^T H (x - x*)`` multiplies the error component along an eigenvector
    of eigenvalue ``lambda`` by ``1 - lr lambda`` each step; all components shrink iff
    ``|1 - lr lambda| < 1`` for every ``lambda``, i.e. ``0 < lr < 2 / lambda_max``.

    Args:
        lambda_max: the largest Hessian eigenvalue, > 0.

    Returns:
        ``2 / lambda_max`` (GD diverges along the top eigenvector for larger steps).

    Raises:
        ValueError: ``lambda_max <= 0`` (no positive curvature bounds the step).
    """
    return 2.0 / check_positive("lambda_max", lambda_max)


def slowest_time_constant(lr: float, lambda_min_positive: float) -> float:
    """Time constant ``1 / (lr lambda_min+)`` of the slowest-converging direction.

    Along the smallest positive eigenvalue the error decays as
    ``(1 - lr lambda)^t ~ exp(-t lr lambda)`` for ``lr lambda << 1``: it shrinks by ``e`` every
    ``1 / (lr lambda)`` steps. With ``lr`` at its stable limit ``~ 1 / lambda_max`` this is
    the condition number ``lambda_max / lambda_min+`` in steps.

    Args:
        lr: learning rate, > 0.
        lambda_min_positive: smallest positive Hessian eigenvalue, > 0 (zero eigenvalues are
            flat directions that GD never moves and the loss does not see).

    Returns:
        ``1 / (lr * lambda_min_positive)``, in steps.

    Raises:
        ValueError: a non-positive argument.
    """
    return 1.0 / (
        check_positive("lr", lr) * check_positive("lambda_min_positive", lambda_min_positive)
    )


class GDConvergence(NamedTuple):
    """Worst-case convergence of gradient descent on a quadratic.

    Attributes:
        steps: smallest ``t`` with ``rate^t <= tol`` (an int), or ``math.inf`` when
            ``rate >= 1`` (no convergence: ``lr >= 2 / lambda_max`` diverges or oscillates).
        rate: ``max_i |1 - lr lambda_i|`` over the non-null eigenvalues, the per-step
            contraction factor of the parameter error.
        limiting_eigenvalue: the eigenvalue attaining ``rate`` (``lambda_min+`` when
            ``lr`` is small, ``lambda_max`` when ``lr`` is near ``2 / lambda_max``).
        num_null: how many eigenvalues were treated as 0 and ignored.
    """

    steps: int | float
    rate: float
    limiting_eigenvalue: float
    num_null: int


def gd_steps_to_tolerance(
    eigenvalues, lr: float, tol: float, *, null_rtol: float = 1e-10
) -> GDConvergence:
    """Steps of gradient descent on a quadratic until the error ratio is at most ``tol``.

    On ``0.5 (x - x*)^T H (x - x*)`` with eigenpairs ``(lambda_i, q_i)`` the error
    ``e_t = x_t - x*`` has components ``q_i^T e_t = (1 - lr lambda_i)^t q_i^T e_0``, so in the
    worst case over ``e_0`` (within the non-null space)

        ||e_t|| / ||e_0|| = rate^t,    rate = max_i |1 - lr lambda_i|,

    and ``steps = ceil(log(tol) / log(rate))``, the smallest ``t`` with ``rate^t <= tol``.
    The loss ratio is ``<= rate^(2t)``. Eigenvalues with ``|lambda| <= null_rtol *
    lambda_max`` are null directions (``p < N`` in LeCun's setting): GD never moves them
    and the loss does not depend on them, so they are left out. Comparing biased and
    centred inputs: the biased outlier ``N m^2 + v`` caps ``lr`` at ``2 / (N m^2 + v)``, so
    the bulk converges ``~ N m^2 / v`` times slower than after centring.

    Args:
        eigenvalues: Hessian eigenvalues, any shape, ``>= 0`` (up to ``null_rtol``) with a
            positive maximum.
        lr: learning rate, > 0.
        tol: target error ratio, in ``(0, 1)``.
        null_rtol: relative threshold below which an eigenvalue counts as 0.

    Returns:
        A :class:`GDConvergence`.

    Raises:
        ValueError: empty or non-finite eigenvalues, a negative eigenvalue (the quadratic
            has no minimum), no positive eigenvalue, ``lr <= 0``, ``tol`` outside ``(0, 1)``.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64).ravel()
    lr = check_positive("lr", lr)
    tol = float(tol)
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tol must lie in (0, 1), got {tol!r}.")
    if lam.size == 0 or not np.all(np.isfinite(lam)):
        raise ValueError("eigenvalues must be a non-empty array of finite numbers.")
    lam_max = float(lam.max())
    if lam_max <= 0.0:
        raise ValueError(f"eigenvalues need a positive maximum, got max {lam_max!r}.")
    threshold = float(null_rtol) * lam_max
    if float(lam.min()) < -threshold:
        raise ValueError(
            f"negative eigenvalue {float(lam.min())!r}: the quadratic has no minimum and GD "
            "diverges along it; gd_steps_to_tolerance needs a positive semidefinite Hessian."
        )
    active = lam[lam > threshold]
    factors = np.abs(1.0 - lr * active)
    i = int(np.argmax(factors))
    rate = float(factors[i])
    if rate >= 1.0:
        steps: int | float = math.inf
    elif rate == 0.0:
        steps = 1
    else:
        steps = max(1, math.ceil(math.log(tol) / math.log(rate)))
        # Guard the ceiling against rounding in the ratio of logarithms.
        while steps > 1 and rate ** (steps - 1) <= tol:
            steps -= 1
        while rate**steps > tol:
            steps += 1
    return GDConvergence(
        steps=steps,
        rate=rate,
        limiting_eigenvalue=float(active[i]),
        num_null=int(lam.size - active.size),
    )
