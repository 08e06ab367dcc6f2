"""One run of a single-process study (input bias, Santurkar, edge of stability) from config
to run folder: :func:`run_study` does what every such study does around its own
measurements, progress included (a bar on a terminal, a log line per part elsewhere)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from hessspec.nn.progress import Progress
from hessspec.studies.common.environment import environment
from hessspec.studies.common.experiment import as_config
from hessspec.studies.common.jsonio import jsonable
from hessspec.studies.common.output import StudyOutput

__all__ = ["PartsProgress", "Study", "run_study"]

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
            entries (in results.json order) and the seconds of its phases; it names each
            part as it starts (``bar.set_postfix_str(text)``) and counts it when it ends
            (``bar.update(1)``) on the :class:`PartsProgress` it is given.
        report: ``report(results, config) -> str``, report.md.
    """

    name: str
    config_class: type
    figures: Callable[[Any], Mapping[str, Callable[[Results], Any]]]
    num_parts: Callable[[Any], int]
    measure: Callable[[Any, Any], tuple[Mapping[str, Any], Mapping[str, float]]]
    report: Callable[[Results, Any], str]


class PartsProgress:
    """The progress of a study's parts, driven as a tqdm bar is (``set_postfix_str`` when a
    part starts, ``update`` when it ends): a bar in the ``"bars"`` style, one log line per
    part started, with the time since the run began, in the ``"lines"`` style (logs, batch
    jobs, ``--no-progress``), nothing when off."""

    def __init__(self, progress: Progress, name: str, total: int):
        self.progress, self.name, self.total, self.done = progress, name, int(total), 0
        self._bar = None
        if progress.style == "bars":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=name, dynamic_ncols=True, file=progress.stream)

    def set_postfix_str(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)
        elif self.progress.style == "lines":
            self.progress.line(f"{self.name} {min(self.done + 1, self.total)}/{self.total}: {text}")

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _measure(study: Study, config, progress: bool | str | Progress):
    """``study.measure`` under ``jax.enable_x64(config.x64)`` with its progress, and the
    environment it ran in."""
    import jax

    parts = PartsProgress(Progress.of(progress), study.name, study.num_parts(config))
    try:
        with jax.enable_x64(config.x64):
            env = environment()
            entries, timing = study.measure(config, parts)
    finally:
        parts.close()
    return entries, timing, env


def run_study(
    study: Study,
    config: Any,
    out_dir: str | Path,
    *,
    progress: bool | str | Progress = True,
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
        progress: on stderr: True, a bar on a terminal and log lines elsewhere; False,
            nothing; or a :class:`~hessspec.nn.progress.Progress` style (``"lines"``).
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
