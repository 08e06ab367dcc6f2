"""One checkpoint of a BatchNorm spectrum study: every measurement on one objective.

:class:`CheckpointAnalyzer` takes an :class:`~hessspec.nn.objective.Objective` (a network at one
training step, in one BatchNorm mode) and measures, on a fixed analysis set:

- the top ``k`` Hessian eigenpairs (``k = 2K`` by default, ``K`` classes) with their
  computed residuals (:func:`hessspec.top_eigenpairs`);
- the SLQ spectral density (:func:`hessspec.spectral_density`), smoothed with Ghorbani's
  default width on a grid fine enough to resolve it;
- the Hessian trace (:func:`hessspec.linalg.trace`, Hutch++ by default);
- the headline ratio ``lambda_1 / lambda_{K+1}`` (one definition for every run and
  checkpoint, which no heuristic can flip), and the outlier/bulk split of the top
  eigenvalues at their largest relative gap (:func:`hessspec.outlier_split`);
- the gradient energy in the top-``j`` eigenspace, ``j = 1..k``, of the full-batch
  gradient of the analysed loss and of mini-batch gradients from the training set (mean
  and standard deviation over several mini-batches);
- per-layer spectra (:mod:`hessspec.studies.batchnorm_spectrum.layers`) when
  ``settings.per_layer``;
- loss and accuracy on the training and test sets, and the analysed loss itself.

The Hessian and the full-batch gradient are those of ``sum_b (|b|/N) L_b`` over the
analysis set cut into consecutive batches of ``hvp_batch_size`` (exactly the dataset-mean
loss without BatchNorm and in eval/population mode; in BN train mode the function whose
batches use their own statistics, as in :func:`hessspec.hessian_operator` with that batch
size), plus ``(wd / 2) ||w||^2`` when ``settings.weight_decay = wd > 0``
(:func:`~hessspec.studies.batchnorm_spectrum.settings.with_weight_decay`; the mini-batch
gradients get ``wd w`` too; the train/test losses are the data loss alone). Every metric is
computed in the objective's BN mode. It knows nothing of files: it
returns a JSON-ready record and a dict of arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from hessspec.analysis.spectrum import gradient_energy, outlier_split
from hessspec.curvature.operators import dataset_gradient, hessian_operator
from hessspec.linalg.density import density_grid, spectral_density
from hessspec.linalg.lanczos import LanczosConvergenceWarning, top_eigenpairs
from hessspec.linalg.linop import LinearOperator
from hessspec.linalg.memory import MemoryEstimate, estimate_memory
from hessspec.linalg.trace import trace
from hessspec.nn.data import Dataset
from hessspec.nn.objective import Objective, output_loss
from hessspec.studies.batchnorm_spectrum.layers import measure_layers
from hessspec.studies.batchnorm_spectrum.settings import (
    StudySettings,
    resolve_settings,
    with_weight_decay,
)

__all__ = [
    "CheckpointAnalysis",
    "CheckpointAnalyzer",
    "StudySettings",
    "analysis_stages",
    "convergence_notes",
    "density_grid",
    "headline_ratio",
    "resolve_settings",
]

#: The stages :meth:`CheckpointAnalyzer.analyse` reports, in order (``"per-layer spectra"``
#: only when ``settings.per_layer``): :func:`analysis_stages`.
_STAGES = ("hessian", "top eigenpairs", "density", "trace", "gradients", "per-layer spectra",
           "metrics")  # fmt: skip


def analysis_stages(per_layer: bool) -> tuple[str, ...]:
    """The stages :meth:`CheckpointAnalyzer.analyse` reports, in order."""
    return tuple(s for s in _STAGES if per_layer or s != "per-layer spectra")


@dataclasses.dataclass(frozen=True)
class CheckpointAnalysis:
    """The result of :meth:`CheckpointAnalyzer.analyse`.

    Attributes:
        record: JSON-ready dict (floats, ints, lists; NaN written as None), the checkpoint
            entry of ``results.json``.
        arrays: numpy arrays for ``spectra.npz``: ``nodes``, ``weights`` (SLQ, ``(P, m)``),
            ``eigenvalues``, ``residuals`` (``(k,)``), ``eigenvectors`` (``(k, dim)``),
            ``density_grid``, ``density`` (``(G,)``), ``gradient_energy_minibatch``
            (``(B, k)``), and the per-layer arrays
            (:func:`~hessspec.studies.batchnorm_spectrum.layers.measure_layers`).
    """

    record: dict[str, Any]
    arrays: dict[str, np.ndarray]


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _floats(a: Any) -> list[float | None]:
    return [_finite_or_none(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


@contextlib.contextmanager
def convergence_notes() -> Iterator[list[str]]:
    """Collect the Lanczos convergence warnings raised inside as notes (a list, filled on
    exit); every other warning is passed on."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LanczosConvergenceWarning)
        yield notes
    for w in caught:
        if issubclass(w.category, LanczosConvergenceWarning):
            notes.append(str(w.message))
        else:  # pass on anything that is not the convergence note
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class CheckpointAnalyzer:
    """Analyses one network in one BatchNorm mode at successive checkpoints.

    Nothing here works around compilation: the objective's loss is a
    ``jax.tree_util.Partial`` whose leaves are the BN statistics, so
    :func:`hessspec.hessian_operator` of the next checkpoint (new parameters, new running
    averages) compares equal in structure and every solver program compiled at the first
    checkpoint is reused.

    Args:
        objective: the network at its first checkpoint, in the mode analysed (from
            :func:`hessspec.nn.objective.make_objective`); its graph, BN mode and loss are
            kept.
        analysis_set: the fixed examples whose Hessian is analysed.
        train_set: training set (mini-batch gradients, train loss/accuracy).
        test_set: test set (test loss/accuracy).
        num_classes: ``K`` (reference outlier count, ``lambda_K``, the headline's
            ``lambda_{K+1}``).
        settings: resolved numbers (:func:`resolve_settings`).
        check_memory: passed to the solvers: True compares each call's memory estimate
            with the memory available when it starts, a number (bytes) with that budget
            instead (a multi-process run passes the budget all processes agreed on, so they
            all decide alike), False skips the check.
    """

    def __init__(
        self,
        objective: Objective,
        analysis_set: Dataset,
        train_set: Dataset,
        test_set: Dataset,
        num_classes: int,
        settings: StudySettings,
        check_memory: bool | float = True,
    ):
        self.check_memory = check_memory
        self.bn_mode = objective.bn_mode
        self.graphdef = objective.graphdef
        self.loss = objective.loss
        self.analysis_set = analysis_set
        self.train_set = train_set
        self.test_set = test_set
        self.num_classes = int(num_classes)
        self.settings = settings
        # in BN train mode each batch of hvp_batch_size is normalised with its own
        # statistics; otherwise the loss separates and the batch size only bounds memory
        if objective.bn_mode == "train":
            self.operator_batch_size = settings.hvp_batch_size
        else:
            self.operator_batch_size = settings.chunk_size
        self._metrics, self._minibatch_grads = _compiled_functions(objective, train_set)

    def loss_fn(self, objective: Objective) -> Any:
        """The analysed objective's ``loss_fn(params, batch)``: the network's loss, plus
        ``(wd / 2) ||w||^2`` when ``settings.weight_decay = wd > 0``."""
        return with_weight_decay(objective.loss_fn, self.settings.weight_decay)

    def operator(self, objective: Objective) -> LinearOperator:
        """The Hessian of the analysed objective at ``objective.params`` over the analysis
        set (batches of ``hvp_batch_size`` in BN train mode, chunks of ``chunk_size``
        otherwise)."""
        return hessian_operator(
            self.loss_fn(objective),
            objective.params,
            self.analysis_set.batch,
            batch_size=self.operator_batch_size,
        )

    def memory_estimates(self, objective: Objective) -> list[MemoryEstimate]:
        """Memory estimates of the three solver calls :meth:`analyse` makes, in order:
        :func:`hessspec.top_eigenpairs` (``top_k`` pairs, ``lanczos_steps`` basis vectors),
        :func:`hessspec.spectral_density` (``slq_probes`` probes of ``slq_steps`` steps) and
        :func:`hessspec.linalg.trace` (``trace_matvecs``), each with the settings' basis dtype, on
        the Hessian operator of ``objective`` over the analysis set. (The per-layer solver
        calls work on blocks of it, with fewer probes and steps: they need less.)

        Builds that operator (the analysis set goes onto the devices) and traces one
        Hessian-vector product, but compiles and runs nothing: a network of the same shape
        at step 0 gives the estimate of every checkpoint. The run needs the largest of the
        three (they run one after another).

        Returns:
            Three :class:`~hessspec.linalg.memory.MemoryEstimate` (bytes by component).
        """
        s = self.settings
        op = self.operator(objective)
        basis = {"basis_dtype": s.basis_dtype}
        krylov = {**basis, "basis_memory": s.basis_memory}
        return [
            estimate_memory(op, k=s.top_k, num_steps=s.lanczos_steps, **krylov),
            estimate_memory(op, num_probes=s.slq_probes, num_steps=s.slq_steps, **krylov),
            estimate_memory(op, num_matvecs=s.trace_matvecs, method=s.trace_method, **basis),
        ]

    def full_gradient(self, objective: Objective) -> tuple[float, np.ndarray]:
        """``(value, flat gradient)`` of the analysed objective, ``sum_b (|b|/N) L_b`` over
        the analysis set (the same batches) plus the weight-decay term, as float64."""
        out = dataset_gradient(
            self.loss_fn(objective),
            objective.params,
            self.analysis_set.batch,
            batch_size=self.operator_batch_size,
        )
        return float(out.loss), np.asarray(out.gradient, dtype=np.float64)

    def evaluate(self, objective: Objective, dataset: Dataset) -> tuple[float, float]:
        """Mean loss and accuracy over ``dataset`` in consecutive batches of
        ``settings.eval_batch_size`` (in BN train mode each batch uses its own statistics).
        Accuracy is NaN for regression targets."""
        n = dataset.num_examples
        if n == 0:
            return float("nan"), float("nan")
        bs = self.settings.eval_batch_size
        total_loss, total_correct = 0.0, 0.0
        for start in range(0, n, bs):
            xb = jnp.asarray(dataset.x[start : start + bs])
            yb = jnp.asarray(dataset.y[start : start + bs])
            loss, correct = self._metrics(objective.params, objective.stats, xb, yb)
            total_loss += float(loss)
            total_correct += float(correct)
        accuracy = total_correct / n if dataset.is_classification else float("nan")
        return total_loss / n, accuracy

    def minibatch_gradients(self, objective: Objective, seed: int) -> np.ndarray:
        """``(B, dim)`` gradients of the analysed objective on ``settings.num_minibatches``
        random mini-batches of ``settings.minibatch_size`` training examples (each drawn
        without replacement; plus ``wd w`` with weight decay): the gradients SGD would see."""
        s = self.settings
        rng = np.random.default_rng(seed)
        n = self.train_set.num_examples
        idx = np.stack(
            [rng.choice(n, s.minibatch_size, replace=False) for _ in range(s.num_minibatches)]
        )
        xb = jnp.asarray(self.train_set.x[idx])
        yb = jnp.asarray(self.train_set.y[idx])
        grads = np.asarray(
            self._minibatch_grads(objective.params, objective.stats, xb, yb), dtype=np.float64
        )
        if s.weight_decay:
            w = np.asarray(ravel_pytree(objective.params)[0], np.float64)
            grads = grads + s.weight_decay * w
        return grads

    def _eigenpairs(self, op: LinearOperator, key: jax.Array):
        """The top ``settings.top_k`` eigenpairs, and the Lanczos convergence notes."""
        s = self.settings
        with convergence_notes() as notes:
            eig = top_eigenpairs(
                op,
                s.top_k,
                num_steps=s.lanczos_steps,
                key=key,
                tol=s.tol,
                basis_dtype=s.basis_dtype,
                basis_memory=s.basis_memory,
                check_memory=self.check_memory,
            )
        return eig, notes

    def _density(self, op: LinearOperator, key: jax.Array, values: np.ndarray) -> _Density:
        """The SLQ density, smoothed with Ghorbani's width on a grid that covers it and the
        top eigenvalues."""
        s = self.settings
        sd = spectral_density(
            op,
            num_probes=s.slq_probes,
            num_steps=s.slq_steps,
            key=key,
            basis_dtype=s.basis_dtype,
            basis_memory=s.basis_memory,
            check_memory=self.check_memory,
        )
        sigma = sd.default_sigma
        lo, hi = min(sd.lambda_min, float(values.min())), max(sd.lambda_max, float(values.max()))
        grid = density_grid(lo, hi, sigma)
        return _Density(sd, sigma, grid, sd.density(grid, sigma))

    def _spectrum(self, objective: Objective, key: jax.Array, stage) -> _Spectrum:
        """The whole Hessian's top eigenpairs, density and trace."""
        s = self.settings
        stage("hessian")
        op = self.operator(objective)
        k_eig, k_slq, k_tr = jax.random.split(key, 3)
        stage("top eigenpairs")
        eig, notes = self._eigenpairs(op, k_eig)
        values = np.asarray(eig.values, dtype=np.float64)
        stage("density")
        density = self._density(op, k_slq, values)
        stage("trace")
        tr = trace(
            op,
            num_matvecs=s.trace_matvecs,
            key=k_tr,
            method=s.trace_method,
            basis_dtype=s.basis_dtype,
            check_memory=self.check_memory,
        )
        return _Spectrum(eig, values, np.asarray(eig.vectors, dtype=np.float64), notes, density, tr)

    def _layers(self, objective: Objective, key: jax.Array) -> tuple[dict, dict, list[str]]:
        """The per-layer record, arrays and convergence notes (empty when not asked for)."""
        if not self.settings.per_layer:
            return {}, {}, []
        with convergence_notes() as notes:
            record, arrays = measure_layers(
                self.loss_fn(objective),
                objective.params,
                self.analysis_set.batch,
                settings=self.settings,
                batch_size=self.operator_batch_size,
                key=key,
                check_memory=self.check_memory,
            )
        return {"per_layer": record}, arrays, [f"per-layer spectra: {n}" for n in notes]

    def _check_objective(self, objective: Objective) -> None:
        if objective.graphdef != self.graphdef or objective.loss != self.loss:
            raise ValueError(
                f"this analyzer was built for a network in bn_mode={self.bn_mode!r} with the "
                f"{self.loss} loss; got one in bn_mode={objective.bn_mode!r} with the "
                f"{objective.loss} loss and another graph. Eval and population mode share a "
                "graph (only their statistics differ); train mode needs its own analyzer."
            )

    def analyse(
        self,
        objective: Objective,
        key: jax.Array,
        seed: int = 0,
        on_stage: Callable[[str], None] | None = None,
    ) -> CheckpointAnalysis:
        """Every measurement of the network at one checkpoint.

        Args:
            objective: the network at this checkpoint, with the same graph and loss as the
                one given at construction (same BN mode, or eval and population mode,
                which differ only in their statistics).
            key: PRNG key of the Lanczos start vector and the SLQ and trace probes (the
                per-layer spectra use ``fold_in(key, 1)``).
            seed: seed of the mini-batch draw.
            on_stage: called with a short name before each stage (progress displays,
                :func:`analysis_stages`).

        Returns:
            :class:`CheckpointAnalysis`. Pairs that missed the residual tolerance are
            flagged in ``record["converged"]`` and their warnings kept in
            ``record["warnings"]``.
        """
        self._check_objective(objective)
        stage = on_stage or (lambda name: None)
        t0 = time.perf_counter()
        spec = self._spectrum(objective, key, stage)
        stage("gradients")
        analysis_loss, g = self.full_gradient(objective)
        mb = self.minibatch_gradients(objective, seed)
        energy_mb = gradient_energy(mb, spec.vectors)
        if self.settings.per_layer:
            stage("per-layer spectra")
        layers, layer_arrays, layer_notes = self._layers(objective, jax.random.fold_in(key, 1))
        stage("metrics")
        record = {
            **self._metrics_record(objective),
            "analysis_loss": _finite_or_none(analysis_loss),
            **_eigen_record(spec.eig, spec.values, spec.notes),
            "trace": _finite_or_none(spec.trace.value),
            "trace_stderr": _finite_or_none(spec.trace.stderr),
            **_outlier_record(spec.values, max(self.num_classes, 1)),
            "slq_lambda_min": _finite_or_none(spec.density.sd.lambda_min),
            "slq_lambda_max": _finite_or_none(spec.density.sd.lambda_max),
            "density_sigma": _finite_or_none(spec.density.sigma),
            "gradient_norm": _finite_or_none(np.linalg.norm(g)),
            "gradient_energy_full": _floats(gradient_energy(g, spec.vectors)),
            "gradient_energy_minibatch_mean": _floats(energy_mb.mean(axis=0)),
            "gradient_energy_minibatch_std": _floats(energy_mb.std(axis=0)),
            "minibatch_gradient_norm_mean": _finite_or_none(np.linalg.norm(mb, axis=1).mean()),
            **layers,
            "warnings": spec.notes + layer_notes,
            "seconds": time.perf_counter() - t0,
        }
        return CheckpointAnalysis(record=record, arrays={**spec.arrays(energy_mb), **layer_arrays})

    def _metrics_record(self, objective: Objective) -> dict[str, float | None]:
        """Loss and accuracy on the training and test sets."""
        train_loss, train_acc = self.evaluate(objective, self.train_set)
        test_loss, test_acc = self.evaluate(objective, self.test_set)
        return {
            "train_loss": _finite_or_none(train_loss),
            "train_accuracy": _finite_or_none(train_acc),
            "test_loss": _finite_or_none(test_loss),
            "test_accuracy": _finite_or_none(test_acc),
        }


