"""The BatchNorm spectrum study: train networks with and without BatchNorm, analyse their
Hessians at checkpoints, report (Ghorbani, Krishnan & Xiao 2019).

The whole study in one call, as ``python -m hessspec.run`` runs it::

    from hessspec.studies.batchnorm_spectrum import build_config, run_batchnorm_spectrum_study

    config = build_config(quick=True, overrides=["train.steps=200"])
    results = run_batchnorm_spectrum_study(config, "runs/quick")

or step by step: :func:`prepare_study` (data, analysis set, networks), :func:`run_study`
(train and analyse into a prepared folder), :func:`analyze_run` (analyse saved networks
again), :func:`load_results` and :func:`findings` (read a run back).

Modules: ``config`` (the study's config sections), ``settings`` (their resolved numbers, the
weight decay of the analysed objective), ``setup`` (data and networks), ``preflight``
(memory before training), ``analyzer`` (every measurement at one checkpoint), ``layers``
(per-layer spectra), ``tracking`` (the top-K overlap between checkpoints, the sharpness
during training), ``session`` and ``runner`` (training and analysis into a run folder),
``reanalysis`` (``analyze``), ``study`` (the whole run, with its refusals and the run
folder's swap), ``results`` (results.json and spectra.npz) and ``schema`` (what they must
hold), ``report`` and ``report_sections`` (findings and report.md), ``plots`` (the
figures), ``errors`` (how a run stops).
"""

from hessspec.studies.batchnorm_spectrum.config import (
    QUICK_OVERRIDES,
    Config,
    ConfigError,
    apply_overrides,
    build_config,
    load_config,
    validate,
)
from hessspec.studies.batchnorm_spectrum.reanalysis import analyze_run, reanalyze
from hessspec.studies.batchnorm_spectrum.report import findings, write_report
from hessspec.studies.batchnorm_spectrum.results import (
    load_results,
    prepare_output_dir,
    validate_results,
)
from hessspec.studies.batchnorm_spectrum.runner import run_study
from hessspec.studies.batchnorm_spectrum.setup import SetupError, StudySetup, prepare_study
from hessspec.studies.batchnorm_spectrum.study import run_batchnorm_spectrum_study

__all__ = [
    "QUICK_OVERRIDES",
    "Config",
    "ConfigError",
    "SetupError",
    "StudySetup",
    "analyze_run",
    "apply_overrides",
    "build_config",
    "findings",
    "load_config",
    "load_results",
    "prepare_output_dir",
    "prepare_study",
    "reanalyze",
    "run_batchnorm_spectrum_study",
    "run_study",
    "validate",
    "validate_results",
    "write_report",
]
