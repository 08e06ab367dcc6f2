"""The configuration of the Santurkar study: :class:`SanturkarConfig` (TOML:
``experiment = "santurkar"`` and top-level keys, see ``experiments/santurkar.toml``)."""

from __future__ import annotations

import dataclasses

from hessspec.studies.common.checks import check, check_dtype, check_names
from hessspec.studies.common.config import ConfigError, field
from hessspec.studies.common.experiment import ExperimentConfig

__all__ = ["EXPERIMENT", "PREPROCESSINGS", "QUICK_OVERRIDES", "VARIANTS", "SanturkarConfig"]

EXPERIMENT = "santurkar"

#: Overrides for a cheaper run (``python -m hessspec.run --quick``): no learning-rate
#: sweep, records every 20 steps.
QUICK_OVERRIDES: tuple[str, ...] = ("sweep_learning_rates=[]", "record_every=20")

#: The networks the study can train: no BatchNorm, BatchNorm, BatchNorm plus noise.
VARIANTS = ("standard", "batchnorm", "noisy_batchnorm")

#: Digits preprocessings (:func:`hessspec.nn.data.load_digits`).
PREPROCESSINGS = ("unit", "center", "standardize", "raw")


@dataclasses.dataclass(frozen=True)
class SanturkarConfig(ExperimentConfig):
    """The Santurkar landscape study. TOML: ``experiment = "santurkar"`` and these keys."""

    EXPERIMENT = EXPERIMENT

    seed: int = field(0, "seed of the initialisation, the batch order and the BN noise")
    x64: bool = field(False, "run with jax_enable_x64 on (scoped to the run)")
    title: str = field("BatchNorm and the smoothness of the loss landscape", "title of report.md")
    model: str = field("cnn", "'cnn' (conv stages of `channels`) or 'mlp' (of `hidden`)")
    hidden: tuple[int, ...] = field((64, 64), "mlp: widths of the hidden layers")
    channels: tuple[int, ...] = field((16, 32), "cnn: channels of each conv stage")
    preprocessing: str = field(
        "unit", "digits preprocessing: 'unit', 'center', 'standardize' or 'raw'"
    )
    variants: tuple[str, ...] = field(
        VARIANTS, "networks to train: 'standard', 'batchnorm', 'noisy_batchnorm'"
    )
    learning_rate: float = field(0.1, "the shared learning rate (SGD)")
    momentum: float = field(0.0, "SGD momentum (0: plain SGD, whose step is -lr g)")
    batch_size: int = field(64, "training mini-batch size")
    steps: int = field(600, "SGD steps")
    record_every: int = field(10, "measure the landscape and ICS every this many steps")
    step_range: tuple[float, float] = field(
        (0.5, 4.0), "step lengths along -g, in units of the learning rate"
    )
    num_step_sizes: int = field(8, "step lengths evaluated in step_range")
    noise_shift: float = field(0.5, "noisy BN: shift ~ U(-noise_shift, noise_shift)")
    noise_scale: float = field(2.0, "noisy BN: scale ~ U(1, noise_scale)")
    sweep_learning_rates: tuple[float, ...] = field(
        (0.05, 0.2), "further learning rates, landscape summary only (empty: none)"
    )
    dtype: str = field("float32", "parameter dtype: float32 or float64 (needs x64 = true)")

    def __post_init__(self):
        check(self.model in ("mlp", "cnn"), "model", "be 'mlp' or 'cnn'", self.model)
        check(all(h >= 1 for h in self.hidden), "hidden", "hold positive widths", self.hidden)
        check(len(self.hidden) >= 1, "hidden", "name at least one hidden layer", self.hidden)
        check(
            all(c >= 1 for c in self.channels) and len(self.channels) >= 1,
            "channels",
            "hold at least one positive width",
            self.channels,
        )
        check(
            self.preprocessing in PREPROCESSINGS,
            "preprocessing",
            f"be one of {list(PREPROCESSINGS)}",
            self.preprocessing,
        )
        check_names("variants", self.variants, VARIANTS, "variant")
        check(self.learning_rate > 0, "learning_rate", "be > 0", self.learning_rate)
        check(0 <= self.momentum < 1, "momentum", "lie in [0, 1)", self.momentum)
        check(self.batch_size >= 2, "batch_size", "be >= 2 (BatchNorm statistics)", self.batch_size)
        check(self.steps >= 1, "steps", "be >= 1", self.steps)
        check(
            1 <= self.record_every <= self.steps,
            "record_every",
            f"lie in [1, steps = {self.steps}]",
            self.record_every,
        )
        lo, hi = self.step_range
        check(0 < lo <= hi, "step_range", "satisfy 0 < lo <= hi", list(self.step_range))
        check(self.num_step_sizes >= 2, "num_step_sizes", "be >= 2", self.num_step_sizes)
        check(self.noise_shift >= 0, "noise_shift", "be >= 0", self.noise_shift)
        check(self.noise_scale >= 1, "noise_scale", "be >= 1", self.noise_scale)
        check(
            all(lr > 0 for lr in self.sweep_learning_rates),
            "sweep_learning_rates",
            "hold positive learning rates",
            list(self.sweep_learning_rates),
        )
        check_dtype("dtype", self.dtype)
        if self.dtype == "float64" and not self.x64:
            raise ConfigError("config key 'dtype' = 'float64' needs x64 = true.")
