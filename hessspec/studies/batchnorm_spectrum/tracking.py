"""What a run follows across checkpoints and training steps, beside each checkpoint's own
analysis:

- :class:`SubspaceOverlaps`: the overlap of the top-``K`` Hessian eigenspace of a checkpoint
  with that of the run's previous checkpoint, ``||Q_prev^T Q||_F^2 / K`` (Gur-Ari, Roberts &
  Dyer 2018: it stabilises early in training), ``K`` = the number of classes;
- :func:`sharpness_tracking`: ``lambda_max`` of the training objective every
  ``train.track_sharpness_every`` steps while a network trains (Cohen et al. 2021), for
  ``runs[].sharpness``, with the optimizer's stability threshold (``runs[].stability_threshold``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from hessspec.studies.batchnorm_spectrum.results import ResultsWriter, spectra_key

__all__ = [
    "SharpnessTracking",
    "SubspaceOverlaps",
    "sharpness_tracking",
    "stability_threshold_or_none",
]


class SubspaceOverlaps:
    """The overlap of each checkpoint's top-``K`` eigenvectors with the previous recorded
    checkpoint's of the same run (``runs[].checkpoints[].top_k_overlap_with_previous``).

    The eigenvectors are those stored in spectra.npz (rows of ``eigenvectors``, float32),
    so the number is the same whether the previous checkpoint was analysed in this session
    (held in memory) or an earlier one (read from the run's spectra.npz), and a reader can
    recompute it from spectra.npz. None at a run's first checkpoint, and when the previous
    checkpoint's eigenvectors are not at hand (``analysis.save_eigenvectors = false`` and
    the previous checkpoint analysed in an earlier session).

    Args:
        writer: the run's results (its recorded checkpoints and arrays).
    """

    def __init__(self, writer: ResultsWriter):
        self.writer = writer
        self.held: dict[str, tuple[int, np.ndarray]] = {}  # run name -> (step, top-K rows)

    def _previous(self, name: str, step: int, k: int) -> np.ndarray | None:
        run = self.writer.results["runs"][self.writer.run_index(name)]
        earlier = [int(c["step"]) for c in run["checkpoints"] if int(c["step"]) < step]
        if not earlier:
            return None
        before = max(earlier)
        held = self.held.get(name)
        if held is not None and held[0] == before:
            return held[1]
        stored = self.writer.arrays.get(spectra_key(name, before, "eigenvectors"))
        return None if stored is None else np.asarray(stored[:k], np.float64)

    def overlap(self, name: str, step: int, eigenvectors: Any, k: int) -> float | None:
        """``||Q_prev^T Q||_F^2 / K`` (:func:`hessspec.subspace_overlap`) of the top ``k``
        rows of ``eigenvectors`` (this checkpoint of run ``name``, rounded to float32 as
        stored) and those of the run's previous checkpoint; None when there is none."""
        from hessspec.analysis.spectrum import subspace_overlap

        if eigenvectors is None:
            return None
        vectors = np.asarray(np.asarray(eigenvectors)[:k].astype(np.float32), np.float64)
        previous = self._previous(name, step, k)
        self.held[name] = (int(step), vectors)
        if previous is None or previous.shape != vectors.shape:
            return None
        return subspace_overlap(previous, vectors)


def stability_threshold_or_none(train_config) -> float | None:
    """:func:`hessspec.nn.train.stability_threshold` of the training, None where it is not
    defined (Adam, Nesterov momentum)."""
    from hessspec.nn.train import stability_threshold

    try:
        return stability_threshold(train_config)
    except ValueError:
        return None


class SharpnessTracking(NamedTuple):
    """The observer that tracks the sharpness during one network's training.

    Attributes:
        observe: the observer for :func:`hessspec.nn.train.train` (``observe=``).
        steps: the steps it observes (``observe_at=``).
        entries: ``{"step", "lambda_max"}`` of every step measured, kept however the
            training ends (those an earlier session measured first).
    """

    observe: Callable[[Any], float]
    steps: list[int]
    entries: list[dict[str, Any]]


def sharpness_tracking(
    setup, net, *, weight_decay: float, start: int, earlier: list[dict[str, Any]]
) -> SharpnessTracking | None:
    """Sharpness tracking for ``net``'s training from step ``start``, or None when
    ``train.track_sharpness_every`` is 0.

    ``lambda_max`` of the training objective: the network's loss with BatchNorm in train
    mode (each batch normalised with its own statistics, as SGD sees it) over the analysis
    set cut into consecutive batches of ``train.batch_size``, plus ``(wd / 2) ||w||^2``
    with the analysed weight decay ``weight_decay``; at steps ``0, every, 2 every, ...``
    and the last (:func:`hessspec.nn.sharpness.tracking_steps`), each Lanczos run
    warm-started from the previous top eigenvector
    (:class:`hessspec.nn.sharpness.SharpnessTracker`).

    Args:
        setup: the study.
        net: the network (its graph and loss; the parameters come from the training loop).
        weight_decay: the L2 coefficient of the analysed objective.
        start: the step training starts (or resumes) from.
        earlier: entries measured by earlier sessions (those before ``start`` are kept).
    """
    from hessspec.nn.objective import make_objective
    from hessspec.nn.sharpness import SharpnessTracker, tracking_steps
    from hessspec.studies.batchnorm_spectrum.settings import with_weight_decay

    config = setup.config
    every = config.train.track_sharpness_every
    if not every:
        return None
    objective = make_objective(
        net.model, config.model.loss, bn_mode="train" if net.batchnorm else None
    )
    data = setup.analysis_set
    tracker = SharpnessTracker(
        with_weight_decay(objective.loss_fn, weight_decay),
        data.batch,
        batch_size=min(config.train.batch_size, data.num_examples),
    )
    entries = [dict(e) for e in earlier if int(e["step"]) < start]

    def observe(seen) -> float:
        seen.status(f"sharpness at step {seen.step}")
        value = tracker(seen.params).value
        entries.append({"step": int(seen.step), "lambda_max": value})
        return value

    steps = [s for s in tracking_steps(config.train.steps, every) if s >= start]
    return SharpnessTracking(observe, steps, entries)
