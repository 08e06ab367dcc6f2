"""Sharpness tracked during training: the largest Hessian eigenvalue of the training
objective every few steps, each solve warm-started from the previous top eigenvector.

Gradient descent with step ``lr`` on a quadratic with Hessian ``H`` is stable only while
``lambda_max(H) < 2 / lr`` (heavy-ball momentum ``beta``: ``(2 + 2 beta) / lr``;
:func:`hessspec.nn.train.stability_threshold`). Cohen et al. 2021 ("Gradient descent on
neural networks typically occurs at the edge of stability") found that full-batch gradient
descent on neural networks raises the sharpness until it reaches that threshold and then
hovers there. Tracking it needs ``lambda_max`` at many steps; between two nearby steps the
top eigenvector barely moves, so a Lanczos run started from the previous one converges in a
few Hessian-vector products, and (compile once) every solve reuses the same compiled
programs: the operator is a pytree whose leaves are the parameters of the step.

:class:`SharpnessTracker` does this for any ``loss_fn(params, batch)``;
:func:`sharpness_observer` makes it an observer of :func:`hessspec.nn.loop.optimize` /
:func:`hessspec.nn.train.train` (``observe=``, ``observe_at=``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

__all__ = ["SharpnessEstimate", "SharpnessTracker", "sharpness_observer", "tracking_steps"]


class SharpnessEstimate(NamedTuple):
    """``lambda_max`` of the Hessian at one parameter point (NumPy / Python values).

    Attributes:
        value: the largest (algebraic) eigenvalue ``theta``.
        residual: ``||H v - theta v||`` of its eigenvector ``v`` (computed).
        converged: whether the residual met the solver's tolerance.
        vector: ``(dim,)`` the unit eigenvector (the next solve starts from it).
    """

    value: float
    residual: float
    converged: bool
    vector: np.ndarray


class SharpnessTracker:
    """``lambda_max`` of ``loss_fn`` over ``data`` at successive parameters, each solve
    started from the previous top eigenvector (the first from a random vector, verified).

    Args:
        loss_fn: ``loss_fn(params, batch) -> ()`` mean loss (a stable object, e.g. an
            :class:`~hessspec.nn.objective.Objective`'s ``loss_fn``, so every solve reuses
            the compiled programs).
        data: the examples the objective averages over (a pytree, leading axis examples).
        batch_size: examples per Hessian-vector product chunk (None: all at once). With
            BatchNorm in train mode it also fixes the partition the objective is defined
            on (see :func:`hessspec.hessian_operator`).
        tol: relative residual tolerance of each solve.
    """

    def __init__(self, loss_fn, data, *, batch_size: int | None = None, tol: float = 1e-3):
        self.loss_fn, self.data, self.batch_size, self.tol = loss_fn, data, batch_size, tol
        self.vector: np.ndarray | None = None

    def __call__(self, params: Any) -> SharpnessEstimate:
        """``lambda_max`` of the Hessian at ``params`` (a pytree like the loss's)."""
        import hessspec as hs

        op = hs.hessian_operator(self.loss_fn, params, self.data, self.batch_size)
        warm = self.vector is not None and self.vector.shape == (op.dim,)
        eig = hs.top_eigenpairs(
            op,
            1,
            tol=self.tol,
            start_vector=self.vector if warm else None,
            verify=not warm,
            progress=False,
        )
        self.vector = np.asarray(eig.vectors[0])
        return SharpnessEstimate(
            float(eig.values[0]), float(eig.residuals[0]), bool(eig.converged[0]), self.vector
        )


def tracking_steps(num_steps: int, every: int) -> list[int]:
    """The steps ``0, every, 2 every, ...`` up to and including ``num_steps``.

    Raises:
        ValueError: ``every < 1``.
    """
    if every < 1:
        raise ValueError(f"sharpness tracking needs every >= 1 step, got {every}.")
    steps = list(range(0, num_steps + 1, every))
    return steps if steps[-1] == num_steps else [*steps, num_steps]


def sharpness_observer(
    tracker: SharpnessTracker, record: list | None = None
) -> Callable[[Any], float]:
    """An observer for :func:`hessspec.nn.loop.optimize` (``observe=``): ``lambda_max`` at
    the observed step's parameters, recorded by the loop as ``(step, lambda_max)``.

    Args:
        tracker: the tracker that solves.
        record: a list that receives ``(step, SharpnessEstimate)`` as well, kept however
            the training ends (a diverging run keeps what it measured before).
    """

    def observe(seen) -> float:
        seen.status(f"sharpness at step {seen.step}")
        estimate = tracker(seen.params)
        if record is not None:
            record.append((int(seen.step), estimate))
        return estimate.value

    return observe
