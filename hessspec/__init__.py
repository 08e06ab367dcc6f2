"""hessspec: matrix-free Hessian eigenspectra of neural networks in JAX."""

from hessspec import (
    _startup,  # noqa: F401 - first: Ctrl-C while `python -m hessspec.run` loads
    distributed,
)
from hessspec.analysis import (
    OutlierSplit,
    density_js_distance,
    gradient_energy,
    outlier_split,
    subspace_overlap,
)
from hessspec.blocks import BlockSpectra, BlockSpectrum, block_spectra, layer_blocks
from hessspec.checkpoint import Checkpoint, load_checkpoint
from hessspec.compilation_cache import enable_compilation_cache
from hessspec.data import (
    Dataset,
    load_cifar10,
    load_digits,
    load_mnist,
    load_train_test,
    subsample,
    synthetic_gaussian,
)
from hessspec.density import (
    SpectralDensity,
    SpectralResolutionWarning,
    gaussian_quadrature,
    spectral_density,
)
from hessspec.input_bias import InputBiasConfig, run_input_bias_study
from hessspec.lanczos import (
    EigenResult,
    LanczosConvergenceWarning,
    LanczosResult,
    lanczos_tridiag,
    top_eigenpairs,
)
from hessspec.landscape import (
    InternalCovariateShift,
    LandscapeMetrics,
    default_layer_order,
    internal_covariate_shift,
    landscape_along_gradient,
)
from hessspec.linop import LinearOperator, as_operator
from hessspec.models import (
    CNN,
    MLP,
    LinearModel,
    NoisyBatchNorm,
    ResNet,
    count_params,
    make_model,
)
from hessspec.objective import Objective, make_objective, population_statistics, with_params
from hessspec.operators import dataset_gradient, ggn_operator, hessian_operator
from hessspec.santurkar import SanturkarConfig, run_santurkar_study
from hessspec.theory import (
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
from hessspec.trace import TraceEstimate, trace

__version__ = "0.1.0"

__all__ = [
    "CNN",
    "Checkpoint",
    "MLP",
    "Dataset",
    "LinearModel",
    "NoisyBatchNorm",
    "Objective",
    "ResNet",
    "count_params",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "load_train_test",
    "make_model",
    "make_objective",
    "population_statistics",
    "subsample",
    "synthetic_gaussian",
    "with_params",
    "GDConvergence",
    "InputCorrelationPrediction",
    "InternalCovariateShift",
    "LandscapeMetrics",
    "MarchenkoPastur",
    "default_layer_order",
    "gd_steps_to_tolerance",
    "input_correlation_spectrum_prediction",
    "internal_covariate_shift",
    "landscape_along_gradient",
    "lecun_outlier",
    "marchenko_pastur",
    "slowest_time_constant",
    "stable_learning_rate",
    "EigenResult",
    "LanczosConvergenceWarning",
    "LanczosResult",
    "OutlierSplit",
    "BlockSpectra",
    "BlockSpectrum",
    "block_spectra",
    "density_js_distance",
    "layer_blocks",
    "subspace_overlap",
    "SpectralDensity",
    "SpectralResolutionWarning",
    "TraceEstimate",
    "gaussian_quadrature",
    "gradient_energy",
    "lanczos_tridiag",
    "outlier_split",
    "spectral_density",
    "top_eigenpairs",
    "trace",
    "LinearOperator",
    "as_operator",
    "load_checkpoint",
    "dataset_gradient",
    "enable_compilation_cache",
    "distributed",
    "ggn_operator",
    "hessian_operator",
    "InputBiasConfig",
    "SanturkarConfig",
    "run_input_bias_study",
    "run_santurkar_study",
    "__version__",
]
