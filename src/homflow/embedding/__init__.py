"""The embedding principle (arXiv 2505.12419): neuron and channel splitting maps ``T`` between widths, merges, and
verification that ``T`` carries outputs, gradients, KKT points and whole trajectories (docs/math.md section 5). KKT
certificates come from :mod:`homflow.kkt`; the gradient flows of a narrow and a wide network are integrated as one ODE
(:func:`joint_flow`) so that ``eta(t) = T theta(t)`` is checked to rounding."""

from ._coeffs import DEFAULT_COEFF_TOL, check_coeffs, output_preserving_out_coeffs, split_properties
from ._joint import ERROR_NORMS, JointField, joint_flow
from ._split import AbstractSplit, ComposedSplit, NeuronSplit, compose, split, split_channel, split_every
from ._verify import (
    DEFAULT_TRAJECTORIES,
    NEGATIVE_CONTROLS,
    TRAJECTORY_METHODS,
    EmbeddingReport,
    trajectory_error,
    verify,
)

__all__ = [
    "AbstractSplit",
    "NeuronSplit",
    "ComposedSplit",
    "split",
    "split_channel",
    "split_every",
    "compose",
    "check_coeffs",
    "split_properties",
    "output_preserving_out_coeffs",
    "DEFAULT_COEFF_TOL",
    "verify",
    "EmbeddingReport",
    "trajectory_error",
    "TRAJECTORY_METHODS",
    "DEFAULT_TRAJECTORIES",
    "NEGATIVE_CONTROLS",
    "joint_flow",
    "JointField",
    "ERROR_NORMS",
]
