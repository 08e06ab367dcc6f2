"""The numbers of one analysis (:class:`StudySettings`), resolved from the config
(:func:`resolve_settings`): the config's "0 = automatic" entries filled, sizes clipped to
what the network and the data allow, and the weight decay the analysed objective carries.

The analysed objective (:func:`with_weight_decay`) is the mean loss over the analysis set,
plus, for SGD with ``train.weight_decay = wd > 0`` and ``analysis.include_weight_decay``,
the L2 term that SGD descends: optax's ``add_decayed_weights(wd)`` adds ``wd * w`` to the
gradient of every parameter (no mask: kernels, biases, BatchNorm scales and shifts), which
is the gradient of ``(wd / 2) ||w||^2``. So the analysed Hessian is ``H + wd I`` and the
analysed gradient ``g + wd w``. Adam's weight decay is decoupled (AdamW: the step subtracts
``lr * wd * w`` after the preconditioning), not the gradient of any term of the loss: it is
never added.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from hessspec.studies.batchnorm_spectrum.config import AnalysisConfig, TrainConfig

__all__ = [
    "StudySettings",
    "analysed_weight_decay",
    "resolve_settings",
    "with_weight_decay",
]


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """The numbers of one analysis, resolved from an :class:`AnalysisConfig`.

    Attributes:
        top_k: number of top eigenpairs (at least ``K + 1`` when the network allows it:
            the headline ratio is ``lambda_1 / lambda_{K+1}``).
        lanczos_steps: Lanczos basis size for the top eigenpairs (None: library default).
        tol: relative residual tolerance (None: library default for the model dtype).
        slq_probes: SLQ probe vectors.
        slq_steps: Lanczos steps per SLQ probe.
        slq_probe_batch_size: SLQ probes run together (None: all at once).
        trace_matvecs: matvecs for the trace estimate.
        matvec_batch_size: matvecs vmapped together in the trace estimate and the residual
            check of the eigenpairs (None: all at once).
        trace_method: ``"hutch++"`` or ``"hutchinson"``.
        hvp_batch_size: the analysis set is cut into consecutive batches of this many
            examples; in BN train mode each batch is normalised with its own statistics
            (this defines the analysed function); otherwise the loss separates over
            examples and the batches only group the work.
        chunk_size: examples per Hessian-vector-product chunk (a memory bound; None: the
            whole analysis set at once); a multiple of ``hvp_batch_size``.
        num_minibatches: number of mini-batch gradients.
        minibatch_size: examples per mini-batch gradient.
        eval_batch_size: batch size of the loss/accuracy evaluation.
        basis_dtype: dtype of the Krylov bases of the top eigenpairs and of SLQ
            (``"float32"`` or ``"float64"``; None: the solver dtype, float64 with x64).
        basis_memory: where those bases live, ``"device"`` or ``"host"``.
        weight_decay: ``wd`` of the L2 term ``(wd / 2) ||w||^2`` in the analysed objective
            (0: none; :func:`analysed_weight_decay`).
        per_layer: whether per-layer (block) spectra are measured.
        per_layer_top_k, per_layer_slq_probes, per_layer_slq_steps,
        per_layer_trace_matvecs: the solver sizes of each block (capped at its size).
    """

    top_k: int
    lanczos_steps: int | None
    tol: float | None
    slq_probes: int
    slq_steps: int
    slq_probe_batch_size: int | None
    trace_matvecs: int
    matvec_batch_size: int | None
    trace_method: str
    hvp_batch_size: int
    chunk_size: int | None
    num_minibatches: int
    minibatch_size: int
    eval_batch_size: int
    basis_dtype: str | None = None
    basis_memory: str = "device"
    weight_decay: float = 0.0
    per_layer: bool = False
    per_layer_top_k: int = 3
    per_layer_slq_probes: int = 4
    per_layer_slq_steps: int = 40
    per_layer_trace_matvecs: int = 60


def analysed_weight_decay(analysis: AnalysisConfig, train: TrainConfig) -> float:
    """``wd`` of the L2 term in the analysed objective: ``train.weight_decay`` for SGD when
    ``analysis.include_weight_decay``, else 0 (Adam's decay is decoupled: no loss term)."""
    if not analysis.include_weight_decay or train.optimizer != "sgd":
        return 0.0
    return float(train.weight_decay)


@functools.cache
def _loss_plus_l2(weight_decay: float) -> Callable:
    """``(loss_fn, params, batch) -> loss_fn(params, batch) + (wd / 2) ||params||^2``; one
    function object per ``wd``, so operators built from it compare equal between
    checkpoints (compiled programs are reused)."""

    def loss_plus_l2(loss_fn, params, batch):
        import jax
        import jax.numpy as jnp

        squares = sum(jnp.vdot(p, p) for p in jax.tree.leaves(params))
        return loss_fn(params, batch) + 0.5 * weight_decay * squares

    return loss_plus_l2


def with_weight_decay(loss_fn: Any, weight_decay: float) -> Any:
    """``loss_fn`` plus ``(wd / 2) ||params||^2`` over every parameter leaf, as a
    ``jax.tree_util.Partial`` (``loss_fn``'s own leaves stay operands); ``loss_fn`` itself
    when ``wd == 0``. Its Hessian is ``H + wd I``, its gradient ``g + wd w``."""
    if not weight_decay:
        return loss_fn
    import jax

    return jax.tree_util.Partial(_loss_plus_l2(float(weight_decay)), loss_fn)


def resolve_settings(
    analysis: AnalysisConfig,
    train: TrainConfig,
    num_classes: int,
    num_params: int,
    analysis_size: int,
    train_size: int,
) -> StudySettings:
    """Fill the config's "0 = automatic" entries and clip to what the problem allows.

    ``top_k = 2K`` and every batch size 0 become ``train.batch_size`` (clipped to the
    analysis/training set); ``top_k`` and the Krylov sizes are clipped to the number of
    parameters (a Krylov space has at most that many dimensions).
    """
    dim = int(num_params)
    k = analysis.top_k or 2 * max(int(num_classes), 1)
    k = max(1, min(k, dim - 1 if dim > 1 else 1))
    steps = analysis.lanczos_steps or None
    if steps is not None:
        steps = min(max(steps, k + 1), dim)
    hvp_bs = min(analysis.batch_size or train.batch_size, analysis_size)
    chunk = None
    if analysis.chunk_size and analysis.chunk_size < analysis_size:
        chunk = max(hvp_bs, analysis.chunk_size // hvp_bs * hvp_bs)
    mb = min(analysis.minibatch_size or train.batch_size, train_size)
    return StudySettings(
        top_k=k,
        lanczos_steps=steps,
        tol=analysis.tol or None,
        slq_probes=analysis.slq_probes,
        slq_steps=min(analysis.slq_steps, dim),
        slq_probe_batch_size=analysis.slq_probe_batch_size or None,
        trace_matvecs=max(analysis.trace_matvecs, 4),
        matvec_batch_size=analysis.matvec_batch_size or None,
        trace_method=analysis.trace_method,
        hvp_batch_size=hvp_bs,
        chunk_size=chunk,
        num_minibatches=analysis.num_minibatches,
        minibatch_size=mb,
        eval_batch_size=hvp_bs,
        basis_dtype=analysis.basis_dtype or None,
        basis_memory=analysis.basis_memory,
        weight_decay=analysed_weight_decay(analysis, train),
        per_layer=analysis.per_layer,
        per_layer_top_k=analysis.per_layer_top_k,
        per_layer_slq_probes=analysis.per_layer_slq_probes,
        per_layer_slq_steps=analysis.per_layer_slq_steps,
        per_layer_trace_matvecs=max(analysis.per_layer_trace_matvecs, 4),
    )
