"""report.md of the input-bias study: one function per section, each returning its lines;
every number through :func:`hessspec.studies.common.formatting.fmt` (or ``pct``), so a test
finds a results.json value in the report by formatting it the same way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hessspec.studies.common.formatting import fmt, md_table, pct
from hessspec.studies.input_bias.config import InputBiasConfig
from hessspec.studies.input_bias.linear import relative_error
from hessspec.studies.input_bias.plots import mlp_rows

__all__ = ["report"]

Lines = list[str]


def _introduction(results: Mapping[str, Any], config: InputBiasConfig) -> Lines:
    timing, env = results["timing"], results["environment"]
    return [
        f"# {config.title}",
        "",
        "LeCun, Kanter & Solla (1991): for a linear model with squared loss the Hessian is "
        "the input correlation matrix R = X^T X / p. Inputs whose components have mean m and "
        "variance v give one outlier near N m^2 + v; the rest follows Marchenko-Pastur with "
        "ratio N/p. Centring removes the outlier, and with it the cap it puts on the "
        "learning rate.",
        "",
        f"Wall time: {timing['total_s']:.1f} s (linear part {timing['linear_s']:.1f} s, MLP "
        f"part {timing['mlp_s']:.1f} s) on {', '.join(env['devices'])}; x64 = {env['x64']}.",
    ]


def _linear_theory(lin: Mapping[str, Any], config: InputBiasConfig) -> Lines:
    tol = pct(lin["tolerance"])
    rows = [
        [
            a["variant"],
            a["quantity"],
            a["measured"],
            a["predicted"],
            pct(a["relative_error"]),
            a["within_tolerance"],
        ]
        for a in lin["agreements"]
    ]
    header = ["inputs", "quantity", "measured", "theory", "relative error", f"within {tol}"]
    return [
        "",
        "## Linear model, synthetic Gaussian inputs",
        "",
        f"N = {lin['num_inputs']} inputs, p = {lin['num_samples']} samples, variance v = "
        f"{fmt(lin['variance'])}; biased mean m = {fmt(lin['biased_mean'])}, centred mean 0 "
        f"(same noise draws). Model dtype {config.linear.dtype}. Every eigenvalue below is "
        "measured by Lanczos on `hessian_operator` (Hessian-vector products), not from the "
        "dense matrix.",
        "",
        "### Measured against theory",
        "",
        md_table(header, rows),
        "",
        f"All agreements within {tol}: **{fmt(lin['all_within_tolerance'])}**.",
    ]


def _linear_findings(lin: Mapping[str, Any]) -> Lines:
    b, c = lin["variants"]["biased"], lin["variants"]["centered"]
    finite = b["prediction"]["outlier_finite_ratio"]
    residual = max(max(b["lanczos"]["top_residuals"]), max(c["lanczos"]["top_residuals"]))
    lines = [
        "",
        f"- Biased outlier at finite N/p (Baik-Ben Arous-Peche): theory {fmt(finite, 6)}, "
        f"measured {fmt(b['lambda_max'], 6)} (relative error "
        f"{pct(relative_error(b['lambda_max'], finite))}).",
        f"- Centring removes the outlier: lambda_max falls from {fmt(b['lambda_max'])} to "
        f"{fmt(c['lambda_max'])} (factor {fmt(b['lambda_max'] / c['lambda_max'])}), while "
        f"lambda_min stays ({fmt(b['lambda_min'])} vs {fmt(c['lambda_min'])}).",
        f"- SLQ weight of the outlier (biased; theory 1/N = {fmt(1.0 / lin['num_inputs'])}): "
        f"{fmt(b['slq']['outlier_mass'])} ({b['slq']['num_probes']} probes, "
        f"{b['slq']['num_steps']} steps).",
        f"- Lanczos cost: {b['lanczos']['num_matvecs']} (biased) and "
        f"{c['lanczos']['num_matvecs']} (centred) Hessian-vector products for the three "
        f"extreme eigenvalues; largest residual {fmt(residual)}.",
    ]
    if "dense" in b:
        diff = max(b["dense"]["max_abs_diff_lanczos"], c["dense"]["max_abs_diff_lanczos"])
        lines.append(
            f"- Dense check (eigvalsh of the operator's matrix): largest |Lanczos - dense| "
            f"{fmt(diff)}."
        )
    return lines


def _linear_density(lin: Mapping[str, Any], config: InputBiasConfig) -> Lines:
    b, c = lin["variants"]["biased"], lin["variants"]["centered"]
    if config.linear.sigma > 0:
        width = " (configured). "
    else:
        width = (
            " (Ghorbani et al.'s sigma^2 = 1e-5 max(1, lambda_max - lambda_min) of the biased "
            "spectrum, the larger of the two; the centred spectrum's own would be "
            f"{fmt(c['slq']['default_sigma'])}). "
        )
    return [
        "",
        "![SLQ density and Marchenko-Pastur](figures/linear_density.png)",
        "",
        f"Density: Gaussian broadening of the SLQ nodes ({b['slq']['num_probes']} probes x "
        f"{b['slq']['num_steps']} Lanczos steps), one width sigma = "
        f"{fmt(lin['density_sigma'])} for both variants"
        + width
        + "The biased Marchenko-Pastur curve is scaled by the bulk mass (N-1)/N.",
    ]


def _gradient_descent(lin: Mapping[str, Any]) -> Lines:
    variants = lin["variants"]
    header = [
        "inputs",
        "lr",
        "GD steps (run)",
        "bound (measured eigenvalues)",
        "bound (theory eigenvalues)",
        "lambda_max / lambda_min",
    ]
    rows = [
        [
            name,
            var["gd"]["learning_rate"],
            fmt(var["gd"]["steps"]),
            fmt(var["gd"]["bound_from_measured_eigenvalues"]["steps"]),
            fmt(var["gd"]["bound_from_theory"]["steps"]),
            var["gd"]["slowest_time_constant"],
        ]
        for name, var in ((n, variants[n]) for n in ("biased", "centered"))
    ]
    return [
        "",
        "### Gradient descent consequence",
        "",
        "Full-batch GD at lr = 1 / lambda_max (measured), from the model's initialisation, "
        f"run until ||w_t - w*|| <= {fmt(variants['biased']['gd']['tolerance'])} "
        "||w_0 - w*|| (w* the least-squares solution). The bound is the worst case over "
        "starting points, ceil(log tol / log rate) with rate = max |1 - lr lambda| "
        "(`theory.gd_steps_to_tolerance`).",
        "",
        md_table(header, rows),
        "",
        f"Biased inputs need {fmt(lin['gd_steps_ratio_biased_over_centered'])} times as many "
        f"GD steps as centred ones (bound: {fmt(lin['gd_bound_ratio_biased_over_centered'])} "
        "times): the outlier caps the learning rate, and the bulk then converges at "
        "lr * lambda_min per step.",
        "",
        "![GD convergence](figures/linear_gd.png)",
    ]


def _mlp_inputs(mlp: Mapping[str, Any], config: InputBiasConfig) -> Lines:
    cfg = config.mlp
    rows = [
        [
            name,
            var["inputs"]["mean_sq_norm"],
            var["inputs"]["mean_pixel_variance"],
            ", ".join(fmt(e) for e in var["inputs"]["correlation_top_eigenvalues"]),
        ]
        for name, var in mlp["variants"].items()
    ]
    header = ["variant", "||E x||^2", "mean pixel variance", "top eigenvalues of X^T X / n"]
    return [
        "",
        "## One-hidden-layer MLP on the digits",
        "",
        f"MLP 64 -> {cfg.hidden} -> 10 (ReLU), cross-entropy, {cfg.analysis_size} training "
        f"examples for the Hessian (one batch), top {cfg.top_k} eigenvalues by Lanczos. "
        f"Variants: raw inputs (preprocessing '{cfg.raw_preprocessing}', positive mean), "
        "centred inputs (per-pixel train mean removed), and BatchNorm after the hidden linear "
        f"layer on raw inputs. Short training: {cfg.train_steps} plain SGD steps at the "
        f"shared lr = {fmt(cfg.learning_rate)}, batch {cfg.batch_size}.",
        "",
        "Input statistics of the analysis set (the LeCun outlier of the input correlation "
        "matrix is about ||E x||^2 when the mean dominates):",
        "",
        md_table(header, rows),
    ]


#: ``(column, analysis field)`` of the MLP Hessian table, after the variant and the step.
_MLP_HESSIAN_COLUMNS = (
    ("lambda_1", "lambda_max"),
    ("lambda_1 / lambda_10", "ratio_to_kth"),
    ("outliers", "num_outliers"),
    ("lambda_1 / bulk edge", "outlier_ratio"),
    ("mean-direction overlap", "top_vector_mean_overlap"),
    ("2 / lambda_1", "stable_learning_rate"),
    ("loss", "loss"),
    ("accuracy", "accuracy"),
)


def _mlp_hessians(results: Mapping[str, Any]) -> Lines:
    rows = [
        [label, str(step), *(res[field] for _, field in _MLP_HESSIAN_COLUMNS)]
        for label, step, res in mlp_rows(results)
    ]
    header = ["variant", "step", *(column for column, _ in _MLP_HESSIAN_COLUMNS)]
    return [
        "",
        "Hessian of the training loss (overlap: share of the top eigenvector's norm^2 in its "
        "first-layer part along the raw input-mean direction, LeCun's outlier direction):",
        "",
        md_table(header, rows),
        "",
        *_unconverged(results),
    ]


def _unconverged(results: Mapping[str, Any]) -> Lines:
    """A line per Hessian whose top eigenpairs did not all meet the solver's relative
    residual tolerance, with their error bounds |lambda - theta| (none when all did)."""
    lines = []
    for label, step, res in mlp_rows(results):
        missed = [i for i, ok in enumerate(res.get("converged") or []) if not ok]
        if missed:
            bounds = [res["top_error_bounds"][i] for i in missed]
            lines.append(
                f"- {label}, step {step}: eigenpairs {[i + 1 for i in missed]} of "
                f"{len(res['converged'])} (deep in the bulk, nearly degenerate) did not reach "
                f"the relative residual tolerance; their eigenvalues are within "
                f"{fmt(max(bounds))} of the values shown."
            )
    return [*lines, ""] if lines else []


def _mlp_findings(results: Mapping[str, Any]) -> Lines:
    init = {label: res for label, step, res in mlp_rows(results) if step == 0}
    lines = []
    if "raw" in init and "centered" in init:
        factor = init["raw"]["lambda_max"] / init["centered"]["lambda_max"]
        lines.append(
            f"At initialisation lambda_1 is {fmt(factor)} times larger with raw than with "
            "centred inputs."
        )
    bn_train = init.get("batchnorm (train)")
    if bn_train is not None and "raw" in init:
        lines.append(
            f"BatchNorm in train mode (batch statistics) on the same raw inputs: lambda_1 = "
            f"{fmt(bn_train['lambda_max'])}, mean-direction overlap "
            f"{fmt(bn_train['top_vector_mean_overlap'])} (raw: "
            f"{fmt(init['raw']['top_vector_mean_overlap'])}): with batch statistics the "
            "network is exactly invariant to the input mean."
        )
    bn_pop = init.get("batchnorm (population)")
    if bn_pop is not None:
        lines.append(
            "With frozen (population) statistics the mean is a constant again and the BN "
            f"network's lambda_1 is {fmt(bn_pop['lambda_max'])}."
        )
    return lines


def _mlp_figures(config: InputBiasConfig) -> Lines:
    cfg = config.mlp
    lines = [
        "",
        "![MLP top eigenvalues](figures/mlp_top_eigenvalues.png)",
        "",
        "![MLP densities](figures/mlp_density.png)",
        "",
        f"Densities: Gaussian broadening of the SLQ nodes ({cfg.slq_probes} probes x "
        f"{cfg.slq_steps} steps) with Ghorbani's width sigma^2 = 1e-5 max(1, lambda_max - "
        "lambda_min) of each spectrum (in each panel's title).",
    ]
    if cfg.train_steps > 0:
        lines += ["", "![MLP training](figures/mlp_training.png)"]
    return lines


def report(results: Mapping[str, Any], config: InputBiasConfig) -> str:
    """report.md: the introduction, the linear model against theory, its density and GD,
    then (when the MLP part ran) the MLP's inputs, Hessians and figures."""
    lin = results["linear"]
    lines = _introduction(results, config)
    lines += _linear_theory(lin, config) + _linear_findings(lin)
    lines += _linear_density(lin, config) + _gradient_descent(lin)
    if results.get("mlp") is not None:
        lines += _mlp_inputs(results["mlp"], config) + _mlp_hessians(results)
        lines += _mlp_findings(results) + _mlp_figures(config)
    return "\n".join(lines) + "\n"
