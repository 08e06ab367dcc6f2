"""The input-bias study's figures, drawn from its results (the dict
:func:`~hessspec.studies.input_bias.run.run_input_bias_study` returns, or its parsed
results.json): public, the notebooks redraw them.

The ``plot_*`` functions follow :mod:`hessspec.studies.common.figures`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from hessspec.studies.common.figures import panel, panels, plot_training_losses

__all__ = [
    "FIGURES",
    "density_from_record",
    "figures_for",
    "mlp_rows",
    "plot_gd_convergence",
    "plot_linear_density",
    "plot_mlp_density",
    "plot_mlp_top_eigenvalues",
    "plot_mlp_training",
]


def density_from_record(rec: Mapping[str, Any], grid: np.ndarray, sigma: float | None = None):
    """The Gaussian-smoothed SLQ density on ``grid`` of a stored SLQ record (``nodes``,
    ``weights``, ``default_sigma``, ``dim``), as ``SpectralDensity.density``; ``sigma`` None:
    the record's default width."""
    from hessspec.linalg.density import SpectralDensity

    nodes = np.asarray(rec["nodes"], np.float64)
    weights = np.asarray(rec["weights"], np.float64)
    sd = SpectralDensity(
        nodes=nodes,
        weights=weights,
        num_steps_done=np.full(nodes.shape[0], nodes.shape[1]),
        dim=int(rec.get("dim", nodes.shape[1])),
    )
    return sd.density(grid, sigma=rec["default_sigma"] if sigma is None else sigma)


def mlp_rows(results: Mapping[str, Any]) -> Iterator[tuple[str, int, Mapping[str, Any]]]:
    """``(label, step, analysis)`` for every MLP analysis, in a fixed order: variants, then
    phases, then BN modes; the label is the variant, with its BN mode in parentheses."""
    mlp = results["mlp"]
    for name, var in mlp["variants"].items():
        for step in mlp["phases"]:
            for mode, res in var["analyses"][str(step)].items():
                label = name if mode == "None" else f"{name} ({mode})"
                yield label, step, res


def plot_linear_density(results: Mapping[str, Any], axes=None):
    """SLQ density of the linear model's Hessian over the Marchenko-Pastur law, log y.

    Three panels: centred inputs, the bulk of the biased inputs, and the whole biased
    spectrum on a log x axis with the outlier and LeCun's ``N m^2 + v``. All curves use the
    kernel width ``results["linear"]["density_sigma"]`` (in the legends)."""
    from hessspec.analysis.theory import marchenko_pastur

    lin = results["linear"]
    fig, axes = panels(axes, 1, 3, size=(4.6, 3.6))
    n = lin["num_inputs"]
    sigma = lin["density_sigma"]
    mp = marchenko_pastur(n / lin["num_samples"], lin["variance"])
    grid = np.linspace(0.0, mp.upper_edge * 1.3, 1500)
    for ax, name, bulk_mass in (
        (axes[0], "centered", 1.0),
        (axes[1], "biased", 1.0 - 1.0 / n),
    ):
        var = lin["variants"][name]
        dens = density_from_record(var["slq"], grid, sigma)
        ax.semilogy(grid, dens, label=f"SLQ (sigma = {sigma:.3g})")
        ax.semilogy(grid, bulk_mass * mp.density(grid), "k--", label="Marchenko-Pastur")
        for x in (mp.lower_edge, mp.upper_edge):
            ax.axvline(x, color="0.6", lw=0.8, ls=":")
        ax.axvline(var["lambda_min"], color="C3", lw=0.8, label="Lanczos lambda_min")
        ax.axvline(var["upper_bulk_edge"], color="C2", lw=0.8, label="Lanczos bulk edge")
        ax.set_ylim(1e-4, 10)
        ax.set_xlabel("eigenvalue")
        ax.set_title(f"{name} inputs (m = {var['mean']:g}): bulk")
        ax.legend(fontsize=7, loc="lower center")
    axes[0].set_ylabel("density")
    var = lin["variants"]["biased"]
    lam_max = var["lambda_max"]
    # A log grid, refined around the outlier so that its narrow peak is resolved.
    grid = np.union1d(
        np.geomspace(mp.lower_edge * 0.5, lam_max * 1.5, 3000),
        np.linspace(lam_max - 6 * sigma, lam_max + 6 * sigma, 400),
    )
    grid = grid[grid > 0]
    dens = density_from_record(var["slq"], grid, sigma)
    axes[2].loglog(grid, dens, label=f"SLQ (sigma = {sigma:.3g})")
    axes[2].loglog(grid, (1.0 - 1.0 / n) * mp.density(grid), "k--", label="Marchenko-Pastur")
    axes[2].axvline(var["prediction"]["outlier"], color="C1", ls="--", label="N m^2 + v")
    axes[2].axvline(lam_max, color="C3", lw=0.8, label="Lanczos lambda_1")
    axes[2].set_ylim(1e-4, 10)
    axes[2].set_xlabel("eigenvalue (log)")
    axes[2].set_title("biased inputs: bulk and outlier")
    axes[2].legend(fontsize=7, loc="upper center")
    return fig


