"""The input-bias study: what a non-zero input mean does to the Hessian (LeCun, Kanter &
Solla 1991), measured matrix-free and compared with the closed forms of
:mod:`hessspec.analysis.theory`.

Two parts, both run by :func:`run_input_bias_study`:

1. **Linear model, squared loss, synthetic inputs.** ``p`` samples of ``N`` i.i.d. Gaussian
   inputs of variance ``v``, once *biased* (mean ``m``) and once *centred* (mean 0; the
   same noise draws, so the two differ only by the mean). The Hessian of
   ``0.5 mean_i (w^T x_i - y_i)^2`` is exactly ``R = X^T X / p``. It is measured through
   :func:`hessspec.hessian_operator` only: Lanczos (:func:`hessspec.top_eigenpairs`) for the
   two largest and the smallest eigenvalue, stochastic Lanczos quadrature
   (:func:`hessspec.spectral_density`) for the density. Compared with theory: the biased
   outlier against ``N m^2 + v``; the bulk edges (biased: the 2nd largest and the smallest
   eigenvalue; centred: the largest and the smallest) against the Marchenko-Pastur edges
   ``v (1 -+ sqrt(N/p))^2``; each with its relative error and a pass/fail at
   ``linear.tolerance`` (5 % by default). A dense ``eigvalsh`` of the operator is an extra,
   optional check. Then the gradient-descent consequence: plain GD at ``lr = 1 / lambda_max``
   (measured) is actually run until ``||w_t - w*|| <= tol ||w_0 - w*||``, and its step count
   is set against :func:`hessspec.analysis.theory.gd_steps_to_tolerance` (the worst case over
   starting
   points) from the measured extreme eigenvalues and from the theoretical ones.
2. **One-hidden-layer MLP on the digits**, cross-entropy: *raw* inputs (pixels in
   ``[0, 1]`` or ``0..16``: a positive mean), *centred* inputs (per-pixel train mean
   removed), and *batchnorm* (raw inputs, BatchNorm after the hidden linear layer). For each,
   at initialisation and after a short training at one shared learning rate: the top
   eigenvalues, the outlier split of :func:`hessspec.outlier_split`, the SLQ density, and how
   much of the top eigenvector's first-layer part lies along the input-mean direction
   (LeCun's outlier direction ``mean (x) u``). BatchNorm networks are analysed in the
   configured BN modes: in ``"train"`` mode (batch statistics, what SGD descends) the
   output is exactly invariant to the input mean, in ``"population"`` mode the statistics
   are frozen constants and the mean is seen again.

Outputs (in ``out_dir``): ``results.json`` (every number, plus SLQ nodes and weights so the
figures can be redrawn), ``figures/*.png`` and ``report.md``; all written atomically (a
temporary file in the same folder, then ``os.replace``), and never over a file this run did
not create.

The configuration is :class:`InputBiasConfig` (TOML: ``experiment = "input_bias"`` plus
``[linear]`` and ``[mlp]`` tables, see ``experiments/input_bias.toml``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from hessspec.nn.objective import BN_MODES as _BN_MODES
from hessspec.studies.common.config import (
    ConfigError,
    config_from_mapping,
    config_to_mapping,
    config_to_toml,
)

__all__ = [
    "QUICK_OVERRIDES",
    "InputBiasConfig",
    "LinearSettings",
    "MLPSettings",
    "StudyOutput",
    "plot_gd_convergence",
    "plot_linear_density",
    "plot_mlp_density",
    "plot_mlp_top_eigenvalues",
    "plot_mlp_training",
    "run_gradient_descent",
    "override_config",
    "run_input_bias_study",
]

EXPERIMENT = "input_bias"

#: Overrides for a cheaper run (``python -m hessspec.run --quick``): fewer SLQ probes and
#: steps, BatchNorm analysed in train mode only.
QUICK_OVERRIDES: tuple[str, ...] = (
    "linear.slq_probes=4",
    "linear.slq_steps=40",
    "mlp.slq_probes=4",
    "mlp.slq_steps=40",
    'mlp.bn_modes=["train"]',
)

# --------------------------------------------------------------------------------------
# Configuration (shared helpers, also used by hessspec.studies.santurkar.study)
# --------------------------------------------------------------------------------------


def _field(default: Any, help: str) -> Any:
    """A dataclass field with a help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def override_config(config: Any, overrides: Sequence[str]):
    """A study config with single fields changed by ``"key=value"`` strings, in order.

    Keys are dotted paths (``"linear.num_inputs=100"``, ``"learning_rate=0.05"``); values
    are TOML literals (``100``, ``0.05``, ``true``, ``"cnn"``, ``[0.05, 0.2]``), strings may
    be left unquoted. The result is validated like :func:`config_from_mapping`.

    Args:
        config: a frozen config dataclass (e.g. :class:`InputBiasConfig`).
        overrides: the ``key=value`` strings.

    Returns:
        A new config of the same class.

    Raises:
        ConfigError (a ValueError): no ``=``, an unknown key, a wrong type or an invalid
            value; the message names the key.
    """
    import tomllib

    values = config_to_mapping(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. seed=1).")
        key, raw = (t.strip() for t in item.split("=", 1))
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = values
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise ConfigError(
                    f"unknown config key {'.'.join(parents[: i + 1])!r} in override {item!r}."
                )
            node = node[part]
        if leaf not in node:
            raise ConfigError(
                f"unknown config key {key!r} in override {item!r}; valid keys here: "
                f"{', '.join(sorted(node))}."
            )
        node[leaf] = value
    return config_from_mapping(type(config), values)


def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config key {key!r} must {msg}, got {value!r}.")


def _check_dtype(key: str, value: str) -> None:
    _check(value in ("float32", "float64"), key, "be 'float32' or 'float64'", value)


@dataclasses.dataclass(frozen=True)
class LinearSettings:
    """``[linear]``: the linear model with squared loss on synthetic Gaussian inputs."""

    num_inputs: int = _field(200, "N, the input dimension (= number of parameters)")
    num_samples: int = _field(2000, "p, the number of samples")
    variance: float = _field(1.0, "v, the variance of every input component")
    mean: float = _field(1.0, "m, the mean of every input component in the biased variant")
    dtype: str = _field("float64", "model/HVP dtype: float32 or float64 (needs x64 = true)")
    tolerance: float = _field(0.05, "relative error allowed between measured and theory")
    lanczos_steps: int = _field(0, "Lanczos basis size of top_eigenpairs; 0: library default")
    slq_probes: int = _field(10, "SLQ density: random probes")
    slq_steps: int = _field(90, "SLQ density: Lanczos steps per probe (<= num_inputs)")
    sigma: float = _field(
        0.0,
        "kernel width of the density figure, both variants; 0: the larger of the two "
        "variants' Ghorbani widths sqrt(1e-5 max(1, lambda_max - lambda_min))",
    )
    gd_tolerance: float = _field(1e-3, "GD stops when ||w_t - w*|| <= tol ||w_0 - w*||")
    gd_max_steps: int = _field(100_000, "GD step budget")
    dense_check: bool = _field(True, "also compute the dense eigvalsh of the operator")

    def __post_init__(self):
        _check(self.num_inputs >= 2, "linear.num_inputs", "be >= 2", self.num_inputs)
        _check(self.num_samples >= 1, "linear.num_samples", "be >= 1", self.num_samples)
        _check(self.variance > 0, "linear.variance", "be > 0", self.variance)
        _check(self.mean != 0, "linear.mean", "be non-zero (the biased variant)", self.mean)
        _check_dtype("linear.dtype", self.dtype)
        _check(0 < self.tolerance < 1, "linear.tolerance", "lie in (0, 1)", self.tolerance)
        _check(self.lanczos_steps >= 0, "linear.lanczos_steps", "be >= 0", self.lanczos_steps)
        _check(self.slq_probes >= 1, "linear.slq_probes", "be >= 1", self.slq_probes)
        _check(
            1 <= self.slq_steps <= self.num_inputs,
            "linear.slq_steps",
            f"lie in [1, linear.num_inputs = {self.num_inputs}]",
            self.slq_steps,
        )
        _check(self.sigma >= 0, "linear.sigma", "be >= 0", self.sigma)
        _check(0 < self.gd_tolerance < 1, "linear.gd_tolerance", "lie in (0, 1)", self.gd_tolerance)
        _check(self.gd_max_steps >= 1, "linear.gd_max_steps", "be >= 1", self.gd_max_steps)


