"""What a BatchNorm spectrum run found: the comparison with and without BatchNorm
(:func:`findings`), report.md (:func:`render_report`), the figures and the report on disk
(:func:`write_report`) and the lines the command prints at the end (:func:`summary_text`).

Every number in report.md goes through :func:`hessspec.studies.common.formatting.fmt`, the
formatter of every study's report: a value of results.json formatted with it is found
verbatim in report.md.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hessspec.studies.batchnorm_spectrum.report_sections import (
    per_layer_lines,
    run_label,
    sharpness_lines,
)
from hessspec.studies.batchnorm_spectrum.results import load_results
from hessspec.studies.common.formatting import fmt, md_table
from hessspec.studies.common.runfolder import atomic_write_bytes, atomic_write_text

__all__ = [
    "FIGURES_DIR",
    "findings",
    "render_report",
    "summary_text",
    "write_report",
]

FIGURES_DIR = "figures"

#: Ghorbani et al.'s effect, as this project states it: without BN the headline ratio
#: lambda_1 / lambda_{K+1} is at least this many times larger ...
EFFECT_RATIO = 3
#: ... and at least this much more of the gradient lies in the top-K eigenspace.
EFFECT_ENERGY = 0.3


def _at(values: list | None, index: int) -> float | None:
    """``values[index]``, or None when the list is missing or shorter."""
    if not values or index >= len(values):
        return None
    return values[index]


def _partner(runs: list[Mapping[str, Any]], bn_run: Mapping[str, Any]):
    """The first analysed run without BN of the same model as ``bn_run``, or None."""
    for run in runs:
        if not run.get("batchnorm") and run.get("model") == bn_run.get("model"):
            if run.get("checkpoints"):
                return run
    return None


def _compare(plain: Mapping[str, Any], bn_run: Mapping[str, Any], step: int) -> dict[str, Any]:
    """The finding of ``bn_run`` against ``plain`` at ``step`` (see :func:`findings`)."""
    cp = next(c for c in plain["checkpoints"] if c["step"] == step)
    cb = next(c for c in bn_run["checkpoints"] if c["step"] == step)
    k = int(bn_run.get("num_classes") or 1)
    r_plain, r_bn = cp.get("outlier_ratio"), cb.get("outlier_ratio")
    h_plain, h_bn = cp.get("headline_ratio"), cb.get("headline_ratio")
    e_plain = _at(cp.get("gradient_energy_full"), k - 1)
    e_bn = _at(cb.get("gradient_energy_full"), k - 1)
    both = e_plain is not None and e_bn is not None
    return {
        "model": bn_run.get("model"),
        "bn_run": bn_run["name"],
        "plain_run": plain["name"],
        "bn_mode": bn_run.get("bn_mode"),
        "step": step,
        "num_classes": k,
        "headline_ratio_plain": h_plain,
        "headline_ratio_bn": h_bn,
        "headline_ratio_quotient": (h_plain / h_bn) if h_plain and h_bn else None,
        "outlier_ratio_plain": r_plain,
        "outlier_ratio_bn": r_bn,
        "outlier_ratio_quotient": (r_plain / r_bn) if r_plain and r_bn else None,
        "energy_topK_plain": e_plain,
        "energy_topK_bn": e_bn,
        "energy_topK_difference": e_plain - e_bn if both else None,
        "minibatch_energy_topK_plain": _at(cp.get("gradient_energy_minibatch_mean"), k - 1),
        "minibatch_energy_topK_bn": _at(cb.get("gradient_energy_minibatch_mean"), k - 1),
    }


def findings(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Compare, at the last common checkpoint, every BN run with the run without BN of the
    same model: the headline ratios ``lambda_1 / lambda_{K+1}`` and their quotient
    ``plain / bn`` (the headline: one definition for every run), the gap-based outlier
    ratios (lambda_1 / bulk edge) and their quotient, and the full-batch gradient energy in
    the top-``K`` eigenspace (``gradient_energy_full[K - 1]``) and its difference
    ``plain - bn``.

    Returns:
        One dict per BN run with a no-BN partner: ``model``, ``bn_run``, ``plain_run``,
        ``bn_mode``, ``step``, ``headline_ratio_plain``, ``headline_ratio_bn``,
        ``headline_ratio_quotient``, ``outlier_ratio_plain``, ``outlier_ratio_bn``,
        ``outlier_ratio_quotient``, ``energy_topK_plain``, ``energy_topK_bn``,
        ``energy_topK_difference``, ``minibatch_energy_topK_plain``,
        ``minibatch_energy_topK_bn``, ``num_classes`` (all numbers as measured).
    """
    runs = results.get("runs", [])
    out = []
    for bn_run in runs:
        if not bn_run.get("batchnorm") or not bn_run.get("checkpoints"):
            continue
        plain = _partner(runs, bn_run)
        if plain is None:
            continue
        steps = {c["step"] for c in plain["checkpoints"]} & {
            c["step"] for c in bn_run["checkpoints"]
        }
        if steps:
            out.append(_compare(plain, bn_run, max(steps)))
    return out


