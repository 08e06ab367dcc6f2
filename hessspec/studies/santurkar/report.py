"""report.md of the Santurkar study: one function per section, each returning its lines;
every number through :func:`hessspec.studies.common.formatting.fmt`, so a test finds a
results.json value in the report by formatting it the same way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hessspec.studies.common.formatting import fmt, md_table
from hessspec.studies.santurkar.config import SanturkarConfig
from hessspec.studies.santurkar.plots import variant_label
from hessspec.studies.santurkar.summary import final_train_loss

__all__ = ["report"]

Lines = list[str]


def _introduction(results: Mapping[str, Any], config: SanturkarConfig) -> Lines:
    lr, timing = results["learning_rate"], results["timing"]
    if config.model == "cnn":
        arch = f"CNN (conv channels {list(config.channels)})"
    else:
        arch = f"MLP (hidden {list(config.hidden)})"
    lo, hi = config.step_range
    return [
        f"# {config.title}",
        "",
        "Santurkar et al. (2018) argue that BatchNorm helps because it makes the loss "
        "landscape smoother (smaller loss changes and more predictive gradients along the "
        "step), not because it reduces internal covariate shift. Here: digits, "
        f"{arch}, preprocessing '{config.preprocessing}', plain SGD (momentum "
        f"{fmt(config.momentum)}) at the same lr = {fmt(lr)} for every variant, batch "
        f"{config.batch_size}, {config.steps} steps; every {config.record_every} steps, on "
        "the batch of the next update and with the statistics (and for noisy BN the noise) "
        f"of that update, step lengths s in [{fmt(lo)}, {fmt(hi)}] x lr "
        f"({config.num_step_sizes} values) along -g.",
        "",
        f"Wall time: {timing['total_s']:.1f} s (main runs {timing['main_s']:.1f} s, "
        f"learning-rate sweep {timing['sweep_s']:.1f} s) on "
        f"{', '.join(results['environment']['devices'])}.",
    ]


#: ``(column, summary field)`` of the landscape table, after the variant.
_LANDSCAPE_COLUMNS = (
    ("loss range (mean)", "loss_range_mean"),
    ("loss range (median)", "loss_range_median"),
    ("beta (mean)", "beta_mean"),
    ("beta (median)", "beta_median"),
    ("max grad. predictiveness (mean)", "max_predictiveness_mean"),
    ("first-order range (mean)", "first_order_range_mean"),
)


def _landscape(runs: Mapping[str, Any]) -> Lines:
    rows = [
        [
            variant_label(v),
            *(r["summary"][field] for _, field in _LANDSCAPE_COLUMNS),
            final_train_loss(r["train_losses"]),
            r["train_accuracy"],
            r["test_accuracy"],
            r["seconds"],
        ]
        for v, r in runs.items()
    ]
    header = ["variant", *(column for column, _ in _LANDSCAPE_COLUMNS)]
    header += ["final train loss", "train acc.", "test acc.", "seconds"]
    return [
        "",
        "## Landscape along the gradient (means over all records)",
        "",
        md_table(header, rows),
        "",
        "First-order range: (hi - lo) lr ||g||^2, what the loss range would be if the loss "
        "were linear along the step. Curvature along the step makes the two differ; when "
        "lr x beta is small they nearly agree and the range then measures ||g||^2 more than "
        "the smoothness.",
    ]


def _comparison(cmp: Mapping[str, Any] | None, lr: float) -> Lines:
    if cmp is None:
        return []
    loss_share = fmt(100 * cmp["fraction_of_records_loss_range_smaller_with_bn"], 3)
    beta_share = fmt(100 * cmp["fraction_of_records_beta_smaller_with_bn"], 3)
    lines = [
        "",
        "## BatchNorm against standard at the same learning rate",
        "",
        f"- Loss range: BN / standard = {fmt(cmp['loss_range_ratio_bn_over_standard'])} "
        f"(smaller with BN: {fmt(cmp['loss_range_smaller_with_bn'])}; at {loss_share} % of "
        "the recorded steps).",
        f"- Beta-smoothness: BN / standard = {fmt(cmp['beta_ratio_bn_over_standard'])} "
        f"(smaller with BN: {fmt(cmp['beta_smaller_with_bn'])}; at {beta_share} % of the "
        "recorded steps).",
    ]
    if "noisy_loss_range_smaller_than_standard" in cmp:
        lines.append(
            "- Noisy BatchNorm (more distribution shift) against standard: loss range "
            f"smaller: {fmt(cmp['noisy_loss_range_smaller_than_standard'])}, beta smaller: "
            f"{fmt(cmp['noisy_beta_smaller_than_standard'])}."
        )
    verdict = "holds" if cmp["acceptance"] else "does NOT hold"
    return lines + [
        "",
        f"Acceptance (smaller loss range AND beta with BN at lr = {fmt(lr)}): **{verdict}**.",
    ]


def _covariate_shift(runs: Mapping[str, Any]) -> Lines:
    header = ["variant", "layer", "parameters", "||G - G'||", "||G - G'|| / ||G||", "cos(G, G')"]
    rows = [
        [
            variant_label(v),
            str(j + 1),
            name,
            r["summary"]["ics_l2_mean"][j],
            r["summary"]["ics_relative_mean"][j],
            r["summary"]["ics_cosine_mean"][j],
        ]
        for v, r in runs.items()
        for j, name in enumerate(r["layer_names"])
    ]
    return [
        "",
        "![Landscape](figures/landscape.png)",
        "",
        "## Internal covariate shift per layer (means over all records)",
        "",
        "||G - G'|| and cos(G, G'), G the layer's gradient, G' the same after the earlier "
        "layers took their SGD step (layer 1 has no earlier layers: G' = G).",
        "",
        md_table(header, rows),
        "",
        "![Covariate shift](figures/ics.png)",
        "",
        "![Training](figures/training.png)",
    ]


#: ``(column, lr_table field)`` of the sweep table, after the learning rate and variant.
_SWEEP_COLUMNS = (
    ("loss range (mean)", "loss_range_mean"),
    ("beta (mean)", "beta_mean"),
    ("lr x beta (mean)", "lr_times_beta_mean"),
    ("first-order range (mean)", "first_order_range_mean"),
    ("final train loss", "final_train_loss"),
    ("test acc.", "test_accuracy"),
)


def _sweep(results: Mapping[str, Any]) -> Lines:
    table = results["lr_table"]
    if not table or len({r["learning_rate"] for r in table}) <= 1:
        return []
    ordered = sorted(table, key=lambda r: (r["learning_rate"], r["variant"]))
    rows = [
        [fmt(r["learning_rate"]), variant_label(r["variant"]), *(r[f] for _, f in _SWEEP_COLUMNS)]
        for r in ordered
    ]
    header = ["lr", "variant", *(column for column, _ in _SWEEP_COLUMNS)]
    lines = ["", "## Learning-rate sweep (landscape means)", "", md_table(header, rows), ""]
    for row in results["lr_comparisons"]:
        c = row["comparison"]
        if c is not None:
            lines.append(
                f"- lr = {fmt(row['learning_rate'])}: loss range BN / standard = "
                f"{fmt(c['loss_range_ratio_bn_over_standard'])}, beta BN / standard = "
                f"{fmt(c['beta_ratio_bn_over_standard'])}."
            )
    return lines + [
        "",
        "Where lr x beta is small the loss along the step is nearly linear and its range "
        "is about the first-order range (hi - lo) lr ||g||^2, which measures the gradient "
        "norm rather than the smoothness; beta-smoothness compares smoothness at every "
        "learning rate.",
        "",
        "![Learning-rate sweep](figures/lr_sweep.png)",
    ]


def report(results: Mapping[str, Any], config: SanturkarConfig) -> str:
    """report.md: the setting, the landscape per variant, BatchNorm against standard, the
    covariate shift per layer, and the learning-rate sweep when there is one."""
    runs = results["runs"]
    lines = _introduction(results, config) + _landscape(runs)
    lines += _comparison(results["comparison"], results["learning_rate"])
    lines += _covariate_shift(runs) + _sweep(results)
    return "\n".join(lines) + "\n"