_PREPROCESSING_RAW = ("unit", "raw")


@dataclasses.dataclass(frozen=True)
class MLPSettings:
    """``[mlp]``: a one-hidden-layer MLP on the digits, raw vs centred inputs vs BatchNorm."""

    enabled: bool = _field(True, "run the MLP part")
    hidden: int = _field(32, "width of the hidden layer")
    raw_preprocessing: str = _field(
        "unit", "inputs of the raw and batchnorm variants: 'unit' (x/16 in [0,1]) or 'raw' (0..16)"
    )
    analysis_size: int = _field(512, "examples of the fixed analysis set (stratified subset)")
    top_k: int = _field(20, "top eigenvalues per Hessian (>= 10, the number of classes)")
    lanczos_steps: int = _field(0, "Lanczos basis size; 0: library default")
    slq_probes: int = _field(8, "SLQ density: random probes")
    slq_steps: int = _field(80, "SLQ density: Lanczos steps per probe")
    train_steps: int = _field(300, "SGD steps of the short training (0: initialisation only)")
    learning_rate: float = _field(0.05, "learning rate shared by all variants (plain SGD)")
    batch_size: int = _field(64, "training mini-batch size")
    bn_modes: tuple[str, ...] = _field(
        ("train", "population"), "BN modes the batchnorm variant is analysed in"
    )
    dtype: str = _field("float32", "model/HVP dtype: float32 or float64 (needs x64 = true)")

    def __post_init__(self):
        _check(self.hidden >= 1, "mlp.hidden", "be >= 1", self.hidden)
        _check(
            self.raw_preprocessing in _PREPROCESSING_RAW,
            "mlp.raw_preprocessing",
            f"be one of {list(_PREPROCESSING_RAW)}",
            self.raw_preprocessing,
        )
        _check(self.analysis_size >= 2, "mlp.analysis_size", "be >= 2", self.analysis_size)
        _check(self.top_k >= 10, "mlp.top_k", "be >= 10 (the number of classes)", self.top_k)
        _check(self.lanczos_steps >= 0, "mlp.lanczos_steps", "be >= 0", self.lanczos_steps)
        _check(self.slq_probes >= 1, "mlp.slq_probes", "be >= 1", self.slq_probes)
        _check(self.slq_steps >= 1, "mlp.slq_steps", "be >= 1", self.slq_steps)
        _check(self.train_steps >= 0, "mlp.train_steps", "be >= 0", self.train_steps)
        _check(self.learning_rate > 0, "mlp.learning_rate", "be > 0", self.learning_rate)
        _check(self.batch_size >= 1, "mlp.batch_size", "be >= 1", self.batch_size)
        _check(len(self.bn_modes) >= 1, "mlp.bn_modes", "name at least one mode", self.bn_modes)
        for i, mode in enumerate(self.bn_modes):
            _check(mode in _BN_MODES, f"mlp.bn_modes[{i}]", f"be one of {list(_BN_MODES)}", mode)
        _check(
            len(set(self.bn_modes)) == len(self.bn_modes),
            "mlp.bn_modes",
            "not repeat a mode",
            list(self.bn_modes),
        )
        _check_dtype("mlp.dtype", self.dtype)


@dataclasses.dataclass(frozen=True)
class InputBiasConfig:
    """The whole input-bias study. TOML: ``experiment = "input_bias"``, top-level ``seed``,
    ``x64``, ``title``, and the ``[linear]`` and ``[mlp]`` tables."""

    seed: int = _field(0, "seed of the data, the initialisation and every random probe")
    x64: bool = _field(
        True,
        "run with jax_enable_x64 on (scoped to the run) so Lanczos works in float64; the "
        "models keep their dtype",
    )
    title: str = _field("Input statistics and the Hessian outlier", "title of report.md")
    linear: LinearSettings = dataclasses.field(default_factory=LinearSettings)
    mlp: MLPSettings = dataclasses.field(default_factory=MLPSettings)

    def __post_init__(self):
        for section in ("linear", "mlp"):
            if getattr(self, section).dtype == "float64" and not self.x64:
                raise ConfigError(f"config key '{section}.dtype' = 'float64' needs x64 = true.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> InputBiasConfig:
        """Build from a nested mapping (parsed TOML); see :func:`config_from_mapping`.

        Args:
            values: nested mapping; absent keys keep their defaults, a top-level
                ``experiment`` key must name this study.

        Returns:
            The validated config.

        Raises:
            ConfigError (a ValueError): unknown key, wrong type or invalid value, naming
                the key.
        """
        return config_from_mapping(cls, values, experiment=EXPERIMENT)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain nested dicts (with ``experiment = "input_bias"``)."""
        return {"experiment": EXPERIMENT, **config_to_mapping(self)}

    def to_toml(self) -> str:
        """The config as TOML text that :meth:`from_dict` of ``tomllib.loads`` reads back."""
        return config_to_toml(self, EXPERIMENT)


# --------------------------------------------------------------------------------------
# Output files (shared helpers, also used by hessspec.studies.santurkar.study)
# --------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """Plain JSON types; NaN and infinities become None (strict JSON)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        x = float(x)
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, str):
        return x
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


