"""The configuration of the input-bias study: :class:`InputBiasConfig` (TOML:
``experiment = "input_bias"``, top-level ``seed``, ``x64``, ``title``, and the ``[linear]``
and ``[mlp]`` tables; see ``experiments/input_bias.toml``)."""

from __future__ import annotations

import dataclasses

from hessspec.nn.objective import BN_MODES
from hessspec.studies.common.checks import check, check_dtype, check_names
from hessspec.studies.common.config import ConfigError, field
from hessspec.studies.common.experiment import ExperimentConfig

__all__ = ["EXPERIMENT", "QUICK_OVERRIDES", "InputBiasConfig", "LinearSettings", "MLPSettings"]

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

#: Inputs of the raw and batchnorm MLP variants (``mlp.raw_preprocessing``).
RAW_PREPROCESSINGS = ("unit", "raw")


@dataclasses.dataclass(frozen=True)
class LinearSettings:
    """``[linear]``: the linear model with squared loss on synthetic Gaussian inputs."""

    num_inputs: int = field(200, "N, the input dimension (= number of parameters)")
    num_samples: int = field(2000, "p, the number of samples")
    variance: float = field(1.0, "v, the variance of every input component")
    mean: float = field(1.0, "m, the mean of every input component in the biased variant")
    dtype: str = field("float64", "model/HVP dtype: float32 or float64 (needs x64 = true)")
    tolerance: float = field(0.05, "relative error allowed between measured and theory")
    lanczos_steps: int = field(0, "Lanczos basis size of top_eigenpairs; 0: library default")
    slq_probes: int = field(10, "SLQ density: random probes")
    slq_steps: int = field(90, "SLQ density: Lanczos steps per probe (<= num_inputs)")
    sigma: float = field(
        0.0,
        "kernel width of the density figure, both variants; 0: the larger of the two "
        "variants' Ghorbani widths sqrt(1e-5 max(1, lambda_max - lambda_min))",
    )
    gd_tolerance: float = field(1e-3, "GD stops when ||w_t - w*|| <= tol ||w_0 - w*||")
    gd_max_steps: int = field(100_000, "GD step budget")
    dense_check: bool = field(True, "also compute the dense eigvalsh of the operator")

    def __post_init__(self):
        check(self.num_inputs >= 2, "linear.num_inputs", "be >= 2", self.num_inputs)
        check(self.num_samples >= 1, "linear.num_samples", "be >= 1", self.num_samples)
        check(self.variance > 0, "linear.variance", "be > 0", self.variance)
        check(self.mean != 0, "linear.mean", "be non-zero (the biased variant)", self.mean)
        check_dtype("linear.dtype", self.dtype)
        check(0 < self.tolerance < 1, "linear.tolerance", "lie in (0, 1)", self.tolerance)
        check(self.lanczos_steps >= 0, "linear.lanczos_steps", "be >= 0", self.lanczos_steps)
        check(self.slq_probes >= 1, "linear.slq_probes", "be >= 1", self.slq_probes)
        check(
            1 <= self.slq_steps <= self.num_inputs,
            "linear.slq_steps",
            f"lie in [1, linear.num_inputs = {self.num_inputs}]",
            self.slq_steps,
        )
        check(self.sigma >= 0, "linear.sigma", "be >= 0", self.sigma)
        check(0 < self.gd_tolerance < 1, "linear.gd_tolerance", "lie in (0, 1)", self.gd_tolerance)
        check(self.gd_max_steps >= 1, "linear.gd_max_steps", "be >= 1", self.gd_max_steps)


@dataclasses.dataclass(frozen=True)
class MLPSettings:
    """``[mlp]``: a one-hidden-layer MLP on the digits, raw vs centred inputs vs BatchNorm."""

    enabled: bool = field(True, "run the MLP part")
    hidden: int = field(32, "width of the hidden layer")
    raw_preprocessing: str = field(
        "unit", "inputs of the raw and batchnorm variants: 'unit' (x/16 in [0,1]) or 'raw' (0..16)"
    )
    analysis_size: int = field(512, "examples of the fixed analysis set (stratified subset)")
    top_k: int = field(20, "top eigenvalues per Hessian (>= 10, the number of classes)")
    lanczos_steps: int = field(0, "Lanczos basis size; 0: library default")
    slq_probes: int = field(8, "SLQ density: random probes")
    slq_steps: int = field(80, "SLQ density: Lanczos steps per probe")
    train_steps: int = field(300, "SGD steps of the short training (0: initialisation only)")
    learning_rate: float = field(0.05, "learning rate shared by all variants (plain SGD)")
    batch_size: int = field(64, "training mini-batch size")
    bn_modes: tuple[str, ...] = field(
        ("train", "population"), "BN modes the batchnorm variant is analysed in"
    )
    dtype: str = field("float32", "model/HVP dtype: float32 or float64 (needs x64 = true)")

    def __post_init__(self):
        check(self.hidden >= 1, "mlp.hidden", "be >= 1", self.hidden)
        check(
            self.raw_preprocessing in RAW_PREPROCESSINGS,
            "mlp.raw_preprocessing",
            f"be one of {list(RAW_PREPROCESSINGS)}",
            self.raw_preprocessing,
        )
        check(self.analysis_size >= 2, "mlp.analysis_size", "be >= 2", self.analysis_size)
        check(self.top_k >= 10, "mlp.top_k", "be >= 10 (the number of classes)", self.top_k)
        check(self.lanczos_steps >= 0, "mlp.lanczos_steps", "be >= 0", self.lanczos_steps)
        check(self.slq_probes >= 1, "mlp.slq_probes", "be >= 1", self.slq_probes)
        check(self.slq_steps >= 1, "mlp.slq_steps", "be >= 1", self.slq_steps)
        check(self.train_steps >= 0, "mlp.train_steps", "be >= 0", self.train_steps)
        check(self.learning_rate > 0, "mlp.learning_rate", "be > 0", self.learning_rate)
        check(self.batch_size >= 1, "mlp.batch_size", "be >= 1", self.batch_size)
        check_names("mlp.bn_modes", self.bn_modes, BN_MODES, "mode")
        check_dtype("mlp.dtype", self.dtype)


@dataclasses.dataclass(frozen=True)
class InputBiasConfig(ExperimentConfig):
    """The whole input-bias study. TOML: ``experiment = "input_bias"``, top-level ``seed``,
    ``x64``, ``title``, and the ``[linear]`` and ``[mlp]`` tables."""

    EXPERIMENT = EXPERIMENT

    seed: int = field(0, "seed of the data, the initialisation and every random probe")
    x64: bool = field(
        True,
        "run with jax_enable_x64 on (scoped to the run) so Lanczos works in float64; the "
        "models keep their dtype",
    )
    title: str = field("Input statistics and the Hessian outlier", "title of report.md")
    linear: LinearSettings = dataclasses.field(default_factory=LinearSettings)
    mlp: MLPSettings = dataclasses.field(default_factory=MLPSettings)

    def __post_init__(self):
        for section in ("linear", "mlp"):
            if getattr(self, section).dtype == "float64" and not self.x64:
                raise ConfigError(f"config key '{section}.dtype' = 'float64' needs x64 = true.")
