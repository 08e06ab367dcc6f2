"""Part 1 of the input-bias study: a linear model with squared loss on synthetic Gaussian
inputs, biased (mean ``m``) and centred (mean 0, the same noise draws).

The Hessian of ``0.5 mean_i (w^T x_i - y_i)^2`` is exactly ``R = X^T X / p``. It is measured
through :func:`hessspec.hessian_operator` only: Lanczos for the two largest and the smallest
eigenvalue, SLQ for the density; then compared with the closed forms of
:mod:`hessspec.analysis.theory`: the biased outlier against ``N m^2 + v``, the bulk edges
against Marchenko-Pastur ``v (1 -+ sqrt(N/p))^2``. Plain gradient descent at
``lr = 1 / lambda_max`` (measured) is run until ``||w_t - w*|| <= tol ||w_0 - w*||`` and its
step count set against :func:`hessspec.analysis.theory.gd_steps_to_tolerance`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from hessspec.studies.common.checks import dtype_of
from hessspec.studies.input_bias.config import InputBiasConfig, LinearSettings

__all__ = ["relative_error", "run_gradient_descent", "run_linear", "slq_record"]


def relative_error(measured: float, predicted: float) -> float:
    """``|measured - predicted| / |predicted|``."""
    return abs(measured - predicted) / abs(predicted)


def run_gradient_descent(
    loss_fn,
    params: Any,
    batch: Any,
    lr: float,
    target: Any,
    tol: float,
    max_steps: int,
    chunk: int = 500,
) -> dict[str, Any]:
    """Full-batch gradient descent ``w <- w - lr grad L(w)`` (``optax.sgd(lr)`` through
    :func:`hessspec.nn.loop.optimize`) until the parameter error ratio
    ``||w_t - w*|| / ||w_0 - w*||`` is at most ``tol``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the start ``w_0`` (any pytree).
        batch: the whole data set, passed to ``loss_fn``: a pytree of arrays with a common
            leading axis, or one with none (``{}``).
        lr: the learning rate.
        target: ``w*``, a pytree like ``params`` or a flat vector.
        tol: the error ratio to reach, in ``(0, 1)``.
        max_steps: the step budget.
        chunk: steps per compiled ``lax.scan`` call.

    Returns:
        ``{"steps": int or None (not reached within max_steps), "error_ratio": list of
        ||w_t - w*|| / ||w_0 - w*|| for t = 0..last step run, "final_error_ratio",
        "initial_error": ||w_0 - w*||, "final_loss": the loss at the last iterate (that of
        the stopping step)}``.

    Raises:
        FloatingPointError: the loss or the error ratio became non-finite.
    """
    import optax

    from hessspec.nn.loop import optimize

    w0 = ravel_pytree(params)[0]
    w_star = jnp.asarray(
        target if isinstance(target, np.ndarray | jax.Array) else ravel_pytree(target)[0],
        w0.dtype,
    ).reshape(w0.shape)
    e0 = float(jnp.linalg.norm(w0 - w_star))

    def error_ratio(p):
        return jnp.linalg.norm(ravel_pytree(p)[0] - w_star) / e0

    result = optimize(
        loss_fn,
        params,
        optax.sgd(lr),
        batch,
        num_steps=max_steps,
        chunk=chunk,
        metric=error_ratio,
        stop_when=lambda ratio: ratio <= tol,
        divergence_hint=f"gradient descent diverged at lr = {lr}",
    )
    ratios = [1.0, *result.metrics.tolist()]
    if not np.all(np.isfinite(ratios)):
        raise FloatingPointError(f"gradient descent diverged at lr = {lr}.")
    return {
        "steps": result.stopped_at,
        "error_ratio": ratios,
        "final_error_ratio": ratios[-1],
        "initial_error": e0,
        "final_loss": float(loss_fn(result.params, batch)),
    }


def slq_record(sd) -> dict[str, Any]:
    """What results.json keeps of a :class:`hessspec.linalg.density.SpectralDensity`: the
    quadrature ``nodes`` and ``weights`` ``(num_probes, num_steps)``, Ghorbani's default
    width and the sizes; :func:`hessspec.studies.input_bias.plots.density_from_record`
    redraws the density from it."""
    return {
        "nodes": sd.nodes,
        "weights": sd.weights,
        "default_sigma": sd.default_sigma,
        "num_probes": sd.num_probes,
        "num_steps": int(sd.nodes.shape[1]),
    }


def _problem(cfg: LinearSettings, mean: float, seed: int):
    """``(data, objective, operator)`` of one variant: ``p`` samples of ``N`` Gaussian
    inputs of mean ``mean`` and variance ``v``, teacher targets, a bias-free linear model."""
    import hessspec as hs
    from hessspec.nn.data import synthetic_gaussian
    from hessspec.nn.models import make_model
    from hessspec.nn.objective import make_objective

    dtype = dtype_of(cfg.dtype)
    n, p = cfg.num_inputs, cfg.num_samples
    data = synthetic_gaussian(
        p, n, mean=mean, variance=cfg.variance, seed=seed, targets="teacher", dtype=np.dtype(dtype)
    )
    model = make_model("linear", (n,), 0, False, seed=seed, dtype=dtype, use_bias=False)
    obj = make_objective(model, "mse")
    return data, obj, hs.hessian_operator(obj.loss_fn, obj.params, data.batch)


def _measure(op, cfg: LinearSettings, key, pred, *, biased: bool) -> dict[str, Any]:
    """Lanczos for the two largest and the smallest eigenvalue, SLQ for the density, and
    the SLQ mass above the midpoint between the bulk edge and the outlier (theory: 1/N)."""
    import hessspec as hs

    k_top, k_bot, k_slq = jax.random.split(key, 3)
    steps = cfg.lanczos_steps or None
    t0 = time.perf_counter()
    top = hs.top_eigenpairs(op, 2, num_steps=steps, key=k_top)
    bottom = hs.top_eigenpairs(op, 2, num_steps=steps, key=k_bot, which="smallest")
    t_lanczos = time.perf_counter() - t0
    t0 = time.perf_counter()
    sd = hs.spectral_density(op, num_probes=cfg.slq_probes, num_steps=cfg.slq_steps, key=k_slq)
    t_slq = time.perf_counter() - t0
    points, masses = sd.quadrature()
    cut = pred.upper_edge + 0.5 * (pred.outlier - pred.upper_edge) if biased else math.inf
    lam1, lam2, lam_min = float(top.values[0]), float(top.values[1]), float(bottom.values[0])
    return {
        "lanczos": {
            "top_values": top.values,
            "top_residuals": top.residuals,
            "top_converged": top.converged,
            "smallest_value": lam_min,
            "smallest_residual": float(bottom.residuals[0]),
            "smallest_converged": bool(bottom.converged[0]),
            "num_matvecs": int(top.num_matvecs + bottom.num_matvecs),
            "seconds": t_lanczos,
        },
        "lambda_max": lam1,
        "lambda_2": lam2,
        "lambda_min": lam_min,
        "upper_bulk_edge": lam2 if biased else lam1,
        "upper_bulk_edge_source": "lambda_2" if biased else "lambda_max",
        "slq": {
            **slq_record(sd),
            "dim": op.dim,
            "seconds": t_slq,
            "outlier_mass": float(masses[points > cut].sum()) if biased else 0.0,
        },
    }


def _dense_check(dense: np.ndarray, measured: Mapping[str, Any]) -> dict[str, float]:
    """The dense spectrum's extremes and their largest distance to the Lanczos values."""
    pairs = ((dense[-1], "lambda_max"), (dense[-2], "lambda_2"), (dense[0], "lambda_min"))
    return {
        "lambda_max": float(dense[-1]),
        "lambda_2": float(dense[-2]),
        "lambda_min": float(dense[0]),
        "max_abs_diff_lanczos": float(max(abs(d - measured[k]) for d, k in pairs)),
    }