def plot_gd_convergence(results: Mapping[str, Any], ax=None):
    """GD parameter error ratio against steps, biased vs centred, with the worst-case
    bound ``rate^t`` of :func:`hessspec.analysis.theory.gd_steps_to_tolerance`."""
    lin = results["linear"]
    fig, ax = panel(ax)
    for i, name in enumerate(("biased", "centered")):
        gd = lin["variants"][name]["gd"]
        err = np.asarray(gd["error_ratio"], np.float64)
        t = np.arange(err.size)
        ax.semilogy(t, err, color=f"C{i}", label=f"{name}: GD, {gd['steps']} steps")
        rate = gd["bound_from_measured_eigenvalues"]["rate"]
        ax.semilogy(t, rate**t, color=f"C{i}", ls=":", label=f"{name}: bound rate^t")
    tol = lin["variants"]["biased"]["gd"]["tolerance"]
    ax.axhline(tol, color="k", lw=0.8, ls="--", label=f"tolerance {tol:g}")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(0, None)
    ax.set_xlabel("GD step (lr = 1 / lambda_max)")
    ax.set_ylabel("||w_t - w*|| / ||w_0 - w*||")
    ax.set_ylim(tol / 10, 2)
    ax.set_title("Gradient descent on the linear model")
    ax.legend(fontsize=8)
    return fig


def plot_mlp_top_eigenvalues(results: Mapping[str, Any], axes=None):
    """Top Hessian eigenvalues of each MLP variant (log y), one panel per phase."""
    phases = results["mlp"]["phases"]
    fig, axes = panels(axes, 1, len(phases), size=(5.5, 4.0))
    labels = list(dict.fromkeys(lbl for lbl, _, _ in mlp_rows(results)))
    for ax, step in zip(axes, phases, strict=True):
        for label, s, res in mlp_rows(results):
            if s != step:
                continue
            vals = np.asarray(res["top_values"], np.float64)
            ax.semilogy(
                np.arange(1, vals.size + 1),
                np.clip(vals, 1e-8, None),
                "o-",
                ms=3,
                color=f"C{labels.index(label) % 10}",
                label=label,
            )
        ax.set_xlabel("index i")
        ax.set_ylabel("lambda_i")
        ax.set_title("initialisation" if step == 0 else f"after {step} SGD steps")
        ax.legend(fontsize=8)
    return fig


def plot_mlp_density(results: Mapping[str, Any], axes=None):
    """SLQ densities of the MLP variants (log y): one row per phase, one column per variant
    (and BN mode), each with Ghorbani's width (in the panel title)."""
    phases = results["mlp"]["phases"]
    rows = list(mlp_rows(results))
    labels = list(dict.fromkeys(lbl for lbl, _, _ in rows))
    fig, axes = panels(axes, len(phases), len(labels), size=(3.6, 2.8), grid=True)
    lo = min(float(np.min(r["slq"]["nodes"])) for _, _, r in rows)
    hi = max(float(np.max(r["slq"]["nodes"])) for _, _, r in rows)
    pad = 0.05 * (hi - lo)
    grid = np.linspace(lo - pad, hi + pad, 4000)
    for label, step, res in rows:
        ax = axes[phases.index(step)][labels.index(label)]
        sigma = res["slq"]["default_sigma"]
        dens = density_from_record(res["slq"], grid)
        ax.semilogy(grid, np.maximum(dens, 1e-12), color=f"C{labels.index(label) % 10}")
        ax.set_ylim(1e-5, 2.0 * float(dens.max()))
        when = "init" if step == 0 else f"step {step}"
        ax.set_title(f"{label}, {when} (sigma = {sigma:.2g})", fontsize=8)
        ax.set_xlabel("eigenvalue")
    for r in range(len(phases)):
        axes[r][0].set_ylabel("density")
    return fig


def plot_mlp_training(results: Mapping[str, Any], ax=None):
    """Mini-batch training loss of the MLP variants at the shared learning rate."""
    fig, ax = panel(ax)
    variants = results["mlp"]["variants"].items()
    curves = [(var["train_losses"], {"label": name}) for name, var in variants]
    plot_training_losses(ax, curves, lr=results["config"]["mlp"]["learning_rate"], points=30)
    return fig


#: Figure file name -> the function drawing it.
FIGURES = {
    "figures/linear_density.png": plot_linear_density,
    "figures/linear_gd.png": plot_gd_convergence,
    "figures/mlp_top_eigenvalues.png": plot_mlp_top_eigenvalues,
    "figures/mlp_density.png": plot_mlp_density,
    "figures/mlp_training.png": plot_mlp_training,
}


def figures_for(config) -> dict[str, Any]:
    """{figure file name: function drawing it} of a run of ``config`` (an InputBiasConfig):
    the MLP figures only when the MLP part runs, its training curves only after training."""
    names = ["figures/linear_density.png", "figures/linear_gd.png"]
    if config.mlp.enabled:
        names += ["figures/mlp_top_eigenvalues.png", "figures/mlp_density.png"]
        if config.mlp.train_steps > 0:
            names.append("figures/mlp_training.png")
    return {name: FIGURES[name] for name in names}
