"""One checkpoint of a BatchNorm spectrum study: every measurement on one objective.

:class:`CheckpointAnalyzer` takes an :class:`~hessspec.nn.objective.Objective` (a network at one
training step, in one BatchNorm mode) and measures, on a fixed analysis set:

- the top ``k`` Hessian eigenpairs (``k = 2K`` by default, ``K`` classes) with their
  computed residuals (:func:`hessspec.top_eigenpairs`);
- the SLQ spectral density (:func:`hessspec.spectral_density`), smoothed with Ghorbani's
  default width on a grid fine enough to resolve it;
- the Hessian trace (:func:`hessspec.linalg.trace`, Hutch++ by default);
- the outlier/bulk split of the top eigenvalues (:func:`hessspec.outlier_split`);
- the gradient energy in the top-``j`` eigenspace, ``j = 1..k``, of the full-batch
  gradient of the analysed loss and of mini-batch gradients from the training set (mean
  and standard deviation over several mini-batches);
- loss and accuracy on the training and test sets, and the analysed loss itself.

The Hessian and the full-batch gradient are those of ``sum_b (|b|/N) L_b`` over the
analysis set cut into consecutive batches of ``hvp_batch_size`` (exactly the dataset-mean
loss without BatchNorm and in eval/population mode; in BN train mode the function whose
batches use their own statistics, as in :func:`hessspec.hessian_operator` with that batch
size). Every metric is computed in the objective's BN mode. It knows nothing of files: it
returns a JSON-ready record and a dict of arrays.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
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
from hessspec.studies.batchnorm_spectrum.config import AnalysisConfig, TrainConfig

__all__ = [
    "CheckpointAnalysis",
    "CheckpointAnalyzer",
    "StudySettings",
    "density_grid",
    "resolve_settings",
]


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """The numbers of one analysis, resolved from an :class:`AnalysisConfig`.

    Attributes:
        top_k: number of top eigenpairs.
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
    )


