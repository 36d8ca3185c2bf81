"""Bias-free positively homogeneous networks as equinox modules, each with an exact integer ``degree``."""

from ._base import (
    AbstractHomogeneousModel,
    flatten,
    num_params,
    param_norm,
    predict,
    rescale,
    safe_norm,
    unflatten_like,
    with_norm,
)
from ._cnn import CNN, DiagonalLinear
from ._twolayer import MLP, TwoLayer, mlp_degree

__all__ = [
    "AbstractHomogeneousModel",
    "TwoLayer",
    "MLP",
    "CNN",
    "DiagonalLinear",
    "predict",
    "flatten",
    "unflatten_like",
    "num_params",
    "param_norm",
    "rescale",
    "with_norm",
    "safe_norm",
    "mlp_degree",
]
