"""The embedding principle (arXiv 2505.12419): neuron and channel splitting maps ``T`` between widths, merges, and
verification that ``T`` carries outputs, gradients, KKT points and whole trajectories (MATH.md section 5)."""

from ._coeffs import DEFAULT_COEFF_TOL, check_coeffs, output_preserving_out_coeffs, split_properties
from ._split import AbstractSplit, ComposedSplit, NeuronSplit, compose, split, split_channel

__all__ = [
    "AbstractSplit",
    "NeuronSplit",
    "ComposedSplit",
    "split",
    "split_channel",
    "compose",
    "check_coeffs",
    "split_properties",
    "output_preserving_out_coeffs",
    "DEFAULT_COEFF_TOL",
]