def _compiled_functions(objective: Objective, train_set: Dataset):
    """``(metrics, minibatch_grads)``, jit-compiled for ``objective``'s graph and loss:
    ``metrics(params, stats, x, y) -> (summed loss, correct count)`` and
    ``minibatch_grads(params, stats, xb, yb) -> (B, dim)`` gradients of the data loss."""
    graphdef, rest, loss = objective.graphdef, objective.rest, objective.loss

    def logits(params, stats, x):
        return nnx.merge(graphdef, params, stats, rest)(x)

    def loss_with(params, stats, batch):
        return output_loss(logits(params, stats, batch["x"]), batch, loss)

    def metrics(params, stats, x, y):
        z = logits(params, stats, x)
        total = output_loss(z, {"x": x, "y": y}, loss) * x.shape[0]
        correct = jnp.sum(jnp.argmax(z, axis=-1) == y) if train_set.is_classification else 0
        return total, correct

    def minibatch_grads(params, stats, xb, yb):
        def one(xy):
            g = jax.grad(loss_with)(params, stats, {"x": xy[0], "y": xy[1]})
            return ravel_pytree(g)[0]

        return jax.lax.map(one, (xb, yb))

    return jax.jit(metrics), jax.jit(minibatch_grads)


class _Density(NamedTuple):
    """The SLQ result, the smoothing width, the grid and the smoothed density on it."""

    sd: Any
    sigma: float
    grid: np.ndarray
    values: np.ndarray


