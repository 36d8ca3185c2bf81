"""The embedding principle (arXiv 2505.12419): neuron and channel splitting maps ``T`` between widths, merges, and
verification that ``T`` carries outputs, gradients, KKT points and whole trajectories (MATH.md section 5)."""

from ._coeffs import DEFAULT_COEFF_TOL, check_coeffs, output_preserving_out_coeffs, split_properties
from ._kkt import MarginKKT, margin_kkt_residuals, ncf_ascent, ncf_residual, nnls_multipliers, polish_max_margin
from ._split import AbstractSplit, ComposedSplit, NeuronSplit, compose, split, split_channel, split_every
from ._verify import NEGATIVE_CONTROLS, TRAJECTORY_METHODS, EmbeddingReport, trajectory_error, verify

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
    "NEGATIVE_CONTROLS",
    "MarginKKT",
    "margin_kkt_residuals",
    "nnls_multipliers",
    "polish_max_margin",
    "ncf_residual",
    "ncf_ascent",
]
