"""Small-initialisation dynamics (arXiv 2403.08121, 2502.15952): early alignment with a KKT point of the constrained
NCF, the escape-time law, the limiting path, plateaus and saddles, sparsity and rank-one structure."""

from ._early import EarlyPhase, NCFFlow, direction_residual, early_phase, escape_time, ncf_flow
from ._escape import EscapeLaw, escape_law, fit_line
from ._path import FirstSaddle, LimitingPath, first_saddle, limiting_path
from ._rank import (
    RankCensus,
    RankOnePoint,
    census_point,
    rank_one_census,
    rank_one_factors,
    split_back,
    width_one_network,
)
from ._saddles import (
    Plateau,
    analyse_plateaus,
    classify_point,
    hessian_extremes,
    polish_critical_point,
    relative_gradient_norm,
    segment_plateaus,
)
from ._sparsity import group_norm_track, neuron_of_group, remove_neurons, small_groups
from ._solve import Problem, Solve, integrate, make_problem, record_stats

__all__ = [
    "record_stats",
    "NCFFlow",
    "EarlyPhase",
    "ncf_flow",
    "early_phase",
    "escape_time",
    "direction_residual",
    "EscapeLaw",
    "escape_law",
    "fit_line",
    "LimitingPath",
    "limiting_path",
    "FirstSaddle",
    "first_saddle",
    "Plateau",
    "analyse_plateaus",
    "classify_point",
    "hessian_extremes",
    "polish_critical_point",
    "relative_gradient_norm",
    "segment_plateaus",
    "small_groups",
    "group_norm_track",
    "neuron_of_group",
    "remove_neurons",
    "RankCensus",
    "RankOnePoint",
    "census_point",
    "rank_one_factors",
    "split_back",
    "rank_one_census",
    "width_one_network",
    "Problem",
    "Solve",
    "make_problem",
    "integrate",
]
