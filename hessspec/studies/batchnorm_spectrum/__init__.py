"""The BatchNorm spectrum study: train networks with and without BatchNorm, analyse their
Hessians at checkpoints, report (Ghorbani, Krishnan & Xiao 2019).

The whole study in one call, as ``python -m hessspec.run`` runs it::

    from hessspec.studies.batchnorm_spectrum import build_config, run_batchnorm_spectrum_study

    config = build_config(quick=True, overrides=["train.steps=200"])
    results = run_batchnorm_spectrum_study(config, "runs/quick")

or step by step: :func:`prepare_study` (data, analysis set, networks), :func:`run_study`
(train and analyse into a prepared folder), :func:`analyze_run` (analyse saved networks
again), :func:`load_results` and :func:`findings` (read a run back).

Modules: ``config`` (the study's config sections), ``setup`` (data and networks),
``preflight`` (memory before training), ``analyzer`` (every measurement at one checkpoint),
``session`` and ``runner`` (training and analysis into a run folder), ``reanalysis``
(``analyze``), ``study`` (the whole run, with its refusals and the run folder's swap),
``results`` (results.json and spectra.npz), ``report`` (findings and report.md), ``plots``
(the figures), ``errors`` (how a run stops). The names below are imported on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "hessspec.studies.batchnorm_spectrum.config": (
        "Config",
        "ConfigError",
        "QUICK_OVERRIDES",
        "apply_overrides",
        "build_config",
        "load_config",
        "validate",
    ),
    "hessspec.studies.batchnorm_spectrum.setup": ("SetupError", "StudySetup", "prepare_study"),
    "hessspec.studies.batchnorm_spectrum.runner": ("run_study",),
    "hessspec.studies.batchnorm_spectrum.reanalysis": ("analyze_run", "reanalyze"),
    "hessspec.studies.batchnorm_spectrum.study": ("run_batchnorm_spectrum_study",),
    "hessspec.studies.batchnorm_spectrum.results": (
        "load_results",
        "prepare_output_dir",
        "validate_results",
    ),
    "hessspec.studies.batchnorm_spectrum.report": ("findings", "write_report"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
