"""Summaries of the Santurkar study's records: per run (:func:`summarize_records`), BatchNorm
against standard at one learning rate (:func:`comparison`), and the rows of the
learning-rate table (:func:`lr_row`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["comparison", "final_train_loss", "lr_row", "summarize_records"]


def summarize_records(records: Mapping[str, Any], lr: float) -> dict[str, Any]:
    """Averages of the landscape records of one run.

    Args:
        records: the ``records`` of one variant (lists over recorded steps).
        lr: its learning rate.

    Returns:
        Means and medians over all records (and over the second half, ``late_``) of the loss
        range, beta-smoothness, the largest gradient predictiveness and the first-order
        range ``(hi - lo) lr ||g||^2``; the mean of ``4 lr beta`` style step-to-curvature
        ratio ``lr * beta``; and per-layer means of the covariate shift when recorded.
    """
    rng = np.asarray(records["loss_range"], np.float64)
    beta = np.asarray(records["beta_smoothness"], np.float64)
    pred = np.asarray([np.max(p) for p in records["gradient_predictiveness"]], np.float64)
    first = np.asarray(records["first_order_range"], np.float64)
    half = rng.size // 2
    out = {
        "num_records": int(rng.size),
        "loss_range_mean": float(rng.mean()),
        "loss_range_median": float(np.median(rng)),
        "loss_range_max": float(rng.max()),
        "beta_mean": float(beta.mean()),
        "beta_median": float(np.median(beta)),
        "beta_max": float(beta.max()),
        "max_predictiveness_mean": float(pred.mean()),
        "first_order_range_mean": float(first.mean()),
        "lr_times_beta_mean": float(lr * beta.mean()),
        "late_loss_range_mean": float(rng[half:].mean()),
        "late_beta_mean": float(beta[half:].mean()),
    }
    if records.get("ics_l2"):
        out.update(_covariate_shift_means(records))
    return out


def _covariate_shift_means(records: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per-layer means over the records of ``||G - G'||``, ``||G - G'|| / ||G||`` and
    ``cos(G, G')`` (records where the cosine is undefined, NaN, left out)."""
    l2 = np.asarray(records["ics_l2"], np.float64)
    cos = np.asarray(records["ics_cosine"], np.float64)
    norm = np.asarray(records["ics_grad_norm"], np.float64)
    finite = np.isfinite(cos)
    count = finite.sum(0)
    total = np.where(finite, cos, 0.0).sum(0)
    return {
        "ics_l2_mean": l2.mean(0),
        "ics_relative_mean": (l2 / np.where(norm > 0, norm, np.inf)).mean(0),
        "ics_cosine_mean": np.where(count > 0, total / np.maximum(count, 1), np.nan),
    }


def comparison(runs: Mapping[str, Any]) -> dict[str, Any] | None:
    """BatchNorm against standard at one learning rate (None without both): ratios of the
    mean loss range and beta-smoothness, whether each is smaller with BN, at which share of
    the recorded steps, the noisy variant against standard, and ``acceptance`` (loss range
    AND beta smaller with BN)."""
    if "standard" not in runs or "batchnorm" not in runs:
        return None
    s, b = runs["standard"]["summary"], runs["batchnorm"]["summary"]
    rs = np.asarray(runs["standard"]["records"]["loss_range"])
    rb = np.asarray(runs["batchnorm"]["records"]["loss_range"])
    bs = np.asarray(runs["standard"]["records"]["beta_smoothness"])
    bb = np.asarray(runs["batchnorm"]["records"]["beta_smoothness"])
    out = {
        "loss_range_ratio_bn_over_standard": b["loss_range_mean"] / s["loss_range_mean"],
        "beta_ratio_bn_over_standard": b["beta_mean"] / s["beta_mean"],
        "loss_range_smaller_with_bn": b["loss_range_mean"] < s["loss_range_mean"],
        "beta_smaller_with_bn": b["beta_mean"] < s["beta_mean"],
        "fraction_of_records_loss_range_smaller_with_bn": float(np.mean(rb < rs)),
        "fraction_of_records_beta_smaller_with_bn": float(np.mean(bb < bs)),
    }
    if "noisy_batchnorm" in runs:
        n = runs["noisy_batchnorm"]["summary"]
        out["noisy_loss_range_smaller_than_standard"] = n["loss_range_mean"] < s["loss_range_mean"]
        out["noisy_beta_smaller_than_standard"] = n["beta_mean"] < s["beta_mean"]
    out["acceptance"] = bool(out["loss_range_smaller_with_bn"] and out["beta_smaller_with_bn"])
    return out


def final_train_loss(train_losses) -> float:
    """The mean mini-batch loss over the last 5 % of the steps (at least the last one)."""
    losses = np.asarray(train_losses, np.float64)
    return float(losses[-max(1, losses.size // 20) :].mean())


def lr_row(run: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the learning-rate table: a run's landscape means at its learning rate."""
    s = run["summary"]
    return {
        "learning_rate": run["learning_rate"],
        "variant": run["variant"],
        "loss_range_mean": s["loss_range_mean"],
        "beta_mean": s["beta_mean"],
        "lr_times_beta_mean": s["lr_times_beta_mean"],
        "first_order_range_mean": s["first_order_range_mean"],
        "final_train_loss": final_train_loss(run["train_losses"]),
        "test_accuracy": run["test_accuracy"],
    }