def _gradient_descent(data, obj, cfg: LinearSettings, measured, pred, dense) -> dict[str, Any]:
    """GD at lr = 1 / lambda_max (measured) from the model's initialisation to the
    least-squares solution ``w*`` (float64 on the host), with the worst-case step bounds
    from the measured, the theoretical and (when computed) the dense eigenvalues."""
    from hessspec.analysis.theory import gd_steps_to_tolerance

    lam1, lam_min = measured["lambda_max"], measured["lambda_min"]
    w_star, *_ = np.linalg.lstsq(
        np.asarray(data.x, np.float64), np.asarray(data.y, np.float64), rcond=None
    )
    lr = 1.0 / lam1
    t0 = time.perf_counter()
    target = np.asarray(w_star, np.dtype(dtype_of(cfg.dtype)))
    gd = run_gradient_descent(
        obj.loss_fn, obj.params, data.batch, lr, target, cfg.gd_tolerance, cfg.gd_max_steps
    )
    t_gd = time.perf_counter() - t0
    predicted_top = pred.outlier if measured["mean"] != 0.0 else pred.upper_edge
    bound_theory = gd_steps_to_tolerance(
        [pred.lower_edge, predicted_top], 1.0 / predicted_top, cfg.gd_tolerance
    )
    out = {
        "learning_rate": lr,
        "stable_learning_rate": 2.0 / lam1,
        "tolerance": cfg.gd_tolerance,
        "steps": gd["steps"],
        "error_ratio": gd["error_ratio"],
        "initial_error": gd["initial_error"],
        "seconds": t_gd,
        "bound_from_measured_eigenvalues": gd_steps_to_tolerance(
            [lam_min, lam1], lr, cfg.gd_tolerance
        )._asdict(),
        "bound_from_theory": bound_theory._asdict(),
        "slowest_time_constant": lam1 / lam_min,
    }
    if dense is not None:
        out["bound_from_dense_spectrum"] = gd_steps_to_tolerance(
            dense, lr, cfg.gd_tolerance
        )._asdict()
    return out