class StudyOutput:
    """Writes a study's files into ``out_dir`` atomically and never over a foreign file.

    Every file goes to a temporary file in its destination folder first and is moved into
    place with ``os.replace`` (atomic on POSIX). Before the run starts, :meth:`claim` checks
    that none of the files the study will write exists yet (FileExistsError otherwise), so
    a study never clobbers a file it did not create; rewriting a file of the same run is
    allowed. With ``overwrite=True`` the claimed names (this study's own output files from
    an earlier run) may be replaced; nothing else in the folder is touched.

    Args:
        out_dir: the output folder (created if missing).
        overwrite: allow replacing the files named in :meth:`claim`.
    """

    def __init__(self, out_dir: Path, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.overwrite = bool(overwrite)
        self.created: set[Path] = set()

    def claim(self, names: Sequence[str]) -> None:
        """Reserve this run's output files.

        Args:
            names: paths relative to ``out_dir``.

        Raises:
            FileExistsError: one of them exists already (not with ``overwrite``: then they
                are marked replaceable instead).
        """
        if self.overwrite:
            self.created.update(self.out_dir / n for n in names)
            return
        clash = [n for n in names if (self.out_dir / n).exists()]
        if clash:
            raise FileExistsError(
                f"{self.out_dir} already holds {clash}: a study never overwrites files it did "
                "not create; choose a fresh output folder."
            )

    def _write(self, name: str, write) -> Path:
        path = self.out_dir / name
        if path.exists() and path not in self.created:
            raise FileExistsError(f"{path} exists and was not written by this run.")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.created.add(path)
        return path

    def write_text(self, name: str, text: str) -> Path:
        """Write ``text`` (UTF-8) to ``out_dir / name``.

        Args:
            name: path relative to ``out_dir``.
            text: the content.

        Returns:
            The path written.
        """
        return self._write(name, lambda f: f.write(text.encode("utf-8")))

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as strict JSON (NaN/inf as null) to ``out_dir / name``.

        Args:
            name: path relative to ``out_dir``.
            obj: dicts, lists, numbers, strings, numpy/jax arrays.

        Returns:
            The path written.
        """
        text = json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n"
        return self.write_text(name, text)

    def save_figure(self, name: str, fig) -> Path:
        """Save a matplotlib figure as PNG to ``out_dir / name``.

        Args:
            name: path relative to ``out_dir``.
            fig: the figure.

        Returns:
            The path written.
        """
        return self._write(name, lambda f: fig.savefig(f, format="png", dpi=120))


def new_figure(nrows: int = 1, ncols: int = 1, size=(6.0, 4.0)):
    """A matplotlib Figure (no pyplot, no global backend) and its axes.

    Args:
        nrows, ncols: the grid of axes.
        size: ``(width, height)`` in inches of one panel.

    Returns:
        ``(figure, axes)`` with ``axes`` a 2-D array of shape ``(nrows, ncols)``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def environment() -> dict[str, Any]:
    """Versions and devices, for results.json."""
    import flax
    import optax

    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.jax_enable_x64),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _dtype(name: str):
    return {"float32": jnp.float32, "float64": jnp.float64}[name]


def _rel(measured: float, predicted: float) -> float:
    return abs(measured - predicted) / abs(predicted)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool | np.bool_):
        return "yes" if x else "no"
    if isinstance(x, int | np.integer):
        return str(int(x))
    x = float(x)
    if not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "n/a")
    return f"{x:.{digits}g}"


