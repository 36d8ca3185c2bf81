"""Small-initialisation dynamics (arXiv 2403.08121, 2502.15952): early alignment with a KKT point of the constrained
NCF, the escape-time law, the limiting path, plateaus and saddles, sparsity and rank-one structure."""

from ._early import EarlyPhase, NCFFlow, direction_residual, early_phase, escape_time, ncf_flow
from ._escape import EscapeLaw, escape_law, fit_line
from ._solve import Problem, Solve, integrate, make_problem

__all__ = [
    "NCFFlow",
    "EarlyPhase",
    "ncf_flow",
    "early_phase",
    "escape_time",
    "direction_residual",
    "EscapeLaw",
    "escape_law",
    "fit_line",
    "Problem",
    "Solve",
    "make_problem",
    "integrate",
]