def linear_variant(cfg: LinearSettings, mean: float, seed: int, key) -> dict[str, Any]:
    """Everything measured for one variant (inputs of mean ``mean``): the prediction, the
    Lanczos and SLQ measurements, the optional dense check, the GD run and its bounds."""
    from hessspec.analysis.theory import input_correlation_spectrum_prediction

    data, obj, op = _problem(cfg, mean, seed)
    n, p, v = cfg.num_inputs, cfg.num_samples, cfg.variance
    pred = input_correlation_spectrum_prediction(n, p, mean, v)
    out: dict[str, Any] = {"mean": mean, "dim": op.dim, "prediction": pred._asdict()}
    out.update(_measure(op, cfg, key, pred, biased=mean != 0.0))
    dense = None
    if cfg.dense_check:
        dense = np.linalg.eigvalsh(np.asarray(op.to_dense(), np.float64))
        out["dense"] = _dense_check(dense, out)
    out["gd"] = _gradient_descent(data, obj, cfg, out, pred, dense)
    return out


#: ``(variant, quantity, measured key, predicted key)`` of the agreements with theory.
AGREEMENTS = (
    ("biased", "outlier lambda_1 vs N m^2 + v", "lambda_max", "outlier"),
    ("biased", "2nd eigenvalue vs MP upper edge", "lambda_2", "upper_edge"),
    ("biased", "smallest eigenvalue vs MP lower edge", "lambda_min", "lower_edge"),
    ("centered", "largest eigenvalue vs MP upper edge", "lambda_max", "upper_edge"),
    ("centered", "smallest eigenvalue vs MP lower edge", "lambda_min", "lower_edge"),
)


def _agreements(variants: Mapping[str, Any], cfg: LinearSettings) -> list[dict]:
    rows = []
    for variant, quantity, measured_key, predicted_key in AGREEMENTS:
        measured = variants[variant][measured_key]
        predicted = variants[variant]["prediction"][predicted_key]
        error = relative_error(measured, predicted)
        rows.append(
            {
                "variant": variant,
                "quantity": quantity,
                "measured": measured,
                "predicted": predicted,
                "relative_error": error,
                "within_tolerance": error <= cfg.tolerance,
            }
        )
    return rows


def run_linear(config: InputBiasConfig, bar) -> dict[str, Any]:
    """Part 1, both variants (``results["linear"]``); ``bar`` is a tqdm bar advanced once
    per variant."""
    cfg = config.linear
    key = jax.random.key(config.seed)
    variants = {}
    for name, mean in (("biased", cfg.mean), ("centered", 0.0)):
        bar.set_postfix_str(f"linear/{name}")
        variants[name] = linear_variant(cfg, mean, config.seed, key)
        bar.update(1)
    agreements = _agreements(variants, cfg)
    sigma = cfg.sigma or max(v["slq"]["default_sigma"] for v in variants.values())
    b, c = variants["biased"]["gd"], variants["centered"]["gd"]
    steps_ratio = b["steps"] / c["steps"] if b["steps"] and c["steps"] else None
    return {
        "num_inputs": cfg.num_inputs,
        "num_samples": cfg.num_samples,
        "variance": cfg.variance,
        "biased_mean": cfg.mean,
        "tolerance": cfg.tolerance,
        "density_sigma": sigma,
        "variants": variants,
        "agreements": agreements,
        "all_within_tolerance": all(a["within_tolerance"] for a in agreements),
        "gd_steps_ratio_biased_over_centered": steps_ratio,
        "gd_bound_ratio_biased_over_centered": (
            b["bound_from_measured_eigenvalues"]["steps"]
            / c["bound_from_measured_eigenvalues"]["steps"]
        ),
    }
