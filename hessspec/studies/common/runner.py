"""One run of a single-process study (input bias, Santurkar) from config to run folder:
:func:`run_study` does what every such study does around its own measurements."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from hessspec.studies.common.environment import environment
from hessspec.studies.common.experiment import as_config
from hessspec.studies.common.jsonio import jsonable
from hessspec.studies.common.output import StudyOutput

__all__ = ["Study", "run_study"]

Results = dict[str, Any]


class Study(NamedTuple):
    """What :func:`run_study` needs to know of a study.

    Attributes:
        name: the ``experiment`` name (results.json's ``experiment``, the progress bar).
        config_class: its config class (an :class:`~.experiment.ExperimentConfig`).
        figures: ``figures(config)`` -> {figure file name: ``draw(results) -> Figure``}, the
            figures a run of that config draws.
        num_parts: ``num_parts(config)``, the progress bar's total.
        measure: ``measure(config, bar) -> (entries, timing)``: the study's own results
            entries (in results.json order) and the seconds of its phases; it advances the
            tqdm ``bar`` once per part.
        report: ``report(results, config) -> str``, report.md.
    """

    name: str
    config_class: type
    figures: Callable[[Any], Mapping[str, Callable[[Results], Any]]]
    num_parts: Callable[[Any], int]
    measure: Callable[[Any, Any], tuple[Mapping[str, Any], Mapping[str, float]]]
    report: Callable[[Results, Any], str]


def _measure(study: Study, config, progress: bool):
    """``study.measure`` under ``jax.enable_x64(config.x64)`` with a progress bar, and the
    environment it ran in."""
    import jax
    from tqdm.auto import tqdm

    bar = tqdm(
        total=study.num_parts(config), desc=study.name, disable=not progress, dynamic_ncols=True
    )
    try:
        with jax.enable_x64(config.x64):
            env = environment()
            entries, timing = study.measure(config, bar)
    finally:
        bar.close()
    return entries, timing, env


def run_study(
    study: Study,
    config: Any,
    out_dir: str | Path,
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> Results:
    """Run ``study`` and write its run folder: results.json, figures/*.png, report.md and
    config.toml.

    Args:
        study: the study.
        config: its config (or a mapping, read with ``study.config_class.from_dict``).
        out_dir: output folder, created if missing. Files already there are never
            overwritten: FileExistsError, before any work, if one of the run's file names
            is taken (:class:`~.output.StudyOutput`).
        progress: show a tqdm progress bar on stderr.
        overwrite: replace a previous run's files if present; the new run is swapped in
            whole when it is complete, other files are never touched.

    Returns:
        What results.json holds: ``experiment``, ``config``, the study's own entries,
        ``environment``, ``timing`` (the study's phases and ``total_s``) and ``files``
        (every file of the run, results.json first).
    """
    config = as_config(config, study.config_class)
    output = StudyOutput(out_dir, overwrite=overwrite)
    figures = study.figures(config)
    files = ["results.json", "report.md", "config.toml", *figures]
    output.claim(files)
    started = time.perf_counter()
    entries, timing, env = _measure(study, config, progress)
    results = {"experiment": study.name, "config": config.to_dict(), **entries}
    results.update(environment=env, timing={**timing, "total_s": 0.0}, files=files)
    results = jsonable(results)
    output.write_text("config.toml", config.to_toml())
    for name, draw in figures.items():
        output.save_figure(name, draw(results))
    results["timing"]["total_s"] = time.perf_counter() - started
    output.write_text("report.md", study.report(results, config))
    output.write_json("results.json", results)  # last: the folder's index
    output.commit()
    return results
