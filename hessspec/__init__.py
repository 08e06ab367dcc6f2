"""hessspec: matrix-free Hessian eigenspectra of neural networks in JAX."""

from hessspec.linop import LinearOperator, as_operator
from hessspec.operators import dataset_gradient, ggn_operator, hessian_operator

__version__ = "0.1.0"

__all__ = [
    "LinearOperator",
    "as_operator",
    "dataset_gradient",
    "ggn_operator",
    "hessian_operator",
    "__version__",
]
