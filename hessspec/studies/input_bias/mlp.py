"""Part 2 of the input-bias study: a one-hidden-layer MLP on the digits, cross-entropy.

Variants: *raw* inputs (pixels in ``[0, 1]`` or ``0..16``: a positive mean), *centred*
inputs (per-pixel train mean removed), and *batchnorm* (raw inputs, BatchNorm after the
hidden linear layer). For each, at initialisation and after a short training at one shared
learning rate: the top eigenvalues, the outlier split of :func:`hessspec.outlier_split`,
the SLQ density, and how much of the top eigenvector's first-layer part lies along the
input-mean direction (LeCun's outlier direction ``mean (x) u``). BatchNorm networks are
analysed in the configured BN modes: in ``"train"`` mode (batch statistics, what SGD
descends) the output is exactly invariant to the input mean, in ``"population"`` mode the
statistics are frozen constants and the mean is seen again.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hessspec.studies.common.checks import dtype_of
from hessspec.studies.common.config import ConfigError
from hessspec.studies.input_bias.config import InputBiasConfig, MLPSettings
from hessspec.studies.input_bias.linear import slq_record

__all__ = ["run_mlp"]


def _variants(cfg: MLPSettings) -> list[tuple[str, str, bool]]:
    """``(name, preprocessing, batchnorm)`` of the three variants."""
    return [
        ("raw", cfg.raw_preprocessing, False),
        ("centered", "center", False),
        ("batchnorm", cfg.raw_preprocessing, True),
    ]


def _input_statistics(x: np.ndarray) -> dict[str, Any]:
    """``||E x||^2``, the mean pixel variance, and the top 3 eigenvalues of the correlation
    ``X^T X / n`` and of the covariance of the inputs ``x`` ``(n, D)``."""
    x = np.asarray(x, np.float64)
    mu = x.mean(0)
    corr = np.linalg.eigvalsh(x.T @ x / x.shape[0])[::-1]
    cov = np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))[::-1]
    return {
        "mean_sq_norm": float(mu @ mu),
        "mean_pixel_variance": float(x.var(0).mean()),
        "correlation_top_eigenvalues": corr[:3],
        "covariance_top_eigenvalues": cov[:3],
    }


def _mean_direction_overlap(op, vector, mean_direction: np.ndarray) -> float:
    """``||mu_hat^T K||^2 / ||v||^2`` for ``K`` the first-layer kernel block ``(D, H)`` of the
    eigenvector ``v``: the share of ``v`` along ``mu_hat (x) R^H``."""
    tree = op.unravel(jnp.asarray(vector, op.dtype))
    kernel = np.asarray(tree["linears"][0]["kernel"], np.float64)
    proj = mean_direction @ kernel
    return float(proj @ proj / np.sum(np.asarray(vector, np.float64) ** 2))


def _analyse(model, cfg: MLPSettings, sub, mode, mean_direction, key) -> dict[str, Any]:
    """The Hessian of the loss on the analysis set ``sub`` in BN mode ``mode`` (None: no
    BN): top eigenpairs, outlier split, SLQ quadrature, mean-direction overlap, loss and
    accuracy."""
    import hessspec as hs
    from hessspec.nn.objective import make_objective

    population = sub if mode == "population" else None
    obj = make_objective(model, "cross_entropy", mode, population_data=population)
    op = hs.hessian_operator(obj.loss_fn, obj.params, sub.batch)
    k_top, k_slq = jax.random.split(key)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # unconverged pairs are recorded with their bounds
        warnings.simplefilter("ignore", hs.LanczosConvergenceWarning)
        top = hs.top_eigenpairs(op, cfg.top_k, num_steps=cfg.lanczos_steps or None, key=k_top)
    split = hs.outlier_split(top.values, 10)
    steps = min(cfg.slq_steps, op.dim)
    sd = hs.spectral_density(op, num_probes=cfg.slq_probes, num_steps=steps, key=k_slq)
    logits = obj.logits_fn(obj.params, jnp.asarray(sub.x))
    lam1 = float(top.values[0])
    return {
        "bn_mode": mode,
        "num_params": op.dim,
        "loss": float(obj.loss_fn(obj.params, sub.batch)),
        "accuracy": float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(sub.y))),
        "top_values": top.values,
        "top_residuals": top.residuals,
        "converged": top.converged,
        "top_error_bounds": top.error_bounds,
        "lambda_max": lam1,
        "stable_learning_rate": 2.0 / lam1 if lam1 > 0 else None,
        "num_outliers": split.num_outliers,
        "bulk_edge": split.bulk_edge,
        "outlier_ratio": split.outlier_ratio,
        "ratio_to_kth": split.ratio_to_kth,
        "top_vector_mean_overlap": _mean_direction_overlap(op, top.vectors[0], mean_direction),
        "slq": {**slq_record(sd), "dim": op.dim},
        "seconds": time.perf_counter() - t0,
    }


def _analysis_set(config: InputBiasConfig, preprocessing: str):
    """``(train set, stratified analysis subset)`` of the digits in ``preprocessing``."""
    from hessspec.nn.data import load_digits, subsample

    cfg = config.mlp
    dtype = np.dtype(dtype_of(cfg.dtype))
    train_set = load_digits("train", preprocessing=preprocessing, flatten=True, dtype=dtype)
    if cfg.analysis_size > train_set.num_examples:
        raise ConfigError(
            f"config key 'mlp.analysis_size' = {cfg.analysis_size} exceeds the "
            f"{train_set.num_examples} digits training examples."
        )
    return train_set, subsample(train_set, cfg.analysis_size, seed=config.seed, stratify=True)


def _variant(config: InputBiasConfig, variant, phases, mean_direction, key, bar) -> dict:
    """One variant ``(name, preprocessing, batchnorm)``: analysed at every phase (step 0
    and the end of the short training), in every BN mode."""
    from hessspec.nn.models import make_model
    from hessspec.nn.train import TrainConfig, train

    cfg = config.mlp
    name, prep, bn = variant
    train_set, sub = _analysis_set(config, prep)
    dtype = dtype_of(cfg.dtype)
    model = make_model("mlp", (64,), 10, bn, seed=config.seed, dtype=dtype, hidden=(cfg.hidden,))
    modes = list(cfg.bn_modes) if bn else [None]
    record: dict[str, Any] = {
        "preprocessing": prep,
        "batchnorm": bn,
        "bn_modes": modes,
        "inputs": _input_statistics(sub.x),
        "analyses": {},
    }

    def on_checkpoint(step, m, *_):
        for mode in modes:
            bar.set_postfix_str(f"mlp/{name}/step {step}/{mode or 'no BN'}")
            res = _analyse(m, cfg, sub, mode, mean_direction, jax.random.fold_in(key, step))
            record["analyses"].setdefault(str(step), {})[str(mode)] = res

    tcfg = TrainConfig(
        optimizer="sgd",
        learning_rate=cfg.learning_rate,
        momentum=0.0,
        batch_size=min(cfg.batch_size, train_set.num_examples),
        steps=cfg.train_steps,
    )
    hist = train(
        model,
        train_set.x,
        train_set.y,
        tcfg,
        checkpoints=phases,
        on_checkpoint=on_checkpoint,
        seed=config.seed,
        progress=False,
        desc=f"mlp/{name}",
    )
    record["train_losses"] = hist.losses
    record["train_seconds"] = hist.seconds
    return record


def run_mlp(config: InputBiasConfig, bar) -> dict[str, Any]:
    """Part 2, all three variants (``results["mlp"]``): ``phases`` (the analysed steps) and
    per variant its input statistics, analyses by step and BN mode, and training losses;
    ``bar`` is a tqdm bar advanced once per variant."""
    from hessspec.nn.data import load_digits

    cfg = config.mlp
    key = jax.random.key(config.seed + 1)
    raw_train = load_digits("train", preprocessing=cfg.raw_preprocessing, flatten=True)
    mu = np.asarray(raw_train.x, np.float64).mean(0)
    mean_direction = mu / np.linalg.norm(mu)
    phases = [0] + ([cfg.train_steps] if cfg.train_steps > 0 else [])
    out: dict[str, Any] = {"phases": phases, "variants": {}}
    for variant in _variants(cfg):
        out["variants"][variant[0]] = _variant(config, variant, phases, mean_direction, key, bar)
        bar.update(1)
    return out
