"""Gradient flow as an ODE (diffrax, adaptive, float64), events, and discrete methods for comparison."""

from ._discrete import adam, gradient_descent, sgd, sgd_batches
from ._events import FlowEvent, LossBelow, NormAbove, NormBelow
from ._objective import Objective, make_objective
from ._problem import Problem, make_problem, tangent_gradient
from ._batched import BatchSolution, EngineOptions, ode_batch
from ._ode import SOLVERS, gradient_flow, gradient_flow_batch, largest_hessian_eigenvalue, log_times
from ._solution import FlowResult, Trajectory

__all__ = [
    "gradient_flow",
    "gradient_flow_batch",
    "ode_batch",
    "BatchSolution",
    "EngineOptions",
    "gradient_descent",
    "sgd",
    "sgd_batches",
    "adam",
    "log_times",
    "SOLVERS",
    "largest_hessian_eigenvalue",
    "Problem",
    "make_problem",
    "tangent_gradient",
    "Objective",
    "make_objective",
    "Trajectory",
    "FlowResult",
    "FlowEvent",
    "LossBelow",
    "NormAbove",
    "NormBelow",
]