def summary_text(results: Mapping[str, Any], out_dir: Path) -> str:
    """The lines the command prints when a run ends: status, time, folder, and per finding
    the headline ratios lambda_1 / lambda_{K+1} and top-K gradient energies with and
    without BN."""
    lines = [
        f"hessspec: study {results.get('status')} in "
        f"{results['timing']['seconds_total']:.1f} s; output in {out_dir}/"
    ]
    for f in findings(results):
        q, d = f["headline_ratio_quotient"], f["energy_topK_difference"]
        lines.append(
            f"  step {f['step']}: λ1/λ{f['num_classes'] + 1} {fmt(f['headline_ratio_plain'])} "
            f"without BN vs {fmt(f['headline_ratio_bn'])} with BN ({f['bn_mode']} mode)"
            + (f", {q:.3g}x" if q is not None else "")
            + f"; top-{f['num_classes']} gradient energy {f['energy_topK_plain']:.3g} vs "
            f"{f['energy_topK_bn']:.3g}" + (f" (difference {d:.3g})" if d is not None else "")
        )
    lines.append(f"  report: {out_dir / 'report.md'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------


def _last_checkpoint_table(results: Mapping[str, Any]) -> list[str]:
    """One row per run: its numbers at its last checkpoint."""
    header = [
        "run", "step", "params", "λ1", "λ1/λK+1 (headline)", "bulk edge", "outliers (K)",
        "λ1/bulk edge", "λ1/λK", "trace", "energy top-K (full)", "energy top-K (mini-batch)",
        "max rel. residual", "train loss", "test acc.",
    ]  # fmt: skip
    rows = []
    for run in results.get("runs", []):
        if not run.get("checkpoints"):
            continue
        c = run["checkpoints"][-1]
        k = int(run.get("num_classes") or 1)
        lam = c.get("top_eigenvalues") or [None]
        rel = [v for v in (c.get("relative_residuals") or []) if v is not None]
        mb_mean = _at(c.get("gradient_energy_minibatch_mean"), k - 1)
        mb_std = _at(c.get("gradient_energy_minibatch_std"), k - 1)
        rows.append(
            [
                run_label(run), fmt(c["step"]), fmt(run.get("num_params")), fmt(lam[0]),
                fmt(c.get("headline_ratio")), fmt(c.get("bulk_edge")),
                f"{fmt(c.get('num_outliers'))} ({k})",
                fmt(c.get("outlier_ratio")), fmt(c.get("lambda1_over_lambdaK")),
                f"{fmt(c.get('trace'))} ± {fmt(c.get('trace_stderr'), 2)}",
                fmt(_at(c.get("gradient_energy_full"), k - 1)),
                f"{fmt(mb_mean)} ± {fmt(mb_std, 2)}", fmt(max(rel) if rel else None, 2),
                fmt(c.get("train_loss")), fmt(c.get("test_accuracy")),
            ]
        )  # fmt: skip
    return md_table(header, rows).splitlines()


def _over_training_table(run: Mapping[str, Any]) -> list[str]:
    """One row per checkpoint of ``run``."""
    k = int(run.get("num_classes") or 1)
    header = [
        "step", "train loss", "test acc.", "λ1", "λ1/λK+1 (headline)", "outliers",
        "λ1/bulk edge", "λ1/λK", "top-K overlap with previous", "energy top-K (full)",
        "energy top-K (mini-batch)", "density σ",
    ]  # fmt: skip
    rows = [
        [
            fmt(c["step"]), fmt(c.get("train_loss")), fmt(c.get("test_accuracy")),
            fmt((c.get("top_eigenvalues") or [None])[0]), fmt(c.get("headline_ratio")),
            fmt(c.get("num_outliers")), fmt(c.get("outlier_ratio")),
            fmt(c.get("lambda1_over_lambdaK")), fmt(c.get("top_k_overlap_with_previous")),
            fmt(_at(c.get("gradient_energy_full"), k - 1)),
            fmt(_at(c.get("gradient_energy_minibatch_mean"), k - 1)),
            fmt(c.get("density_sigma"), 2),
        ]
        for c in run.get("checkpoints", [])
    ]  # fmt: skip
    return md_table(header, rows).splitlines()


def _status_lines(results: Mapping[str, Any]) -> list[str]:
    """The title, the status of a run that did not complete, what a re-analysis read."""
    lines = [f"# {results.get('config', {}).get('title', 'hessspec study')}", ""]
    status = results.get("status")
    if status != "complete":
        during = results.get("stopped_during")
        why = f" during {during}" if during else ""
        error = results.get("error")
        lines += [
            f"**Status: {status}{why}** — the numbers below cover what was measured."
            + (f" Error: {error}" if error else ""),
            "",
        ]
    if results.get("source"):
        src = results["source"]
        lines += [f"Re-analysis of {src.get('run_dir') or src.get('params_file')}.", ""]
    return lines


def _setting_lines(results: Mapping[str, Any]) -> list[str]:
    """The command, and the setting: data, analysis set, training, measurements,
    definitions, wall time."""
    cfg, data = results.get("config", {}), results.get("data", {})
    s, timing, t = results.get("settings", {}), results.get("timing", {}), cfg.get("train", {})
    lines = [
        f"hessspec {results.get('hessspec_version')}; command: `{results.get('command', '')}`",
        "",
        "## Setting",
        "",
        f"- Data: {data.get('name')} — {data.get('train_size')} training and "
        f"{data.get('test_size')} test examples of shape {data.get('input_shape')}, "
        f"{data.get('num_classes')} classes (K); preprocessing {data.get('preprocessing')}.",
        f"- Analysis set: {data.get('analysis_size')} fixed training examples; Hessian and "
        "full-batch gradient of the mean loss over them, cut into batches of "
        f"{s.get('hvp_batch_size')} (in BatchNorm train mode each batch is normalised with "
        "its own statistics; without BN and in eval/population mode the cut does not matter).",
        f"- Training: {t.get('optimizer')} (learning rate {t.get('learning_rate')}, "
        f"momentum {t.get('momentum')}, batch {t.get('batch_size')}, weight decay "
        f"{t.get('weight_decay')}) for {t.get('steps')} steps, seed {cfg.get('seed')}; "
        f"analysed at steps {results.get('checkpoint_steps')}.",
        _weight_decay_line(t, s),
        *_measurement_lines(s, int(data.get("num_classes") or 1)),
    ]
    if timing:
        lines.append(
            f"- Wall time: {fmt(timing.get('seconds_total'))} s in all "
            f"({fmt(timing.get('seconds_training'))} s training, "
            f"{fmt(timing.get('seconds_analysis'))} s analysis)."
        )
    return lines


def _weight_decay_line(t: Mapping[str, Any], s: Mapping[str, Any]) -> str:
    """Whether the analysed objective carries the training's weight decay, and its value."""
    wd, included = t.get("weight_decay") or 0, s.get("weight_decay") or 0
    if not wd:
        return "- Weight decay: none in the training, none in the analysed objective."
    if included:
        return (
            f"- Weight decay: included — the analysed objective is the mean loss + "
            f"(wd/2)·‖w‖² with wd = {fmt(included)} on every parameter, as SGD descends it "
            "(optax add_decayed_weights): Hessian + wd·I, gradients + wd·w; the train and "
            "test losses are the data loss alone."
        )
    if t.get("optimizer") == "adam":
        return (
            f"- Weight decay: not included — {fmt(wd)} is Adam's decoupled decay (AdamW), "
            "no term of the loss; the analysed objective is the mean loss alone."
        )
    return (
        f"- Weight decay: not included (analysis.include_weight_decay = false) — the "
        f"analysed objective is the mean loss alone; the training descended it + "
        f"(wd/2)·‖w‖² with wd = {fmt(wd)}, whose Hessian is {fmt(wd)} larger in every "
        "eigenvalue."
    )


def _measurement_lines(s: Mapping[str, Any], k: int) -> list[str]:
    """What each checkpoint measures, and the definitions of the numbers."""
    lines = [
        f"- Per checkpoint: top {s.get('top_k')} eigenpairs (Lanczos, residuals computed), "
        f"SLQ density with {s.get('slq_probes')} probes × {s.get('slq_steps')} steps, "
        f"{s.get('trace_method')} trace with {s.get('trace_matvecs')} matvecs, gradient "
        f"energy of the full-batch gradient and of {s.get('num_minibatches')} mini-batch "
        f"gradients ({s.get('minibatch_size')} examples each).",
        f"- Headline ratio: λ1/λK+1 = λ1/λ{k + 1}, K = {k} the number of classes (Papyan: "
        "about K outliers above the bulk), from the top eigenvalues — one definition for "
        "every run and checkpoint.",
        "- Outliers (extra columns): eigenvalues above the largest relative gap among the top "
        "eigenvalues; bulk edge = the largest eigenvalue that is not an outlier; outlier "
        "ratio = λ1 / bulk edge; K is the reference count.",
        f"- Top-K overlap with previous: ‖Q_prevᵀ Q‖²_F / K between the top-{k} eigenvectors "
        "of a checkpoint and of the run's previous checkpoint (Gur-Ari et al. 2018; 1: the "
        "same subspace).",
    ]
    if s.get("per_layer"):
        lines.append(
            "- Per-layer spectra: one block of the Hessian per layer (its kernel and bias with "
            "the scale and shift of the BatchNorm after it), each block's top "
            f"{s.get('per_layer_top_k')} eigenpairs, SLQ density with "
            f"{s.get('per_layer_slq_probes')} probes × {s.get('per_layer_slq_steps')} steps "
            f"and Hutch++ trace with {s.get('per_layer_trace_matvecs')} matvecs; a layer's "
            "share is its trace over the sum of the layers' traces (the trace of the whole "
            "Hessian)."
        )
    lines.append(
        "- Density smoothing: Gaussian kernel of standard deviation σ = "
        "sqrt(1e-5 · max(1, λmax − λmin)) (Ghorbani et al. 2019), per checkpoint; the σ used "
        "is listed in the tables below."
    )
    return lines


def _finding_lines(f: Mapping[str, Any]) -> list[str]:
    """One finding (:func:`findings`) in words, with the verdict on Ghorbani et al.'s
    effect when both numbers were measured."""
    k, q, d = f["num_classes"], f["headline_ratio_quotient"], f["energy_topK_difference"]
    lines = [
        f"- **{f['model']} without BN vs with BN ({f['bn_mode']} mode), step {f['step']}.** "
        f"Headline ratio λ1/λ{k + 1}: {fmt(f['headline_ratio_plain'])} without BN, "
        f"{fmt(f['headline_ratio_bn'])} with BN"
        + (f" — {fmt(q)} times larger without BN." if q is not None else ".")
        + f" (Gap-based outlier ratio λ1/bulk edge: {fmt(f['outlier_ratio_plain'])} vs "
        f"{fmt(f['outlier_ratio_bn'])}"
        + (f", {fmt(r)} times.)" if (r := f["outlier_ratio_quotient"]) is not None else ".)")
        + f" Fraction of the full-batch gradient in the top-{k} eigenspace: "
        f"{fmt(f['energy_topK_plain'])} without BN, {fmt(f['energy_topK_bn'])} with BN"
        + (f" (difference {fmt(d)})." if d is not None else ".")
        + f" Mini-batch gradients: {fmt(f['minibatch_energy_topK_plain'])} vs "
        f"{fmt(f['minibatch_energy_topK_bn'])}."
    ]
    if q is not None and d is not None:
        verdict = "shows" if q >= EFFECT_RATIO and d >= EFFECT_ENERGY else "does not show"
        lines.append(
            f"  This run {verdict} Ghorbani et al.'s effect at the thresholds of this "
            f"project (headline ratio λ1/λ{k + 1} at least {EFFECT_RATIO} times larger and "
            f"at least {EFFECT_ENERGY} more gradient energy in the top-{k} eigenspace without BN): "
            f"measured {fmt(q)} times and {fmt(d)}."
        )
    return lines


def render_report(results: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    """report.md: the setting, the findings with the measured numbers, the last checkpoint's
    table, the per-layer table and the sharpness (when measured), per-run tables over
    training, and the figures (``figures`` maps a caption to a path relative to the
    output folder)."""
    lines = _status_lines(results) + _setting_lines(results) + ["", "## Findings", ""]
    found = findings(results)
    if not found:
        lines.append(
            "No pair of networks with and without BatchNorm was analysed at a common step, "
            "so there is no comparison to state."
        )
    for f in found:
        lines += _finding_lines(f)
    lines += ["", "## At the last checkpoint", "", *_last_checkpoint_table(results)]
    lines += per_layer_lines(results) + sharpness_lines(results)
    for run in results.get("runs", []):
        lines += ["", f"## {run_label(run)} over training", "", *_over_training_table(run)]
        warn = [w for c in run.get("checkpoints", []) for w in c.get("warnings", [])]
        if warn:
            lines += ["", "Lanczos convergence notes:", ""] + [f"- {w}" for w in warn]
    if figures:
        lines += ["", "## Figures", ""]
        for caption, rel in figures.items():
            lines += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    out_dir: str | Path,
    results: Mapping[str, Any] | None = None,
    spectra: Mapping[str, np.ndarray] | None = None,
    *,
    on_written: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Draw the figures into ``out_dir/figures`` and write ``out_dir/report.md`` (last).

    Args:
        out_dir: the output folder.
        results, spectra: the study's results and arrays; read from the folder if None.
        on_written: called with each file's path relative to ``out_dir`` once it is
            written (so that a caller interrupted half-way knows what exists).

    Returns:
        Figure captions mapped to their paths relative to ``out_dir``.
    """
    import matplotlib.pyplot as plt

    from hessspec.studies.batchnorm_spectrum import plots

    out_dir = Path(out_dir)
    if results is None or spectra is None:
        loaded, arrays = load_results(out_dir)
        results = loaded if results is None else results
        spectra = arrays if spectra is None else spectra
    written = on_written or (lambda name: None)
    rel = {}
    for caption, (name, fig) in plots.draw_all(results, spectra).items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out_dir / FIGURES_DIR / f"{name}.png", buf.getvalue())
        rel[caption] = f"{FIGURES_DIR}/{name}.png"
        written(rel[caption])
    atomic_write_text(out_dir / "report.md", render_report(results, rel))
    written("report.md")
    return rel