class _Spectrum(NamedTuple):
    """The whole Hessian's measurements at one checkpoint."""

    eig: Any
    values: np.ndarray
    vectors: np.ndarray
    notes: list[str]
    density: _Density
    trace: Any

    def arrays(self, energy_minibatch: np.ndarray) -> dict[str, np.ndarray]:
        """The checkpoint's arrays for spectra.npz (eigenvectors stored as float32)."""
        return {
            "nodes": np.asarray(self.density.sd.nodes, dtype=np.float64),
            "weights": np.asarray(self.density.sd.weights, dtype=np.float64),
            "eigenvalues": self.values,
            "residuals": np.asarray(self.eig.residuals, dtype=np.float64),
            "eigenvectors": self.vectors.astype(np.float32),
            "density_grid": self.density.grid,
            "density": self.density.values,
            "gradient_energy_minibatch": energy_minibatch,
        }


def _eigen_record(eig, values: np.ndarray, notes: list[str]) -> dict[str, Any]:
    """The top eigenvalues with their residuals (absolute, and relative to the largest
    ``|lambda|``), which pairs converged, and the matvecs Lanczos spent."""
    scale = max(float(np.max(np.abs(values))), 1e-300)
    return {
        "top_eigenvalues": _floats(values),
        "residuals": _floats(eig.residuals),
        "relative_residuals": _floats(np.asarray(eig.residuals) / scale),
        "converged": [bool(c) for c in np.asarray(eig.converged)],
        "lanczos_matvecs": int(eig.num_matvecs),
    }


