"""Narrow and wide gradient flows integrated as ONE ODE, so that ``eta(t) = T theta(t)`` holds to rounding.

Solved separately, the narrow flow ``theta' = -grad L(theta)`` and the wide flow ``eta' = -grad L~(eta)`` choose their
own adaptive steps, and ``||eta(t) - T theta(t)||`` is the global integration error of the two solves (about
``1e5 rtol``), not a property of ``T``. Here the concatenated state ``(theta, eta)`` is one ODE with one step-size
controller: both halves take every step together. Each Runge-Kutta stage is a linear combination of vector-field
values, and ``T`` commutes with the vector field (``grad L~(T theta) = T grad L(theta)``, arXiv 2505.12419), so if
``eta_k = T theta_k`` then every stage of the wide half is ``T`` of the narrow stage and ``eta_{k+1} = T theta_{k+1}``
up to the rounding of the arithmetic. The measured ``max_t ||eta(t) - T theta(t)||`` is therefore a test of the
embedding principle for the flow at rounding level, like GD with identical steps.

Error norm of the step-size controller (``error_norm``):

* ``'narrow'`` (default): RMS of the scaled local error of the narrow half only. The narrow half then takes exactly the
  steps a diffrax solve of the narrow flow alone would take (same solver, tolerances and first step), and the wide
  half is carried along; the wide error estimate is ``T`` of the narrow one anyway.
* ``'full'``: RMS over the whole state ``(theta, eta)``.

The solver is chosen by the one rule of :func:`homflow.flow.gradient_flow` (:func:`homflow.flow.select_solver`): for
ReLU / leaky-ReLU networks the flow is a differential inclusion and the pair is integrated as one hybrid system by
:func:`homflow.flow.joint_nonsmooth_flow` (every step, located event and sliding mode shared, the controller on the
narrow half); else, or when a smooth solver is named, as one ODE through :func:`homflow.flow.integrate`.
"""

from __future__ import annotations

import dataclasses

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..flow import (Diffrax, Problem, SolverError, Trajectory, check_times, default_atol, integrate,
                    joint_nonsmooth_flow, make_problem, select_solver)
from ..losses import get_loss
from ._split import AbstractSplit

__all__ = ["joint_flow", "JointField", "ERROR_NORMS"]

ERROR_NORMS = ("narrow", "full")


class JointField(eqx.Module):
    """The joint vector field ``(theta, eta) -> (-grad L(theta), -grad L~(eta))`` on the concatenated state; with
    ``error_size = P`` (the narrow size) the solver's error control, first step and stiffness estimate look at the
    narrow half only."""

    problem: Problem
    wide: Problem
    size: int = eqx.field(static=True)
    error_size: int | None = eqx.field(static=True, default=None)
    log_time: bool = eqx.field(static=True, default=False)

    def __call__(self, t, y):
        return jnp.concatenate([self.problem.velocity(y[: self.size]), self.wide.velocity(y[self.size:])])

    def value(self, y):
        return self.problem.log_loss(y[: self.size])


@eqx.filter_jit
def _log_losses(wide: Problem, etas):
    return jax.vmap(wide.log_loss)(etas)


