"""KKT points found and certified: the constrained NCF (early phase) and the max-margin problem (late phase).

docs/math.md sections 3 and 5; arXiv 2402.09226, 2403.08121 (NCF) and 1906.05890 (max margin).
"""

from ._ascent import sphere_ascent
from ._ncf import NCF, Unflatten, as_problem, make_ncf, ncf, ncf_grad, ncf_kkt_residual, tangent_gradient, unflattener
from ._late import MarginPath, margin_along
from ._clarke import DEFAULT_KINK_TOL, DEFAULT_MAX_PATTERNS, KinkStructure, clarke_supported, gated_output, kink_structure
from ._ncf_clarke import DEFAULT_NCF_CLARKE_RTOL, NCFClarke, ncf_clarke_residual
from ._margin import REASONS, MarginKKT, MarginProblem, make_margin_problem, margin_multipliers, max_margin_kkt
from ._polish import NCFPoint, default_residual_rtol, polish_ncf, polish_ncf_theta
from ._second_order import SecondOrder, classify, riemannian_hessian_eigenvalues, tangent_basis
from ._solve_ncf import NCFSolution, solve_ncf
from ._solve_margin import solve_max_margin
from ._structure import group_norms, singular_values, zero_preserving_groups

__all__ = [
    "NCF",
    "Unflatten",
    "unflattener",
    "make_ncf",
    "as_problem",
    "ncf",
    "ncf_grad",
    "ncf_kkt_residual",
    "tangent_gradient",
    "sphere_ascent",
    "NCFSolution",
    "solve_ncf",
    "NCFPoint",
    "polish_ncf",
    "polish_ncf_theta",
    "default_residual_rtol",
    "MarginPath",
    "margin_along",
    "MarginKKT",
    "MarginProblem",
    "make_margin_problem",
    "margin_multipliers",
    "max_margin_kkt",
    "solve_max_margin",
    "REASONS",
    "DEFAULT_KINK_TOL",
    "DEFAULT_MAX_PATTERNS",
    "KinkStructure",
    "clarke_supported",
    "gated_output",
    "kink_structure",
    "NCFClarke",
    "ncf_clarke_residual",
    "DEFAULT_NCF_CLARKE_RTOL",
    "SecondOrder",
    "classify",
    "riemannian_hessian_eigenvalues",
    "tangent_basis",
    "zero_preserving_groups",
    "group_norms",
    "singular_values",
]
