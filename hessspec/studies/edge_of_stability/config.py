"""The configuration of the edge-of-stability study: :class:`EdgeOfStabilityConfig` (TOML:
``experiment = "edge_of_stability"`` and top-level keys, see
``experiments/edge_of_stability.toml``)."""

from __future__ import annotations

import dataclasses

from hessspec.studies.common.checks import check, check_dtype
from hessspec.studies.common.config import ConfigError, field
from hessspec.studies.common.experiment import ExperimentConfig

__all__ = ["ACTIVATIONS", "EXPERIMENT", "QUICK_OVERRIDES", "EdgeOfStabilityConfig"]

EXPERIMENT = "edge_of_stability"

#: Overrides for a cheaper run (``python -m hessspec.run --quick``): fewer examples and
#: steps, one learning rate and the momentum run, without BatchNorm only.
QUICK_OVERRIDES: tuple[str, ...] = (
    "train_size=300",
    "steps=600",
    "learning_rates=[0.4]",
    "batchnorm=[false]",
)

#: Activations of the MLP (:class:`hessspec.nn.models.MLP`).
ACTIVATIONS = ("tanh", "relu", "gelu", "softplus", "sigmoid", "identity")


@dataclasses.dataclass(frozen=True)
class EdgeOfStabilityConfig(ExperimentConfig):
    """Full-batch gradient descent at the edge of stability (Cohen et al. 2021). TOML:
    ``experiment = "edge_of_stability"`` and these keys."""

    EXPERIMENT = EXPERIMENT

    seed: int = field(0, "seed of the initialisation and of the example subset")
    x64: bool = field(False, "run with jax_enable_x64 on (scoped to the run)")
    title: str = field("Gradient descent at the edge of stability", "title of report.md")
    train_size: int = field(1000, "digits training examples (the full batch)")
    preprocessing: str = field("center", "digits preprocessing: 'unit', 'center' or 'standardize'")
    hidden: tuple[int, ...] = field((64, 64), "widths of the MLP's hidden layers")
    activation: str = field("tanh", "activation of the hidden layers")
    batchnorm: tuple[bool, ...] = field(
        (False, True), "one set of runs per entry: false = without BatchNorm, true = with"
    )
    learning_rates: tuple[float, ...] = field(
        (0.2, 0.3, 0.4), "gradient-descent learning rates (threshold 2 / lr)"
    )
    momentum_learning_rates: tuple[float, ...] = field(
        (0.3,), "learning rates of the heavy-ball runs (threshold (2 + 2 momentum) / lr)"
    )
    momentum: float = field(0.5, "heavy-ball momentum of those runs")
    steps: int = field(3000, "gradient-descent steps of every run")
    track_every: int = field(20, "measure lambda_max every this many steps")
    tolerance: float = field(1e-3, "relative residual tolerance of each lambda_max solve")
    dtype: str = field("float32", "parameter dtype: float32 or float64 (needs x64 = true)")

    def __post_init__(self):
        check(self.train_size >= 20, "train_size", "be >= 20", self.train_size)
        check(
            self.preprocessing in ("unit", "center", "standardize"),
            "preprocessing",
            "be 'unit', 'center' or 'standardize'",
            self.preprocessing,
        )
        check(
            len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden),
            "hidden",
            "hold at least one positive width",
            list(self.hidden),
        )
        check(
            self.activation in ACTIVATIONS,
            "activation",
            f"be one of {list(ACTIVATIONS)}",
            self.activation,
        )
        check(len(self.batchnorm) >= 1, "batchnorm", "name at least one network", [])
        check(
            len(set(self.batchnorm)) == len(self.batchnorm),
            "batchnorm",
            "not repeat a value",
            list(self.batchnorm),
        )
        for key in ("learning_rates", "momentum_learning_rates"):
            rates = getattr(self, key)
            check(all(lr > 0 for lr in rates), key, "hold positive learning rates", list(rates))
        check(
            len(self.learning_rates) + len(self.momentum_learning_rates) >= 1,
            "learning_rates",
            "name at least one run (with momentum_learning_rates)",
            [],
        )
        check(0 < self.momentum < 1, "momentum", "lie in (0, 1)", self.momentum)
        check(self.steps >= 1, "steps", "be >= 1", self.steps)
        check(
            1 <= self.track_every <= self.steps,
            "track_every",
            f"lie in [1, steps = {self.steps}]",
            self.track_every,
        )
        check(0 < self.tolerance < 1, "tolerance", "lie in (0, 1)", self.tolerance)
        check_dtype("dtype", self.dtype)
        if self.dtype == "float64" and not self.x64:
            raise ConfigError("config key 'dtype' = 'float64' needs x64 = true.")
