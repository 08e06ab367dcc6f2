"""What a BatchNorm spectrum run's results.json must hold (:data:`RESULTS_SCHEMA`,
:func:`validate_results`), and where two runs' results differ (:func:`compare_results`).

Besides the keys and JSON types of the top level, each run and each checkpoint, the
validator checks what the numbers must satisfy: ``bn_mode`` null exactly for runs without
BatchNorm; top eigenvalues sorted largest first with one residual each; the gradient-energy
lists one entry per eigenvalue, in ``[0, 1]`` and non-decreasing; ``headline_ratio`` equal
to ``lambda_1 / lambda_{K+1}`` of the checkpoint's own top eigenvalues (``K`` the run's
``num_classes``); ``top_k_overlap_with_previous`` in ``[0, 1]`` and null at a run's first
checkpoint; ``sharpness`` entries ``{"step", "lambda_max"}`` by increasing step; and a
``per_layer`` entry (when the run measured one) whose lists have one entry per block, whose
block sizes add up to the run's ``num_params``, and whose Jensen-Shannon distance matrix is
symmetric with a zero diagonal and entries in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["RESULTS_SCHEMA", "compare_results", "validate_results"]

#: Entries of a checkpoint record that measure time, not the network (left out by
#: :func:`compare_results`).
_TIMING_KEYS = frozenset({"seconds"})


def compare_results(a: Mapping[str, Any], b: Mapping[str, Any], *, rtol: float = 1e-6) -> list[str]:
    """Where two results differ in what they measured: every run's loss curve and every
    number of every checkpoint (timings left out), compared to ``rtol`` relative
    (``|x - y| <= rtol * max(|x|, |y|)``; nulls must match).

    Returns:
        One line per difference (empty: the same results), e.g.
        ``"mlp step 250 top_eigenvalues[3]: 1.2345 vs 1.2346"``.
    """
    problems: list[str] = []

    def close(x, y) -> bool:
        if x is None or y is None:
            return x is y
        return abs(x - y) <= rtol * max(abs(x), abs(y))

    def walk(x, y, where):
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            for k in sorted(set(x) | set(y)):
                if k in _TIMING_KEYS:
                    continue
                if k not in x or k not in y:
                    problems.append(
                        f"{where} {k}: only in {'the first' if k in x else 'the second'}"
                    )
                else:
                    walk(x[k], y[k], f"{where} {k}")
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                problems.append(f"{where}: {len(x)} vs {len(y)} entries")
                return
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                walk(u, v, f"{where}[{i}]")
        elif isinstance(x, bool) or isinstance(y, bool) or isinstance(x, str):
            if x != y:
                problems.append(f"{where}: {x!r} vs {y!r}")
        elif isinstance(x, int | float | None) and isinstance(y, int | float | None):
            if not close(x, y):
                problems.append(f"{where}: {x!r} vs {y!r}")
        elif x != y:
            problems.append(f"{where}: {x!r} vs {y!r}")

    runs_a = {r["name"]: r for r in a.get("runs", [])}
    runs_b = {r["name"]: r for r in b.get("runs", [])}
    if set(runs_a) != set(runs_b):
        problems.append(f"runs: {sorted(runs_a)} vs {sorted(runs_b)}")
    for name in sorted(set(runs_a) & set(runs_b)):
        ra, rb = runs_a[name], runs_b[name]
        walk(ra.get("loss_curve"), rb.get("loss_curve"), f"{name} loss_curve")
        steps_a = {c["step"]: c for c in ra.get("checkpoints", [])}
        steps_b = {c["step"]: c for c in rb.get("checkpoints", [])}
        if set(steps_a) != set(steps_b):
            problems.append(f"{name} checkpoints: {sorted(steps_a)} vs {sorted(steps_b)}")
        for step in sorted(set(steps_a) & set(steps_b)):
            walk(steps_a[step], steps_b[step], f"{name} step {step}")
    return problems


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))

#: Required keys and their JSON types: top level, each run, each checkpoint, and the
#: optional ``per_layer`` entry of a checkpoint.
RESULTS_SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "top": {"hessspec_version": (str,), "config": (dict,), "runs": (list,), "status": (str,)},
    "run": {
        "name": (str,),
        "batchnorm": (bool,),
        "bn_mode": (str, type(None)),
        "num_params": (int,),
        "num_classes": (int,),
        "checkpoints": (list,),
        "stability_threshold": _OPT_NUM,
        "sharpness": (list,),
    },
    "checkpoint": {
        "step": (int,),
        "train_loss": _OPT_NUM,
        "test_accuracy": _OPT_NUM,
        "top_eigenvalues": (list,),
        "residuals": (list,),
        "trace": _OPT_NUM,
        "headline_ratio": _OPT_NUM,
        "num_outliers": (int,),
        "bulk_edge": _OPT_NUM,
        "outlier_ratio": _OPT_NUM,
        "gradient_energy_full": (list,),
        "gradient_energy_minibatch_mean": (list,),
        "gradient_energy_minibatch_std": (list,),
        "top_k_overlap_with_previous": _OPT_NUM,
    },
    "per_layer": {
        "names": (list,),
        "sizes": (list,),
        "top_eigenvalues": (list,),
        "residuals": (list,),
        "traces": (list,),
        "js_distances": (list,),
        "density_sigma": _OPT_NUM,
    },
}


def _check_keys(obj: Any, kind: str, where: str, problems: list[str]) -> bool:
    if not isinstance(obj, dict):
        problems.append(f"{where}: expected an object, got {type(obj).__name__}")
        return False
    for key, types in RESULTS_SCHEMA[kind].items():
        if key not in obj:
            problems.append(f"{where}: missing key {key!r}")
        elif isinstance(obj[key], bool) and bool not in types:
            problems.append(f"{where}.{key}: expected {types}, got a boolean")
        elif not isinstance(obj[key], types):
            problems.append(f"{where}.{key}: expected {types}, got {type(obj[key]).__name__}")
    return True


def _numbers(values: Any) -> bool:
    """Whether ``values`` is a list of numbers (booleans are not)."""
    return isinstance(values, list) and all(
        isinstance(v, _NUM) and not isinstance(v, bool) for v in values
    )


def _check_run(run: Mapping[str, Any], where: str, problems: list[str]) -> None:
    """``bn_mode`` against ``batchnorm``, and the sharpness entries."""
    mode = run.get("bn_mode")
    if run.get("batchnorm") is True and mode not in ("train", "eval", "population"):
        problems.append(f"{where}.bn_mode: a BN run needs train/eval/population, got {mode!r}")
    if run.get("batchnorm") is False and mode is not None:
        problems.append(f"{where}.bn_mode: a run without BN needs null, got {mode!r}")
    steps = []
    for i, entry in enumerate(run.get("sharpness") or []):
        ok = isinstance(entry, dict) and isinstance(entry.get("step"), int)
        if not ok or not isinstance(entry.get("lambda_max"), _OPT_NUM):
            problems.append(f"{where}.sharpness[{i}]: expected {{'step': int, 'lambda_max'}}")
            return
        steps.append(entry["step"])
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        problems.append(f"{where}.sharpness: steps not increasing")


def _check_energies(ck: Mapping[str, Any], cw: str, n: int, problems: list[str]) -> None:
    """The gradient-energy lists: ``n`` entries, fractions, non-decreasing in k."""
    for key in (
        "gradient_energy_full",
        "gradient_energy_minibatch_mean",
        "gradient_energy_minibatch_std",
    ):
        vals = ck.get(key) or []
        if len(vals) != n:
            problems.append(f"{cw}.{key}: {len(vals)} entries for {n} eigenvalues")
            continue
        if not _numbers(vals):
            problems.append(f"{cw}.{key}: non-numeric entries")
            continue
        if key == "gradient_energy_minibatch_std":
            continue
        if any(v < -1e-9 or v > 1 + 1e-9 for v in vals):
            problems.append(f"{cw}.{key}: entries outside [0, 1]")
        if any(b < a - 1e-9 for a, b in zip(vals, vals[1:], strict=False)):
            problems.append(f"{cw}.{key}: not non-decreasing in k")


def _check_headline(ck: Mapping[str, Any], cw: str, k: int, problems: list[str]) -> None:
    """``headline_ratio`` = ``lambda_1 / lambda_{K+1}`` of the top eigenvalues (null when
    there are fewer than ``K + 1`` or ``lambda_{K+1} <= 0``)."""
    lam, ratio = ck.get("top_eigenvalues") or [], ck.get("headline_ratio")
    expected = lam[0] / lam[k] if len(lam) > k and lam[k] > 0 else None
    if (ratio is None) != (expected is None) or (
        ratio is not None and abs(ratio - expected) > 1e-9 * abs(expected)
    ):
        problems.append(f"{cw}.headline_ratio: {ratio!r}, but λ1/λ(K+1) = {expected!r}")


def _check_overlap(ck: Mapping[str, Any], cw: str, first: bool, problems: list[str]) -> None:
    """``top_k_overlap_with_previous``: a fraction, null at the first checkpoint."""
    overlap = ck.get("top_k_overlap_with_previous")
    if first and overlap is not None:
        problems.append(f"{cw}.top_k_overlap_with_previous: {overlap} at a first checkpoint")
    if overlap is not None and not -1e-9 <= overlap <= 1 + 1e-6:
        problems.append(f"{cw}.top_k_overlap_with_previous: {overlap} outside [0, 1]")


def _check_per_layer(layers: Any, cw: str, num_params: Any, problems: list[str]) -> None:
    """One entry per block in every list, sizes adding up to the network's, and the JS
    distance matrix of a metric in ``[0, 1]``."""
    where = f"{cw}.per_layer"
    if not _check_keys(layers, "per_layer", where, problems):
        return
    b = len(layers.get("names") or [])
    for key in ("sizes", "top_eigenvalues", "residuals", "traces", "js_distances"):
        if len(layers.get(key) or []) != b:
            problems.append(f"{where}.{key}: {len(layers.get(key) or [])} entries for {b} blocks")
            return
    if sum(layers["sizes"]) != num_params:
        problems.append(f"{where}.sizes: add up to {sum(layers['sizes'])}, not {num_params}")
    for i, (lam, res) in enumerate(
        zip(layers["top_eigenvalues"], layers["residuals"], strict=True)
    ):
        if not _numbers(lam) or len(res) != len(lam):
            problems.append(f"{where}.top_eigenvalues[{i}]: not numbers with one residual each")
        elif any(x < y for x, y in zip(lam, lam[1:], strict=False)):
            problems.append(f"{where}.top_eigenvalues[{i}]: not sorted largest first")
    js = layers["js_distances"]
    if not all(_numbers(row) and len(row) == b for row in js):
        problems.append(f"{where}.js_distances: not a {b} x {b} matrix of numbers")
        return
    if any(abs(js[i][j] - js[j][i]) > 1e-9 or js[i][i] != 0 for i in range(b) for j in range(b)):
        problems.append(f"{where}.js_distances: not symmetric with a zero diagonal")
    if any(not -1e-9 <= v <= 1 + 1e-9 for row in js for v in row):
        problems.append(f"{where}.js_distances: entries outside [0, 1]")


def _check_checkpoint(ck, cw: str, run, first: bool, problems: list[str]) -> None:
    """One checkpoint's numbers (its keys and types checked already)."""
    lam = ck.get("top_eigenvalues") or []
    if not _numbers(lam):
        problems.append(f"{cw}.top_eigenvalues: non-numeric entries")
        return
    if any(a < b for a, b in zip(lam, lam[1:], strict=False)):
        problems.append(f"{cw}.top_eigenvalues: not sorted largest first")
    if len(ck.get("residuals") or []) != len(lam):
        problems.append(f"{cw}.residuals: {len(ck['residuals'])} for {len(lam)} values")
    _check_energies(ck, cw, len(lam), problems)
    _check_headline(ck, cw, max(int(run.get("num_classes") or 1), 1), problems)
    _check_overlap(ck, cw, first, problems)
    if "per_layer" in ck:
        _check_per_layer(ck["per_layer"], cw, run.get("num_params"), problems)


def validate_results(results: Mapping[str, Any]) -> list[str]:
    """Problems of a results.json document against :data:`RESULTS_SCHEMA` and the rules of
    the module docstring (empty: valid)."""
    problems: list[str] = []
    if not _check_keys(results, "top", "results", problems):
        return problems
    for i, run in enumerate(results.get("runs", [])):
        where = f"runs[{i}]"
        if not _check_keys(run, "run", where, problems):
            continue
        _check_run(run, where, problems)
        for j, ck in enumerate(run.get("checkpoints", [])):
            cw = f"{where}.checkpoints[{j}]"
            if _check_keys(ck, "checkpoint", cw, problems):
                _check_checkpoint(ck, cw, run, j == 0, problems)
    return problems