def headline_ratio(top_eigenvalues: Any, num_classes: int) -> float | None:
    """The headline ratio ``lambda_1 / lambda_{K+1}`` of the top eigenvalues (largest
    first), ``K = num_classes``: Papyan's ``K`` outliers above the bulk make it large; one
    definition for every run and checkpoint. None when fewer than ``K + 1`` values are
    given or ``lambda_{K+1} <= 0`` (no ratio to a bulk edge then)."""
    lam = [float(v) for v in top_eigenvalues]
    k = max(int(num_classes), 1)
    if len(lam) < k + 1 or not lam[k] > 0 or not math.isfinite(lam[0]):
        return None
    return lam[0] / lam[k]


def _outlier_record(values: np.ndarray, k_ref: int) -> dict[str, Any]:
    """The headline ratio and the outlier/bulk split of the top eigenvalues against
    ``K = k_ref`` classes (:func:`hessspec.analysis.spectrum.outlier_split`; nulls when too
    few values)."""
    split = outlier_split(values, k_ref) if values.size >= max(2, k_ref) else None
    return {
        "headline_ratio": headline_ratio(values, k_ref),
        "num_outliers": int(split.num_outliers) if split else 0,
        "reference_outliers": int(k_ref),
        "bulk_edge": _finite_or_none(split.bulk_edge) if split else None,
        "outlier_ratio": _finite_or_none(split.outlier_ratio) if split else None,
        "lambda1_over_lambdaK": _finite_or_none(split.ratio_to_kth) if split else None,
    }