def _pct(x: float) -> str:
    return f"{100.0 * float(x):.2f} %"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; numbers through :func:`_fmt`, ``|`` inside cells escaped."""

    def cell(c: Any) -> str:
        return (c if isinstance(c, str) else _fmt(c)).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(cell(c) for c in r) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Gradient descent on a loss, counting steps
# --------------------------------------------------------------------------------------


def run_gradient_descent(
    loss_fn,
    params: Any,
    batch: Any,
    lr: float,
    target: Any,
    tol: float,
    max_steps: int,
    chunk: int = 500,
) -> dict[str, Any]:
    """Full-batch gradient descent ``w <- w - lr grad L(w)`` until the parameter error
    ratio ``||w_t - w*|| / ||w_0 - w*||`` is at most ``tol``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the start ``w_0`` (any pytree).
        batch: the whole data set, passed to ``loss_fn``.
        lr: the learning rate.
        target: ``w*``, a pytree like ``params`` or a flat vector.
        tol: the error ratio to reach, in ``(0, 1)``.
        max_steps: the step budget.
        chunk: steps per compiled ``lax.scan`` call.

    Returns:
        ``{"steps": int or None (not reached within max_steps), "error_ratio": list of
        ||w_t - w*|| / ||w_0 - w*|| for t = 0..last step run, "final_error_ratio",
        "initial_error": ||w_0 - w*||, "final_loss": the loss at the last iterate}``.
    """
    w0, unravel = ravel_pytree(params)
    w_star = jnp.asarray(
        target if isinstance(target, np.ndarray | jax.Array) else ravel_pytree(target)[0],
        w0.dtype,
    ).reshape(w0.shape)
    lr_arr = jnp.asarray(lr, w0.dtype)

    def flat_loss(w):
        return loss_fn(unravel(w), batch)

    grad = jax.grad(flat_loss)

    @jax.jit
    def run_chunk(w):
        def body(w, _):
            w = w - lr_arr * grad(w)
            return w, jnp.linalg.norm(w - w_star)

        return jax.lax.scan(body, w, None, length=chunk)

    e0 = float(jnp.linalg.norm(w0 - w_star))
    ratios = [1.0]
    steps = None
    w = w0
    done = 0
    while done < max_steps:
        w, errs = run_chunk(w)
        errs = np.asarray(errs, np.float64) / e0
        if not np.all(np.isfinite(errs)):
            raise FloatingPointError(f"gradient descent diverged at lr = {lr}.")
        take = min(chunk, max_steps - done)
        hit = np.nonzero(errs[:take] <= tol)[0]
        if hit.size:
            steps = done + int(hit[0]) + 1
            ratios.extend(errs[: hit[0] + 1].tolist())
            break
        ratios.extend(errs[:take].tolist())
        done += take
    return {
        "steps": steps,
        "error_ratio": ratios,
        "final_error_ratio": ratios[-1],
        "initial_error": e0,
        "final_loss": float(flat_loss(w)),
    }


# --------------------------------------------------------------------------------------
# Part 1: the linear model
# --------------------------------------------------------------------------------------


def _slq_record(sd) -> dict[str, Any]:
    return {
        "nodes": sd.nodes,
        "weights": sd.weights,
        "default_sigma": sd.default_sigma,
        "num_probes": sd.num_probes,
        "num_steps": int(sd.nodes.shape[1]),
    }


def _density_from_record(rec: Mapping[str, Any], grid: np.ndarray, sigma: float | None = None):
    """The Gaussian-smoothed SLQ density of a stored record (as SpectralDensity.density)."""
    from hessspec.linalg.density import SpectralDensity

    nodes = np.asarray(rec["nodes"], np.float64)
    weights = np.asarray(rec["weights"], np.float64)
    sd = SpectralDensity(
        nodes=nodes,
        weights=weights,
        num_steps_done=np.full(nodes.shape[0], nodes.shape[1]),
        dim=int(rec.get("dim", nodes.shape[1])),
    )
    return sd.density(grid, sigma=rec["default_sigma"] if sigma is None else sigma)


def _linear_variant(cfg: LinearSettings, mean: float, seed: int, key) -> dict[str, Any]:
    import hessspec as hs
    from hessspec.analysis.theory import (
        gd_steps_to_tolerance,
        input_correlation_spectrum_prediction,
    )
    from hessspec.nn.data import synthetic_gaussian
    from hessspec.nn.models import make_model
    from hessspec.nn.objective import make_objective

    dtype = _dtype(cfg.dtype)
    n, p = cfg.num_inputs, cfg.num_samples
    data = synthetic_gaussian(
        p, n, mean=mean, variance=cfg.variance, seed=seed, targets="teacher", dtype=np.dtype(dtype)
    )
    model = make_model("linear", (n,), 0, False, seed=seed, dtype=dtype, use_bias=False)
    obj = make_objective(model, "mse")
    op = hs.hessian_operator(obj.loss_fn, obj.params, data.batch)
    k_top, k_bot, k_slq = jax.random.split(key, 3)
    steps = cfg.lanczos_steps or None
    t0 = time.perf_counter()
    top = hs.top_eigenpairs(op, 2, num_steps=steps, key=k_top)
    bottom = hs.top_eigenpairs(op, 2, num_steps=steps, key=k_bot, which="smallest")
    t_lanczos = time.perf_counter() - t0
    t0 = time.perf_counter()
    sd = hs.spectral_density(op, num_probes=cfg.slq_probes, num_steps=cfg.slq_steps, key=k_slq)
    t_slq = time.perf_counter() - t0
    pred = input_correlation_spectrum_prediction(n, p, mean, cfg.variance)

    lam1, lam2 = float(top.values[0]), float(top.values[1])
    lam_min = float(bottom.values[0])
    biased = mean != 0.0
    upper_measured = lam2 if biased else lam1
    predicted_top = pred.outlier if biased else pred.upper_edge

    # SLQ mass far above the bulk: the outlier's share of the spectrum (theory: 1 / N).
    points, masses = sd.quadrature()
    cut = pred.upper_edge + 0.5 * (pred.outlier - pred.upper_edge) if biased else math.inf
    outlier_mass = float(masses[points > cut].sum()) if biased else 0.0

    out: dict[str, Any] = {
        "mean": mean,
        "dim": op.dim,
        "prediction": pred._asdict(),
        "lanczos": {
            "top_values": top.values,
            "top_residuals": top.residuals,
            "top_converged": top.converged,
            "smallest_value": lam_min,
            "smallest_residual": float(bottom.residuals[0]),
            "smallest_converged": bool(bottom.converged[0]),
            "num_matvecs": int(top.num_matvecs + bottom.num_matvecs),
            "seconds": t_lanczos,
        },
        "lambda_max": lam1,
        "lambda_2": lam2,
        "lambda_min": lam_min,
        "upper_bulk_edge": upper_measured,
        "upper_bulk_edge_source": "lambda_2" if biased else "lambda_max",
        "slq": {**_slq_record(sd), "dim": op.dim, "seconds": t_slq, "outlier_mass": outlier_mass},
    }
    if cfg.dense_check:
        dense = np.linalg.eigvalsh(np.asarray(op.to_dense(), np.float64))
        out["dense"] = {
            "lambda_max": float(dense[-1]),
            "lambda_2": float(dense[-2]),
            "lambda_min": float(dense[0]),
            "max_abs_diff_lanczos": float(
                max(abs(dense[-1] - lam1), abs(dense[-2] - lam2), abs(dense[0] - lam_min))
            ),
        }

    # Gradient descent at lr = 1 / lambda_max (measured), from the model's initialisation
    # to the least-squares solution w* (float64 on the host).
    x64 = np.asarray(data.x, np.float64)
    w_star, *_ = np.linalg.lstsq(x64, np.asarray(data.y, np.float64), rcond=None)
    lr = 1.0 / lam1
    t0 = time.perf_counter()
    gd = run_gradient_descent(
        obj.loss_fn,
        obj.params,
        data.batch,
        lr,
        np.asarray(w_star, np.dtype(dtype)),
        cfg.gd_tolerance,
        cfg.gd_max_steps,
    )
    t_gd = time.perf_counter() - t0
    bound_measured = gd_steps_to_tolerance([lam_min, lam1], lr, cfg.gd_tolerance)
    bound_theory = gd_steps_to_tolerance(
        [pred.lower_edge, predicted_top], 1.0 / predicted_top, cfg.gd_tolerance
    )
    out["gd"] = {
        "learning_rate": lr,
        "stable_learning_rate": 2.0 / lam1,
        "tolerance": cfg.gd_tolerance,
        "steps": gd["steps"],
        "error_ratio": gd["error_ratio"],
        "initial_error": gd["initial_error"],
        "seconds": t_gd,
        "bound_from_measured_eigenvalues": bound_measured._asdict(),
        "bound_from_theory": bound_theory._asdict(),
        "slowest_time_constant": lam1 / lam_min,
    }
    if cfg.dense_check:
        out["gd"]["bound_from_dense_spectrum"] = gd_steps_to_tolerance(
            dense, lr, cfg.gd_tolerance
        )._asdict()
    return out


def _linear_agreements(variants: Mapping[str, Any], cfg: LinearSettings) -> list[dict]:
    b, c = variants["biased"], variants["centered"]
    pb, pc = b["prediction"], c["prediction"]
    rows = [
        ("biased", "outlier lambda_1 vs N m^2 + v", b["lambda_max"], pb["outlier"]),
        ("biased", "2nd eigenvalue vs MP upper edge", b["lambda_2"], pb["upper_edge"]),
        ("biased", "smallest eigenvalue vs MP lower edge", b["lambda_min"], pb["lower_edge"]),
        ("centered", "largest eigenvalue vs MP upper edge", c["lambda_max"], pc["upper_edge"]),
        ("centered", "smallest eigenvalue vs MP lower edge", c["lambda_min"], pc["lower_edge"]),
    ]
    return [
        {
            "variant": v,
            "quantity": q,
            "measured": m,
            "predicted": p,
            "relative_error": _rel(m, p),
            "within_tolerance": _rel(m, p) <= cfg.tolerance,
        }
        for v, q, m, p in rows
    ]


def _run_linear(config: InputBiasConfig, bar) -> dict[str, Any]:
    cfg = config.linear
    key = jax.random.key(config.seed)
    variants = {}
    for name, mean in (("biased", cfg.mean), ("centered", 0.0)):
        bar.set_postfix_str(f"linear/{name}")
        variants[name] = _linear_variant(cfg, mean, config.seed, key)
        bar.update(1)
    agreements = _linear_agreements(variants, cfg)
    sigma = cfg.sigma or max(v["slq"]["default_sigma"] for v in variants.values())
    b, c = variants["biased"]["gd"], variants["centered"]["gd"]
    steps_ratio = b["steps"] / c["steps"] if b["steps"] and c["steps"] else None
    return {
        "num_inputs": cfg.num_inputs,
        "num_samples": cfg.num_samples,
        "variance": cfg.variance,
        "biased_mean": cfg.mean,
        "tolerance": cfg.tolerance,
        "density_sigma": sigma,
        "variants": variants,
        "agreements": agreements,
        "all_within_tolerance": all(a["within_tolerance"] for a in agreements),
        "gd_steps_ratio_biased_over_centered": steps_ratio,
        "gd_bound_ratio_biased_over_centered": (
            b["bound_from_measured_eigenvalues"]["steps"]
            / c["bound_from_measured_eigenvalues"]["steps"]
        ),
    }


# --------------------------------------------------------------------------------------
# Part 2: one-hidden-layer MLP on the digits
# --------------------------------------------------------------------------------------


def _mlp_variants(cfg: MLPSettings) -> list[tuple[str, str, bool]]:
    """``(name, preprocessing, batchnorm)``."""
    return [
        ("raw", cfg.raw_preprocessing, False),
        ("centered", "center", False),
        ("batchnorm", cfg.raw_preprocessing, True),
    ]


def _input_statistics(x: np.ndarray) -> dict[str, Any]:
    x = np.asarray(x, np.float64)
    mu = x.mean(0)
    corr = np.linalg.eigvalsh(x.T @ x / x.shape[0])[::-1]
    cov = np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True))[::-1]
    return {
        "mean_sq_norm": float(mu @ mu),
        "mean_pixel_variance": float(x.var(0).mean()),
        "correlation_top_eigenvalues": corr[:3],
        "covariance_top_eigenvalues": cov[:3],
    }


def _mean_direction_overlap(op, vector, mean_direction: np.ndarray) -> float:
    """``||mu_hat^T K||^2`` for ``K`` the first-layer kernel block ``(D, H)`` of a unit
    eigenvector: the share of the eigenvector along ``mu_hat (x) R^H``."""
    tree = op.unravel(jnp.asarray(vector, op.dtype))
    kernel = np.asarray(tree["linears"][0]["kernel"], np.float64)
    proj = mean_direction @ kernel
    return float(proj @ proj / np.sum(np.asarray(vector, np.float64) ** 2))


def _analyse_mlp(model, cfg: MLPSettings, sub, mode, mean_direction, key) -> dict[str, Any]:
    import hessspec as hs
    from hessspec.nn.objective import make_objective

    obj = make_objective(
        model,
        "cross_entropy",
        mode,
        population_data=sub if mode == "population" else None,
    )
    op = hs.hessian_operator(obj.loss_fn, obj.params, sub.batch)
    k_top, k_slq = jax.random.split(key)
    t0 = time.perf_counter()
    top = hs.top_eigenpairs(op, cfg.top_k, num_steps=cfg.lanczos_steps or None, key=k_top)
    split = hs.outlier_split(top.values, 10)
    steps = min(cfg.slq_steps, op.dim)
    sd = hs.spectral_density(op, num_probes=cfg.slq_probes, num_steps=steps, key=k_slq)
    logits = obj.logits_fn(obj.params, jnp.asarray(sub.x))
    loss = float(obj.loss_fn(obj.params, sub.batch))
    acc = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(sub.y)))
    return {
        "bn_mode": mode,
        "num_params": op.dim,
        "loss": loss,
        "accuracy": acc,
        "top_values": top.values,
        "top_residuals": top.residuals,
        "converged": top.converged,
        "lambda_max": float(top.values[0]),
        "stable_learning_rate": 2.0 / float(top.values[0]) if top.values[0] > 0 else None,
        "num_outliers": split.num_outliers,
        "bulk_edge": split.bulk_edge,
        "outlier_ratio": split.outlier_ratio,
        "ratio_to_kth": split.ratio_to_kth,
        "top_vector_mean_overlap": _mean_direction_overlap(op, top.vectors[0], mean_direction),
        "slq": {**_slq_record(sd), "dim": op.dim},
        "seconds": time.perf_counter() - t0,
    }


def _run_mlp(config: InputBiasConfig, bar) -> dict[str, Any]:
    from hessspec.nn.data import load_digits, subsample
    from hessspec.nn.models import make_model
    from hessspec.nn.train import TrainConfig, train

    cfg = config.mlp
    dtype = _dtype(cfg.dtype)
    key = jax.random.key(config.seed + 1)
    raw_train = load_digits("train", preprocessing=cfg.raw_preprocessing, flatten=True)
    mu = np.asarray(raw_train.x, np.float64).mean(0)
    mean_direction = mu / np.linalg.norm(mu)
    phases = [0] + ([cfg.train_steps] if cfg.train_steps > 0 else [])
    out = {"phases": phases, "variants": {}}
    for name, prep, bn in _mlp_variants(cfg):
        train_set = load_digits("train", preprocessing=prep, flatten=True, dtype=np.dtype(dtype))
        if cfg.analysis_size > train_set.num_examples:
            raise ConfigError(
                f"config key 'mlp.analysis_size' = {cfg.analysis_size} exceeds the "
                f"{train_set.num_examples} digits training examples."
            )
        sub = subsample(train_set, cfg.analysis_size, seed=config.seed, stratify=True)
        model = make_model(
            "mlp", (64,), 10, bn, seed=config.seed, dtype=dtype, hidden=(cfg.hidden,)
        )
        modes = list(cfg.bn_modes) if bn else [None]
        record: dict[str, Any] = {
            "preprocessing": prep,
            "batchnorm": bn,
            "bn_modes": modes,
            "inputs": _input_statistics(sub.x),
            "analyses": {},
        }

        def on_checkpoint(step, m, *_, record=record, sub=sub, modes=modes, name=name):
            for mode in modes:
                bar.set_postfix_str(f"mlp/{name}/step {step}/{mode or 'no BN'}")
                k = jax.random.fold_in(key, step)
                res = _analyse_mlp(m, cfg, sub, mode, mean_direction, k)
                record["analyses"].setdefault(str(step), {})[str(mode)] = res

        tcfg = TrainConfig(
            optimizer="sgd",
            learning_rate=cfg.learning_rate,
            momentum=0.0,
            batch_size=min(cfg.batch_size, train_set.num_examples),
            steps=cfg.train_steps,
        )
        hist = train(
            model,
            train_set.x,
            train_set.y,
            tcfg,
            checkpoints=phases,
            on_checkpoint=on_checkpoint,
            seed=config.seed,
            progress=False,
            desc=f"mlp/{name}",
        )
        record["train_losses"] = hist.losses
        record["train_seconds"] = hist.seconds
        out["variants"][name] = record
        bar.update(1)
    return out


# --------------------------------------------------------------------------------------
# Figures (public: the notebooks redraw them from results.json)
# --------------------------------------------------------------------------------------


def plot_linear_density(results: Mapping[str, Any], axes=None):
    """SLQ density of the linear model's Hessian over the Marchenko-Pastur law, log y.

    Three panels: centred inputs, the bulk of the biased inputs, and the whole biased
    spectrum on a log x axis with the outlier and LeCun's ``N m^2 + v``. All curves use the
    kernel width ``results["linear"]["density_sigma"]`` (in the legends).

    Args:
        results: the dict returned by :func:`run_input_bias_study` (or results.json).
        axes: three matplotlib axes; None makes a new figure.

    Returns:
        The matplotlib Figure.
    """
    from hessspec.analysis.theory import marchenko_pastur

    lin = results["linear"]
    if axes is None:
        fig, ax = new_figure(1, 3, size=(4.6, 3.6))
        axes = ax[0]
    fig = axes[0].figure
    n = lin["num_inputs"]
    sigma = lin["density_sigma"]
    mp = marchenko_pastur(n / lin["num_samples"], lin["variance"])
    grid = np.linspace(0.0, mp.upper_edge * 1.3, 1500)
    for ax, name, bulk_mass in (
        (axes[0], "centered", 1.0),
        (axes[1], "biased", 1.0 - 1.0 / n),
    ):
        var = lin["variants"][name]
        dens = _density_from_record(var["slq"], grid, sigma)
        ax.semilogy(grid, dens, label=f"SLQ (sigma = {sigma:.3g})")
        ax.semilogy(grid, bulk_mass * mp.density(grid), "k--", label="Marchenko-Pastur")
        for x in (mp.lower_edge, mp.upper_edge):
            ax.axvline(x, color="0.6", lw=0.8, ls=":")
        ax.axvline(var["lambda_min"], color="C3", lw=0.8, label="Lanczos lambda_min")
        ax.axvline(var["upper_bulk_edge"], color="C2", lw=0.8, label="Lanczos bulk edge")
        ax.set_ylim(1e-4, 10)
        ax.set_xlabel("eigenvalue")
        ax.set_title(f"{name} inputs (m = {var['mean']:g}): bulk")
        ax.legend(fontsize=7, loc="lower center")
    axes[0].set_ylabel("density")
    var = lin["variants"]["biased"]
    lam_max = var["lambda_max"]
    # A log grid, refined around the outlier so that its narrow peak is resolved.
    grid = np.union1d(
        np.geomspace(mp.lower_edge * 0.5, lam_max * 1.5, 3000),
        np.linspace(lam_max - 6 * sigma, lam_max + 6 * sigma, 400),
    )
    grid = grid[grid > 0]
    dens = _density_from_record(var["slq"], grid, sigma)
    axes[2].loglog(grid, dens, label=f"SLQ (sigma = {sigma:.3g})")
    axes[2].loglog(grid, (1.0 - 1.0 / n) * mp.density(grid), "k--", label="Marchenko-Pastur")
    axes[2].axvline(var["prediction"]["outlier"], color="C1", ls="--", label="N m^2 + v")
    axes[2].axvline(lam_max, color="C3", lw=0.8, label="Lanczos lambda_1")
    axes[2].set_ylim(1e-4, 10)
    axes[2].set_xlabel("eigenvalue (log)")
    axes[2].set_title("biased inputs: bulk and outlier")
    axes[2].legend(fontsize=7, loc="upper center")
    return fig


def plot_gd_convergence(results: Mapping[str, Any], ax=None):
    """GD parameter error ratio against steps, biased vs centred, with the worst-case
    bound ``rate^t`` of :func:`hessspec.analysis.theory.gd_steps_to_tolerance`.

    Args:
        results: the dict the study returns (or its parsed results.json).
        ax: a matplotlib axes; None makes a new figure.

    Returns:
        The matplotlib Figure.
    """
    lin = results["linear"]
    if ax is None:
        fig, axs = new_figure(1, 1, size=(6.0, 4.0))
        ax = axs[0, 0]
    fig = ax.figure
    for i, name in enumerate(("biased", "centered")):
        gd = lin["variants"][name]["gd"]
        err = np.asarray(gd["error_ratio"], np.float64)
        t = np.arange(err.size)
        ax.semilogy(t, err, color=f"C{i}", label=f"{name}: GD, {gd['steps']} steps")
        rate = gd["bound_from_measured_eigenvalues"]["rate"]
        ax.semilogy(t, rate**t, color=f"C{i}", ls=":", label=f"{name}: bound rate^t")
    tol = lin["variants"]["biased"]["gd"]["tolerance"]
    ax.axhline(tol, color="k", lw=0.8, ls="--", label=f"tolerance {tol:g}")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(0, None)
    ax.set_xlabel("GD step (lr = 1 / lambda_max)")
    ax.set_ylabel("||w_t - w*|| / ||w_0 - w*||")
    ax.set_ylim(tol / 10, 2)
    ax.set_title("Gradient descent on the linear model")
    ax.legend(fontsize=8)
    return fig


def _mlp_rows(results: Mapping[str, Any]):
    """``(label, step, analysis)`` for every MLP analysis, in a fixed order."""
    mlp = results["mlp"]
    for name, var in mlp["variants"].items():
        for step in mlp["phases"]:
            for mode, res in var["analyses"][str(step)].items():
                label = name if mode == "None" else f"{name} ({mode})"
                yield label, step, res


def plot_mlp_top_eigenvalues(results: Mapping[str, Any], axes=None):
    """Top Hessian eigenvalues of each MLP variant (log y), one panel per phase.

    Args:
        results: the dict the study returns (or its parsed results.json).
        axes: one matplotlib axes per phase; None makes a new figure.

    Returns:
        The matplotlib Figure.
    """
    phases = results["mlp"]["phases"]
    if axes is None:
        fig, ax = new_figure(1, len(phases), size=(5.5, 4.0))
        axes = ax[0]
    fig = axes[0].figure
    labels = list(dict.fromkeys(lbl for lbl, _, _ in _mlp_rows(results)))
    for ax, step in zip(axes, phases, strict=True):
        for label, s, res in _mlp_rows(results):
            if s != step:
                continue
            vals = np.asarray(res["top_values"], np.float64)
            ax.semilogy(
                np.arange(1, vals.size + 1),
                np.clip(vals, 1e-8, None),
                "o-",
                ms=3,
                color=f"C{labels.index(label) % 10}",
                label=label,
            )
        ax.set_xlabel("index i")
        ax.set_ylabel("lambda_i")
        ax.set_title("initialisation" if step == 0 else f"after {step} SGD steps")
        ax.legend(fontsize=8)
    return fig


def plot_mlp_density(results: Mapping[str, Any], axes=None):
    """SLQ densities of the MLP variants (log y): one row per phase, one column per variant
    (and BN mode), each with Ghorbani's width (in the panel title).

    Args:
        results: the dict returned by :func:`run_input_bias_study` (or results.json).
        axes: a 2-D array of matplotlib axes (phases x variants); None makes a new figure.

    Returns:
        The matplotlib Figure.
    """
    phases = results["mlp"]["phases"]
    rows = list(_mlp_rows(results))
    labels = list(dict.fromkeys(lbl for lbl, _, _ in rows))
    if axes is None:
        fig, axes = new_figure(len(phases), len(labels), size=(3.6, 2.8))
    fig = axes[0][0].figure
    lo = min(float(np.min(r["slq"]["nodes"])) for _, _, r in rows)
    hi = max(float(np.max(r["slq"]["nodes"])) for _, _, r in rows)
    pad = 0.05 * (hi - lo)
    grid = np.linspace(lo - pad, hi + pad, 4000)
    for label, step, res in rows:
        ax = axes[phases.index(step)][labels.index(label)]
        sigma = res["slq"]["default_sigma"]
        dens = _density_from_record(res["slq"], grid)
        ax.semilogy(grid, np.maximum(dens, 1e-12), color=f"C{labels.index(label) % 10}")
        ax.set_ylim(1e-5, 2.0 * float(dens.max()))
        when = "init" if step == 0 else f"step {step}"
        ax.set_title(f"{label}, {when} (sigma = {sigma:.2g})", fontsize=8)
        ax.set_xlabel("eigenvalue")
    for r in range(len(phases)):
        axes[r][0].set_ylabel("density")
    return fig


def plot_mlp_training(results: Mapping[str, Any], ax=None):
    """Mini-batch training loss of the MLP variants at the shared learning rate.

    Args:
        results: the dict the study returns (or its parsed results.json).
        ax: a matplotlib axes; None makes a new figure.

    Returns:
        The matplotlib Figure.
    """
    if ax is None:
        fig, axs = new_figure(1, 1, size=(6.0, 4.0))
        ax = axs[0, 0]
    fig = ax.figure
    for name, var in results["mlp"]["variants"].items():
        losses = np.asarray(var["train_losses"], np.float64)
        if losses.size == 0:
            continue
        w = max(1, losses.size // 30)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.semilogy(np.arange(w, losses.size + 1), smooth, label=name)
    ax.set_xlabel("SGD step")
    ax.set_ylabel("mini-batch loss (running mean)")
    ax.set_title(f"training at lr = {results['config']['mlp']['learning_rate']:g}")
    ax.legend()
    return fig


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _report(results: Mapping[str, Any], config: InputBiasConfig) -> str:
    lin = results["linear"]
    n, p, v, m = lin["num_inputs"], lin["num_samples"], lin["variance"], lin["biased_mean"]
    b, c = lin["variants"]["biased"], lin["variants"]["centered"]
    lines = [
        f"# {config.title}",
        "",
        "LeCun, Kanter & Solla (1991): for a linear model with squared loss the Hessian is "
        "the input correlation matrix R = X^T X / p. Inputs whose components have mean m and "
        "variance v give one outlier near N m^2 + v; the rest follows Marchenko-Pastur with "
        "ratio N/p. Centring removes the outlier, and with it the cap it puts on the "
        "learning rate.",
        "",
        f"Wall time: {results['timing']['total_s']:.1f} s (linear part "
        f"{results['timing']['linear_s']:.1f} s, MLP part {results['timing']['mlp_s']:.1f} s) "
        f"on {', '.join(results['environment']['devices'])}; x64 = "
        f"{results['environment']['x64']}.",
        "",
        "## Linear model, synthetic Gaussian inputs",
        "",
        f"N = {n} inputs, p = {p} samples, variance v = {_fmt(v)}; biased mean m = {_fmt(m)}, "
        f"centred mean 0 (same noise draws). Model dtype {config.linear.dtype}. Every "
        "eigenvalue below is measured by Lanczos on `hessian_operator` (Hessian-vector "
        "products), not from the dense matrix.",
        "",
        "### Measured against theory",
        "",
        _md_table(
            [
                "inputs",
                "quantity",
                "measured",
                "theory",
                "relative error",
                f"within {_pct(lin['tolerance'])}",
            ],
            [
                [
                    a["variant"],
                    a["quantity"],
                    a["measured"],
                    a["predicted"],
                    _pct(a["relative_error"]),
                    a["within_tolerance"],
                ]
                for a in lin["agreements"]
            ],
        ),
        "",
        f"All agreements within {_pct(lin['tolerance'])}: **{_fmt(lin['all_within_tolerance'])}**.",
        "",
        f"- Biased outlier at finite N/p (Baik-Ben Arous-Peche): theory "
        f"{_fmt(b['prediction']['outlier_finite_ratio'], 6)}, measured "
        f"{_fmt(b['lambda_max'], 6)} (relative error "
        f"{_pct(_rel(b['lambda_max'], b['prediction']['outlier_finite_ratio']))}).",
        f"- Centring removes the outlier: lambda_max falls from {_fmt(b['lambda_max'])} to "
        f"{_fmt(c['lambda_max'])} (factor {_fmt(b['lambda_max'] / c['lambda_max'])}), while "
        f"lambda_min stays ({_fmt(b['lambda_min'])} vs {_fmt(c['lambda_min'])}).",
        f"- SLQ weight of the outlier (biased; theory 1/N = {_fmt(1.0 / n)}): "
        f"{_fmt(b['slq']['outlier_mass'])} ({b['slq']['num_probes']} probes, "
        f"{b['slq']['num_steps']} steps).",
        f"- Lanczos cost: {b['lanczos']['num_matvecs']} (biased) and "
        f"{c['lanczos']['num_matvecs']} (centred) Hessian-vector products for the three "
        "extreme eigenvalues; largest residual "
        f"{_fmt(max(max(b['lanczos']['top_residuals']), max(c['lanczos']['top_residuals'])))}.",
    ]
    if "dense" in b:
        lines.append(
            "- Dense check (eigvalsh of the operator's matrix): largest |Lanczos - dense| "
            f"{_fmt(max(b['dense']['max_abs_diff_lanczos'], c['dense']['max_abs_diff_lanczos']))}."
        )
    lines += [
        "",
        "![SLQ density and Marchenko-Pastur](figures/linear_density.png)",
        "",
        f"Density: Gaussian broadening of the SLQ nodes ({b['slq']['num_probes']} probes x "
        f"{b['slq']['num_steps']} Lanczos steps), one width sigma = "
        f"{_fmt(lin['density_sigma'])} for both variants"
        + (
            " (configured). "
            if config.linear.sigma > 0
            else " (Ghorbani et al.'s sigma^2 = 1e-5 max(1, lambda_max - lambda_min) of the "
            "biased spectrum, the larger of the two; the centred spectrum's own would be "
            f"{_fmt(c['slq']['default_sigma'])}). "
        )
        + "The biased Marchenko-Pastur curve is scaled by the bulk mass (N-1)/N.",
        "",
        "### Gradient descent consequence",
        "",
        f"Full-batch GD at lr = 1 / lambda_max (measured), from the model's initialisation, "
        f"run until ||w_t - w*|| <= {_fmt(b['gd']['tolerance'])} ||w_0 - w*|| (w* the "
        "least-squares solution). The bound is the worst case over starting points, "
        "ceil(log tol / log rate) with rate = max |1 - lr lambda| "
        "(`theory.gd_steps_to_tolerance`).",
        "",
        _md_table(
            [
                "inputs",
                "lr",
                "GD steps (run)",
                "bound (measured eigenvalues)",
                "bound (theory eigenvalues)",
                "lambda_max / lambda_min",
            ],
            [
                [
                    name,
                    var["gd"]["learning_rate"],
                    _fmt(var["gd"]["steps"]),
                    _fmt(var["gd"]["bound_from_measured_eigenvalues"]["steps"]),
                    _fmt(var["gd"]["bound_from_theory"]["steps"]),
                    var["gd"]["slowest_time_constant"],
                ]
                for name, var in (("biased", b), ("centered", c))
            ],
        ),
        "",
        f"Biased inputs need {_fmt(lin['gd_steps_ratio_biased_over_centered'])} times as many "
        f"GD steps as centred ones (bound: {_fmt(lin['gd_bound_ratio_biased_over_centered'])} "
        "times): the outlier caps the learning rate, and the bulk then converges at "
        "lr * lambda_min per step.",
        "",
        "![GD convergence](figures/linear_gd.png)",
    ]
    if results.get("mlp") is not None:
        mlp = results["mlp"]
        cfg = config.mlp
        lines += [
            "",
            "## One-hidden-layer MLP on the digits",
            "",
            f"MLP 64 -> {cfg.hidden} -> 10 (ReLU), cross-entropy, {cfg.analysis_size} "
            f"training examples for the Hessian (one batch), top {cfg.top_k} eigenvalues by "
            f"Lanczos. Variants: raw inputs (preprocessing '{cfg.raw_preprocessing}', positive "
            "mean), centred inputs (per-pixel train mean removed), and BatchNorm after the "
            f"hidden linear layer on raw inputs. Short training: {cfg.train_steps} plain SGD "
            f"steps at the shared lr = {_fmt(cfg.learning_rate)}, batch {cfg.batch_size}.",
            "",
            "Input statistics of the analysis set (the LeCun outlier of the input correlation "
            "matrix is about ||E x||^2 when the mean dominates):",
            "",
            _md_table(
                ["variant", "||E x||^2", "mean pixel variance", "top eigenvalues of X^T X / n"],
                [
                    [
                        name,
                        var["inputs"]["mean_sq_norm"],
                        var["inputs"]["mean_pixel_variance"],
                        ", ".join(_fmt(e) for e in var["inputs"]["correlation_top_eigenvalues"]),
                    ]
                    for name, var in mlp["variants"].items()
                ],
            ),
            "",
            "Hessian of the training loss (overlap: share of the top eigenvector's norm^2 in "
            "its first-layer part along the raw input-mean direction, LeCun's outlier "
            "direction):",
            "",
            _md_table(
                [
                    "variant",
                    "step",
                    "lambda_1",
                    "lambda_1 / lambda_10",
                    "outliers",
                    "lambda_1 / bulk edge",
                    "mean-direction overlap",
                    "2 / lambda_1",
                    "loss",
                    "accuracy",
                ],
                [
                    [
                        label,
                        str(step),
                        res["lambda_max"],
                        res["ratio_to_kth"],
                        str(res["num_outliers"]),
                        res["outlier_ratio"],
                        res["top_vector_mean_overlap"],
                        res["stable_learning_rate"],
                        res["loss"],
                        res["accuracy"],
                    ]
                    for label, step, res in _mlp_rows(results)
                ],
            ),
            "",
        ]
        init = {lbl: r for lbl, s, r in _mlp_rows(results) if s == 0}
        if "raw" in init and "centered" in init:
            factor = init["raw"]["lambda_max"] / init["centered"]["lambda_max"]
            lines.append(
                f"At initialisation lambda_1 is {_fmt(factor)} times larger with raw than with "
                "centred inputs."
            )
        bn_train = init.get("batchnorm (train)")
        if bn_train is not None and "raw" in init:
            lines.append(
                f"BatchNorm in train mode (batch statistics) on the same raw inputs: lambda_1 = "
                f"{_fmt(bn_train['lambda_max'])}, mean-direction overlap "
                f"{_fmt(bn_train['top_vector_mean_overlap'])} (raw: "
                f"{_fmt(init['raw']['top_vector_mean_overlap'])}): with batch statistics the "
                "network is exactly invariant to the input mean."
            )
        bn_pop = init.get("batchnorm (population)")
        if bn_pop is not None:
            lines.append(
                f"With frozen (population) statistics the mean is a constant again and the "
                f"BN network's lambda_1 is {_fmt(bn_pop['lambda_max'])}."
            )
        lines += [
            "",
            "![MLP top eigenvalues](figures/mlp_top_eigenvalues.png)",
            "",
            "![MLP densities](figures/mlp_density.png)",
            "",
            "Densities: Gaussian broadening of the SLQ nodes "
            f"({cfg.slq_probes} probes x {cfg.slq_steps} steps) with Ghorbani's width "
            "sigma^2 = 1e-5 max(1, lambda_max - lambda_min) of each spectrum (in each "
            "panel's title).",
        ]
        if cfg.train_steps > 0:
            lines += ["", "![MLP training](figures/mlp_training.png)"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _figure_names(config: InputBiasConfig) -> list[str]:
    names = ["figures/linear_density.png", "figures/linear_gd.png"]
    if config.mlp.enabled:
        names += ["figures/mlp_top_eigenvalues.png", "figures/mlp_density.png"]
        if config.mlp.train_steps > 0:
            names.append("figures/mlp_training.png")
    return names


def run_input_bias_study(
    config: InputBiasConfig, out_dir: Path, progress: bool = True, *, overwrite: bool = False
) -> dict[str, Any]:
    """Run the input-bias study and write results.json, figures/*.png and report.md.

    Args:
        config: an :class:`InputBiasConfig` (or a mapping, read with
            :meth:`InputBiasConfig.from_dict`).
        out_dir: output folder, created if missing. Files already there are never
            overwritten: FileExistsError if one of this study's file names is taken.
        progress: show a tqdm progress bar on stderr.
        overwrite: replace this study's own output files (results.json, report.md,
            config.toml, its figures) if present; other files are never touched.

    Returns:
        The results dict (what results.json holds): ``experiment``, ``config``, ``linear``
        (per variant measured eigenvalues, predictions, SLQ quadrature, GD run and bounds;
        ``agreements`` with relative errors and ``all_within_tolerance``), ``mlp`` (per
        variant, step and BN mode the top eigenvalues, outlier split, SLQ quadrature,
        training losses) or None, ``timing``, ``environment`` and ``files``.
    """
    from tqdm.auto import tqdm

    if isinstance(config, Mapping):
        config = InputBiasConfig.from_dict(config)
    if not isinstance(config, InputBiasConfig):
        raise TypeError(f"config must be an InputBiasConfig, got {type(config).__name__}.")
    output = StudyOutput(Path(out_dir), overwrite=overwrite)
    figures = _figure_names(config)
    files = ["results.json", "report.md", "config.toml", *figures]
    output.claim(files)

    t_start = time.perf_counter()
    total = 2 + (3 if config.mlp.enabled else 0)
    bar = tqdm(total=total, desc="input_bias", disable=not progress, dynamic_ncols=True)
    try:
        with jax.enable_x64(config.x64):
            env = environment()
            t0 = time.perf_counter()
            linear = _run_linear(config, bar)
            t_linear = time.perf_counter() - t0
            t0 = time.perf_counter()
            mlp = _run_mlp(config, bar) if config.mlp.enabled else None
            t_mlp = time.perf_counter() - t0
    finally:
        bar.close()
    results: dict[str, Any] = {
        "experiment": EXPERIMENT,
        "config": config.to_dict(),
        "linear": linear,
        "mlp": mlp,
        "environment": env,
        "timing": {
            "linear_s": t_linear,
            "mlp_s": t_mlp,
            "total_s": time.perf_counter() - t_start,
        },
        "files": files,
    }
    results = _jsonable(results)

    output.write_text("config.toml", config.to_toml())
    output.save_figure("figures/linear_density.png", plot_linear_density(results))
    output.save_figure("figures/linear_gd.png", plot_gd_convergence(results))
    if mlp is not None:
        output.save_figure("figures/mlp_top_eigenvalues.png", plot_mlp_top_eigenvalues(results))
        output.save_figure("figures/mlp_density.png", plot_mlp_density(results))
        if config.mlp.train_steps > 0:
            output.save_figure("figures/mlp_training.png", plot_mlp_training(results))
    results["timing"]["total_s"] = time.perf_counter() - t_start
    output.write_text("report.md", _report(results, config))
    output.write_json("results.json", results)
    return results
