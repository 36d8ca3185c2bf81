"""Transition names: :class:`Objective` and :func:`make_objective` are :class:`homflow.flow.Problem` and
:func:`homflow.flow.make_problem` (the one problem object); new code uses those."""

from ._problem import Problem as Objective
from ._problem import make_problem as make_objective

__all__ = ["Objective", "make_objective"]
