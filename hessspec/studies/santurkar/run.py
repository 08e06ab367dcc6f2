"""The Santurkar study, run end to end: :func:`run_santurkar_study`."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from hessspec.studies.common.checks import dtype_of
from hessspec.studies.common.config import ConfigError
from hessspec.studies.common.runner import Study, run_study
from hessspec.studies.santurkar.config import EXPERIMENT, SanturkarConfig
from hessspec.studies.santurkar.plots import figures_for
from hessspec.studies.santurkar.report import report
from hessspec.studies.santurkar.summary import comparison, lr_row, summarize_records
from hessspec.studies.santurkar.train import train_variant

__all__ = ["SANTURKAR", "run_santurkar_study"]


def _digits(config: SanturkarConfig):
    """``(train set, test set)`` of the digits as the config's model reads them."""
    from hessspec.nn.data import load_digits

    kw = dict(
        preprocessing=config.preprocessing,
        flatten=config.model == "mlp",
        seed=config.seed,
        dtype=np.dtype(dtype_of(config.dtype)),
    )
    train_set, test_set = load_digits("train", **kw), load_digits("test", **kw)
    if config.batch_size > train_set.num_examples:
        raise ConfigError(
            f"config key 'batch_size' = {config.batch_size} exceeds the "
            f"{train_set.num_examples} training examples."
        )
    return train_set, test_set


def _sweep(config: SanturkarConfig) -> list[float]:
    """The sweep's learning rates other than the main one."""
    return [lr for lr in config.sweep_learning_rates if lr != config.learning_rate]


def _train_all(config: SanturkarConfig, lr: float, data, cache, bar, *, with_ics: bool):
    """Every variant trained at ``lr``, each run with its ``summary``."""
    runs = {}
    for variant in config.variants:
        bar.set_postfix_str(f"{variant} lr={lr:g}")
        run = train_variant(config, variant, lr, *data, with_ics, cache)
        run["summary"] = summarize_records(run["records"], lr)
        runs[variant] = run
        bar.update(1)
    return runs


def _measure(config: SanturkarConfig, bar):
    """The main runs (with covariate shift) and the sweep runs: the ``learning_rate``,
    ``runs``, ``comparison``, ``lr_table`` and ``lr_comparisons`` entries, and the seconds
    of each."""
    data, cache = _digits(config), {}
    t0 = time.perf_counter()
    runs = _train_all(config, config.learning_rate, data, cache, bar, with_ics=True)
    t1 = time.perf_counter()
    by_lr = [(config.learning_rate, runs)]
    by_lr += [
        (lr, _train_all(config, lr, data, cache, bar, with_ics=False)) for lr in _sweep(config)
    ]
    t2 = time.perf_counter()
    entries = {
        "learning_rate": config.learning_rate,
        "runs": runs,
        "comparison": comparison(runs),
        "lr_table": [lr_row(r) for _, group in by_lr for r in group.values()],
        "lr_comparisons": [
            {"learning_rate": lr, "comparison": comparison(group)} for lr, group in by_lr
        ],
    }
    return entries, {"main_s": t1 - t0, "sweep_s": t2 - t1}


def _num_parts(config: SanturkarConfig) -> int:
    """The parts the progress bar counts."""
    return len(config.variants) * (1 + len(_sweep(config)))


#: The study for :func:`hessspec.studies.common.runner.run_study`.
SANTURKAR = Study(EXPERIMENT, SanturkarConfig, figures_for, _num_parts, _measure, report)


def run_santurkar_study(config, out_dir, progress=True, *, overwrite=False) -> dict[str, Any]:
    """Run the Santurkar landscape study and write results.json, figures/*.png, report.md
    and config.toml into ``out_dir``; the arguments are those of
    :func:`hessspec.studies.common.runner.run_study` (``config`` a :class:`SanturkarConfig`
    or a mapping; FileExistsError when ``out_dir`` holds one of the run's files and
    ``overwrite`` is off).

    Returns:
        The results dict (what results.json holds): ``experiment``, ``config``,
        ``learning_rate``, ``runs`` (per variant: the records over training, the layer
        names, training losses, accuracies, ``summary``), ``comparison`` (BN against
        standard, with ``acceptance``), ``lr_table`` and ``lr_comparisons`` (the main and
        the sweep learning rates), ``environment``, ``timing`` and ``files``.
    """
    return run_study(SANTURKAR, config, out_dir, progress=progress, overwrite=overwrite)
