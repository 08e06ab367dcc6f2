"""The input-bias study, run end to end: :func:`run_input_bias_study`."""

from __future__ import annotations

import time
from typing import Any

from hessspec.studies.common.runner import Study, run_study
from hessspec.studies.input_bias.config import EXPERIMENT, InputBiasConfig
from hessspec.studies.input_bias.linear import run_linear
from hessspec.studies.input_bias.mlp import run_mlp
from hessspec.studies.input_bias.plots import figures_for
from hessspec.studies.input_bias.report import report

__all__ = ["INPUT_BIAS", "run_input_bias_study"]


def _measure(config: InputBiasConfig, bar):
    """Both parts: the ``linear`` and ``mlp`` (None when switched off) entries, and the
    seconds of each."""
    t0 = time.perf_counter()
    linear = run_linear(config, bar)
    t1 = time.perf_counter()
    mlp = run_mlp(config, bar) if config.mlp.enabled else None
    t2 = time.perf_counter()
    return {"linear": linear, "mlp": mlp}, {"linear_s": t1 - t0, "mlp_s": t2 - t1}


def _num_parts(config: InputBiasConfig) -> int:
    """The parts the progress bar counts."""
    return 2 + (3 if config.mlp.enabled else 0)


#: The study for :func:`hessspec.studies.common.runner.run_study`.
INPUT_BIAS = Study(EXPERIMENT, InputBiasConfig, figures_for, _num_parts, _measure, report)


def run_input_bias_study(config, out_dir, progress=True, *, overwrite=False) -> dict[str, Any]:
    """Run the input-bias study and write results.json, figures/*.png, report.md and
    config.toml into ``out_dir``; the arguments are those of
    :func:`hessspec.studies.common.runner.run_study` (``config`` an
    :class:`InputBiasConfig` or a mapping; FileExistsError when ``out_dir`` holds one of
    the run's files and ``overwrite`` is off).

    Returns:
        The results dict (what results.json holds): ``experiment``, ``config``, ``linear``
        (per variant measured eigenvalues, predictions, SLQ quadrature, GD run and bounds;
        ``agreements`` with relative errors and ``all_within_tolerance``), ``mlp`` (per
        variant, step and BN mode the top eigenvalues, outlier split, SLQ quadrature,
        training losses) or None, ``environment``, ``timing`` and ``files``.
    """
    return run_study(INPUT_BIAS, config, out_dir, progress=progress, overwrite=overwrite)