@dataclasses.dataclass(frozen=True)
class CheckpointAnalysis:
    """The result of :func:`analyse_checkpoint`.

    Attributes:
        record: JSON-ready dict (floats, ints, lists; NaN written as None), the checkpoint
            entry of ``results.json``.
        arrays: numpy arrays for ``spectra.npz``: ``nodes``, ``weights`` (SLQ, ``(P, m)``),
            ``eigenvalues``, ``residuals`` (``(k,)``), ``eigenvectors`` (``(k, dim)``),
            ``density_grid``, ``density`` (``(G,)``), ``gradient_energy_minibatch``
            (``(B, k)``).
    """

    record: dict[str, Any]
    arrays: dict[str, np.ndarray]


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _floats(a: Any) -> list[float | None]:
    return [_finite_or_none(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


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
        num_classes: ``K`` (reference outlier count, ``lambda_K``).
        settings: resolved numbers (:func:`resolve_settings`).
        check_memory: passed to the three solvers: True compares each call's memory
            estimate with the memory available when it starts, a number (bytes) with that
            budget instead (a multi-process run passes the budget all processes agreed on,
            so they all decide alike), False skips the check.
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
        graphdef, rest, loss = objective.graphdef, objective.rest, objective.loss
        # in BN train mode each batch of hvp_batch_size is normalised with its own
        # statistics; otherwise the loss separates and the batch size only bounds memory
        if objective.bn_mode == "train":
            self.operator_batch_size = settings.hvp_batch_size
        else:
            self.operator_batch_size = settings.chunk_size

        def logits(params, stats, x):
            return nnx.merge(graphdef, params, stats, rest)(x)

        def loss_with(params, stats, batch):
            return output_loss(logits(params, stats, batch["x"]), batch, loss)

        def metrics(params, stats, x, y):
            z = logits(params, stats, x)
            total = output_loss(z, {"x": x, "y": y}, loss) * x.shape[0]
            correct = jnp.sum(jnp.argmax(z, axis=-1) == y) if train_set.is_classification else 0
            return total, correct

        self._metrics = jax.jit(metrics)

        def minibatch_grads(params, stats, xb, yb):
            def one(xy):
                g = jax.grad(loss_with)(params, stats, {"x": xy[0], "y": xy[1]})
                return ravel_pytree(g)[0]

            return jax.lax.map(one, (xb, yb))

        self._minibatch_grads = jax.jit(minibatch_grads)

    def operator(self, objective: Objective) -> LinearOperator:
        """The Hessian of the analysed loss at ``objective.params`` over the analysis set
        (batches of ``hvp_batch_size`` in BN train mode, chunks of ``chunk_size``
        otherwise)."""
        return hessian_operator(
            objective.loss_fn,
            objective.params,
            self.analysis_set.batch,
            batch_size=self.operator_batch_size,
        )

    def memory_estimates(self, objective: Objective) -> list[MemoryEstimate]:
        """Memory estimates of the three solver calls :meth:`analyse` makes, in order:
        :func:`hessspec.top_eigenpairs` (``top_k`` pairs, ``lanczos_steps`` basis vectors),
        :func:`hessspec.spectral_density` (``slq_probes`` probes of ``slq_steps`` steps) and
        :func:`hessspec.linalg.trace` (``trace_matvecs``), each with the settings' basis dtype, on
        the Hessian operator of ``objective`` over the analysis set.

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
        """``(loss, flat gradient)`` of the operator's function, ``sum_b (|b|/N) L_b`` over
        the analysis set (the same batches), as float64."""
        out = dataset_gradient(
            objective.loss_fn,
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
        """``(B, dim)`` gradients of the analysed loss on ``settings.num_minibatches`` random
        mini-batches of ``settings.minibatch_size`` training examples (each drawn without
        replacement): the gradients SGD would see."""
        s = self.settings
        rng = np.random.default_rng(seed)
        n = self.train_set.num_examples
        idx = np.stack(
            [rng.choice(n, s.minibatch_size, replace=False) for _ in range(s.num_minibatches)]
        )
        xb = jnp.asarray(self.train_set.x[idx])
        yb = jnp.asarray(self.train_set.y[idx])
        grads = self._minibatch_grads(objective.params, objective.stats, xb, yb)
        return np.asarray(grads, dtype=np.float64)

    def _eigenpairs(self, op: LinearOperator, key: jax.Array):
        """The top ``settings.top_k`` eigenpairs, and the Lanczos convergence notes (other
        warnings are passed on)."""
        s = self.settings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LanczosConvergenceWarning)
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
        notes = [
            str(w.message) for w in caught if issubclass(w.category, LanczosConvergenceWarning)
        ]
        for w in caught:  # pass on anything that is not the convergence note
            if not issubclass(w.category, LanczosConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
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
            key: PRNG key of the Lanczos start vector and the SLQ and trace probes.
            seed: seed of the mini-batch draw.
            on_stage: called with a short name before each stage (progress displays).

        Returns:
            :class:`CheckpointAnalysis`. Pairs that missed the residual tolerance are
            flagged in ``record["converged"]`` and their warnings kept in
            ``record["warnings"]``.
        """
        if objective.graphdef != self.graphdef or objective.loss != self.loss:
            raise ValueError(
                f"this analyzer was built for a network in bn_mode={self.bn_mode!r} with the "
                f"{self.loss} loss; got one in bn_mode={objective.bn_mode!r} with the "
                f"{objective.loss} loss and another graph. Eval and population mode share a "
                "graph (only their statistics differ); train mode needs its own analyzer."
            )
        stage = on_stage or (lambda name: None)
        s = self.settings
        t0 = time.perf_counter()
        stage("hessian")
        op = self.operator(objective)
        k_eig, k_slq, k_tr = jax.random.split(key, 3)
        stage("top eigenpairs")
        eig, notes = self._eigenpairs(op, k_eig)
        values = np.asarray(eig.values, dtype=np.float64)
        vectors = np.asarray(eig.vectors, dtype=np.float64)
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
        stage("gradients")
        analysis_loss, g = self.full_gradient(objective)
        mb = self.minibatch_gradients(objective, seed)
        energy_mb = gradient_energy(mb, vectors)
        stage("metrics")
        record = {
            **self._metrics_record(objective),
            "analysis_loss": _finite_or_none(analysis_loss),
            **_eigen_record(eig, values, notes),
            "trace": _finite_or_none(tr.value),
            "trace_stderr": _finite_or_none(tr.stderr),
            **_outlier_record(values, max(self.num_classes, 1)),
            "slq_lambda_min": _finite_or_none(density.sd.lambda_min),
            "slq_lambda_max": _finite_or_none(density.sd.lambda_max),
            "density_sigma": _finite_or_none(density.sigma),
            "gradient_norm": _finite_or_none(np.linalg.norm(g)),
            "gradient_energy_full": _floats(gradient_energy(g, vectors)),
            "gradient_energy_minibatch_mean": _floats(energy_mb.mean(axis=0)),
            "gradient_energy_minibatch_std": _floats(energy_mb.std(axis=0)),
            "minibatch_gradient_norm_mean": _finite_or_none(np.linalg.norm(mb, axis=1).mean()),
            "warnings": notes,
            "seconds": time.perf_counter() - t0,
        }
        arrays = {
            "nodes": np.asarray(density.sd.nodes, dtype=np.float64),
            "weights": np.asarray(density.sd.weights, dtype=np.float64),
            "eigenvalues": values,
            "residuals": np.asarray(eig.residuals, dtype=np.float64),
            "eigenvectors": vectors.astype(np.float32),
            "density_grid": density.grid,
            "density": density.values,
            "gradient_energy_minibatch": energy_mb,
        }
        return CheckpointAnalysis(record=record, arrays=arrays)

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


class _Density(NamedTuple):
    """The SLQ result, the smoothing width, the grid and the smoothed density on it."""

    sd: Any
    sigma: float
    grid: np.ndarray
    values: np.ndarray


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


def _outlier_record(values: np.ndarray, k_ref: int) -> dict[str, Any]:
    """The outlier/bulk split of the top eigenvalues against ``K = k_ref`` classes
    (:func:`hessspec.analysis.spectrum.outlier_split`; nulls when too few values)."""
    split = outlier_split(values, k_ref) if values.size >= max(2, k_ref) else None
    return {
        "num_outliers": int(split.num_outliers) if split else 0,
        "reference_outliers": int(k_ref),
        "bulk_edge": _finite_or_none(split.bulk_edge) if split else None,
        "outlier_ratio": _finite_or_none(split.outlier_ratio) if split else None,
        "lambda1_over_lambdaK": _finite_or_none(split.ratio_to_kth) if split else None,
    }