def joint_flow(
    split: AbstractSplit,
    narrow,
    data,
    *,
    loss="exponential",
    t1: float,
    ts=None,
    n_save: int = 50,
    rtol: float | None = 1e-10,
    atol: float | None = None,
    solver=None,
    error_norm: str = "narrow",
    max_steps: int = 1_000_000,
    throw: bool = True,
) -> tuple[Trajectory, Trajectory]:
    """Gradient flows of ``narrow`` (``theta``) and of ``split(narrow)`` (``eta``) integrated as one ODE in
    ``(theta, eta)`` that shares every adaptive step (module docstring; arXiv 2505.12419, docs/math.md §5), through
    :func:`homflow.flow.integrate`.

    Arguments:
        split: the embedding ``T``; narrow: a network of its narrow architecture (``theta(0)``;
            ``eta(0) = T theta(0)``).
        data: a ``Dataset``; loss: the training loss (summed over samples).
        t1: final time; ts: save times in ``[0, t1]`` (default :func:`homflow.flow.log_times` ``(t1, n_save)``).
        rtol: relative tolerance (default 1e-10); atol: absolute tolerance (default
            :func:`homflow.flow.default_atol` of ``theta(0)``, as in :func:`homflow.flow.gradient_flow`).
        solver: a solver name or object; default ``None``: :func:`homflow.flow.select_solver`'s choice, the
            non-smooth :class:`homflow.flow.Clarke` for ReLU / leaky-ReLU networks (through
            :func:`homflow.flow.joint_nonsmooth_flow`, narrow error norm only), else ``'auto'``, homflow's stiff-aware
            engine. Every method whose step is a linear combination of vector-field values keeps ``eta = T theta`` to
            rounding; with the narrow error norm the narrow half takes the steps of the narrow flow solved alone by
            the same solver.
        error_norm: ``'narrow'`` (default: the controller looks at the narrow half only) or ``'full'`` (RMS over
            ``(theta, eta)``).
        max_steps: the solve gives up after this many steps. throw: raise :class:`homflow.flow.SolverError` on failure.

    Returns:
        ``(narrow_trajectory, wide_trajectory)``, two :class:`homflow.flow.Trajectory` saved at the same times (compare
        them with :func:`trajectory_error`); ``stats`` (shared) holds the step counts.

    Raises:
        ValueError: on an unknown solver or error norm, bad times or tolerances, or a network that does not fit;
            ``error_norm='full'`` with the non-smooth solver (its controller looks at the narrow half).
    """
    if error_norm not in ERROR_NORMS:
        raise ValueError(f"`error_norm` must be one of {ERROR_NORMS}; got {error_norm!r}.")
    t1, ts = check_times(t1, ts, n_save)
    loss = get_loss(loss)
    prob_n, theta0 = make_problem(narrow, data, loss)
    solver = select_solver(prob_n, theta0, solver, rtol=rtol, atol=atol)
    if solver.name == "clarke":
        if error_norm != "narrow":
            raise ValueError(f"`error_norm` = {error_norm!r} is not available with the non-smooth solver 'clarke' (the "
                             "default for ReLU / leaky-ReLU networks: its controller looks at the narrow half); use "
                             "error_norm='narrow', or name a smooth solver (solver='auto').")
        return _joint_clarke(split, narrow, data, loss, solver, theta0, t1, ts, max_steps, throw)
    if isinstance(solver, Diffrax) and isinstance(solver.solver, diffrax.AbstractImplicitSolver):
        raise ValueError(f"`solver` must be explicit (a Newton iteration mixes the halves: eta = T theta would hold "
                         f"only to the root finder's tolerance); got {type(solver.solver).__name__}.")
    prob_w, _ = make_problem(split.wide, data, loss)
    eta0 = split.apply_flat(theta0)
    P = int(theta0.size)
    if solver.atol is None:
        solver = solver.with_tolerances(atol=float(default_atol(solver.rtol, np.asarray(theta0))[0]))
    field = JointField(prob_n, prob_w, P, P if error_norm == "narrow" else None)
    y0 = jnp.concatenate([theta0, jnp.asarray(eta0, theta0.dtype)])
    tr = integrate(prob_n, solver, y0, t1=t1, ts=ts, field=field, max_steps=max_steps, throw=throw)
    st = {**tr.stats, "error_norm": error_norm}
    out = []
    for part, prob in ((tr.thetas[:, :P], prob_n), (tr.thetas[:, P:], prob_w)):
        log_l = np.asarray(_log_losses(prob, jnp.asarray(part)))
        out.append(Trajectory(ts=tr.ts, thetas=part, loss=np.exp(log_l), log_loss=log_l,
                              norm=np.linalg.norm(part, axis=1), stats=st, result=tr.result, unflatten=prob.unflatten,
                              degree=prob.degree, reason=tr.reason, event=tr.event))
    return out[0], out[1]


def _joint_clarke(split, narrow, data, loss, solver, theta0, t1, ts, max_steps, throw):
    """The non-smooth pair through :func:`homflow.flow.joint_nonsmooth_flow` in linear time, with the solver's
    tolerances (``atol`` default :func:`homflow.flow.default_atol` of ``theta(0)``, as the smooth path) and
    ``max_steps``; a failure raises :class:`homflow.flow.SolverError` when ``throw``."""
    atol = solver.atol if solver.atol is not None else float(default_atol(solver.rtol, np.asarray(theta0))[0])
    opts = dataclasses.replace(solver.options, rtol=solver.rtol, atol=atol, max_steps=int(max_steps))
    a, b = joint_nonsmooth_flow(split, narrow, data, loss=loss, t1=t1, ts=ts, time="linear", solver=opts)
    for tr in (a, b):
        tr.stats["error_norm"] = "narrow"
    if throw and not a.success:
        raise SolverError(a.reason, a.result, a)
    return a, b
