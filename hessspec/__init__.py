"""hessspec: matrix-free Hessian eigenspectra of neural networks in JAX.

``import hessspec as hs`` loads the engine only (JAX, NumPy, SciPy; no flax, optax or
matplotlib): the solvers (:mod:`hessspec.linalg`), the curvature operators
(:mod:`hessspec.curvature`) and the analyses (:mod:`hessspec.analysis`). Networks, data and
training live in :mod:`hessspec.nn`, the studies in :mod:`hessspec.studies`; import them
explicitly (``from hessspec.nn import make_model, make_objective``). Their best-known names
are also reachable as ``hs.make_model`` etc., imported on first use.

The layers, each importing only those below it (``lint-imports`` checks)::

    cli  ->  studies  ->  nn  ->  analysis  ->  curvature  ->  linalg

See docs/design.md for the architecture and the exact metric definitions.
"""

import importlib

from hessspec import _startup  # noqa: F401 - first: Ctrl-C while `python -m hessspec.run` loads
from hessspec.analysis.blocks import BlockSpectra, BlockSpectrum, block_spectra, layer_blocks
from hessspec.analysis.landscape import (
    InternalCovariateShift,
    LandscapeMetrics,
    default_layer_order,
    internal_covariate_shift,
    landscape_along_gradient,
)
from hessspec.analysis.spectrum import (
    OutlierSplit,
    density_js_distance,
    gradient_energy,
    outlier_split,
    subspace_overlap,
)
from hessspec.analysis.theory import (
    GDConvergence,
    InputCorrelationPrediction,
    MarchenkoPastur,
    gd_steps_to_tolerance,
    input_correlation_spectrum_prediction,
    lecun_outlier,
    marchenko_pastur,
    slowest_time_constant,
    stable_learning_rate,
)
from hessspec.compilation_cache import enable_compilation_cache
from hessspec.curvature import distributed
from hessspec.curvature.operators import dataset_gradient, ggn_operator, hessian_operator
from hessspec.linalg.density import (
    SpectralDensity,
    SpectralResolutionWarning,
    gaussian_quadrature,
    spectral_density,
)
from hessspec.linalg.lanczos import (
    EigenResult,
    LanczosConvergenceWarning,
    LanczosResult,
    lanczos_tridiag,
    top_eigenpairs,
)
from hessspec.linalg.linop import LinearOperator, as_operator
from hessspec.linalg.trace import TraceEstimate, trace

__version__ = "0.1.0"

#: Names of the upper layers reachable from the top level, imported on first use.
_LAZY = {
    "hessspec.nn.models": (
        "CNN",
        "MLP",
        "LinearModel",
        "NoisyBatchNorm",
        "ResNet",
        "count_params",
        "make_model",
    ),
    "hessspec.nn.objective": (
        "Objective",
        "make_objective",
        "population_statistics",
        "with_params",
    ),
    "hessspec.nn.data": (
        "Dataset",
        "load_cifar10",
        "load_digits",
        "load_mnist",
        "load_train_test",
        "subsample",
        "synthetic_gaussian",
    ),
    "hessspec.studies.common.checkpoint": ("Checkpoint", "load_checkpoint"),
    "hessspec.studies.input_bias": ("InputBiasConfig", "run_input_bias_study"),
    "hessspec.studies.santurkar": ("SanturkarConfig", "run_santurkar_study"),
    "hessspec.studies.edge_of_stability": (
        "EdgeOfStabilityConfig",
        "run_edge_of_stability_study",
    ),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'hessspec' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))


__all__ = [
    "BlockSpectra",
    "BlockSpectrum",
    "EigenResult",
    "GDConvergence",
    "InputCorrelationPrediction",
    "InternalCovariateShift",
    "LandscapeMetrics",
    "LanczosConvergenceWarning",
    "LanczosResult",
    "LinearOperator",
    "MarchenkoPastur",
    "OutlierSplit",
    "SpectralDensity",
    "SpectralResolutionWarning",
    "TraceEstimate",
    "__version__",
    "as_operator",
    "block_spectra",
    "dataset_gradient",
    "default_layer_order",
    "density_js_distance",
    "distributed",
    "enable_compilation_cache",
    "gaussian_quadrature",
    "gd_steps_to_tolerance",
    "ggn_operator",
    "gradient_energy",
    "hessian_operator",
    "input_correlation_spectrum_prediction",
    "internal_covariate_shift",
    "lanczos_tridiag",
    "landscape_along_gradient",
    "layer_blocks",
    "lecun_outlier",
    "marchenko_pastur",
    "outlier_split",
    "slowest_time_constant",
    "spectral_density",
    "stable_learning_rate",
    "subspace_overlap",
    "top_eigenpairs",
    "trace",
]
