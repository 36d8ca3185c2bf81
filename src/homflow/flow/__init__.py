"""Gradient flow as an ODE through one integrate path (:func:`integrate`): one problem object (:class:`Problem`), solver
objects (:class:`Auto`, the stiff-aware default; :class:`RKC`; :class:`DOPRI5`; :class:`Diffrax`), one result type
(:class:`Trajectory` with a :class:`RESULTS` code, ``stats`` and ``reason``; :class:`SolverError`), events, and discrete
methods for comparison."""

from ._discrete import adam, gradient_descent, sgd, sgd_batches
from ._events import FlowEvent, LossBelow, NormAbove, NormBelow
from ._objective import Objective, make_objective
from ._problem import Problem, make_problem, tangent_gradient
from ._batched import BatchSolution, ode_batch
from ._engine import EngineOptions
from ._integrate import LossField, NCFField, check_times, integrate, log_times
from ._ode import gradient_flow, gradient_flow_batch, largest_hessian_eigenvalue, select_solver
from ._results import RESULTS, SolverError
from ._solution import FlowResult, Trajectory
from ._solvers import DOPRI5, RKC, SOLVERS, AbstractFlowSolver, Auto, Diffrax, FlowOutput, as_solver, default_atol
from ._clarke import clarke_min_norm
from ._nonsmooth import Clarke, ClarkeFlow, nonsmooth_flow
from ._nonsmooth_joint import joint_nonsmooth_flow

__all__ = [
    "integrate",
    "AbstractFlowSolver",
    "Auto",
    "RKC",
    "DOPRI5",
    "Diffrax",
    "Clarke",
    "ClarkeFlow",
    "nonsmooth_flow",
    "joint_nonsmooth_flow",
    "clarke_min_norm",
    "as_solver",
    "default_atol",
    "FlowOutput",
    "LossField",
    "NCFField",
    "RESULTS",
    "SolverError",
    "check_times",
    "gradient_flow",
    "select_solver",
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
