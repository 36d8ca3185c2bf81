"""A compiled-once flow solver for the phase measurements: the stopping level, the final time and the tolerances are
traced, so a sweep over initial scales ``delta`` compiles once per architecture instead of once per ``delta``.

Two vector fields are integrated: the loss gradient flow ``d theta/dt = -grad L(theta)`` (MATH.md section 2) and the
NCF flow ``du/ds = grad N(u)`` with ``N(u) = sum_i ytilde_i Phi(u; x_i)`` (MATH.md section 3, arXiv 2403.08121).
Both stop at the first time the norm reaches ``level`` (a terminating event located by root finding).
"""

from __future__ import annotations

import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from jax.flatten_util import ravel_pytree

from ..flow import Objective, make_objective
from ..losses import Loss
from ..models import AbstractHomogeneousModel, safe_norm

__all__ = ["Problem", "make_problem", "ncf_value", "ncf_gradient", "integrate"]


class Problem(eqx.Module):
    """Model architecture (a template network), data and loss as one pytree whose only static parts are the
    architecture and the loss, so compiled functions of it are reused across calls (an :class:`Objective` holds a
    fresh ``unflatten`` closure per call, which would make ``jit`` recompile every time)."""

    X: jax.Array
    y: jax.Array
    template: AbstractHomogeneousModel
    loss: Loss

    def unflatten(self, theta):
        params, static = eqx.partition(self.template, eqx.is_inexact_array)
        return eqx.combine(ravel_pytree(params)[1](theta), static)

    @property
    def objective(self) -> Objective:
        """The :class:`Objective` (its ``unflatten`` closes over shapes and static fields only, no arrays)."""
        params, static = eqx.partition(self.template, eqx.is_inexact_array)
        unravel = ravel_pytree(params)[1]
        return Objective(self.X, self.y, self.loss, lambda th: eqx.combine(unravel(th), static), self.template.degree)

    @property
    def degree(self) -> int:
        return self.template.degree


def make_problem(model: AbstractHomogeneousModel, data, loss="square"):
    """Validate ``model``, ``data`` and ``loss`` (as :func:`homflow.flow.make_objective`) and return the
    :class:`Problem` and ``model``'s flat parameter vector."""
    objective, theta = make_objective(model, data, loss)
    return Problem(objective.X, objective.y, model, objective.loss), theta


def ncf_value(objective: Objective, u):
    """``N(u) = sum_i ytilde_i Phi(u; x_i)`` with ``ytilde = loss.ncf_labels(y)`` (MATH.md section 3)."""
    return jnp.dot(objective.loss.ncf_labels(objective.y), objective.outputs(u))


def ncf_gradient(objective: Objective, u):
    """``grad N(u)``."""
    return jax.grad(lambda v: ncf_value(objective, v))(u)


@eqx.filter_jit
def _integrate(problem, is_ncf, theta0, ts, t1, level, rtol, atol, max_steps: int, pcoeff, icoeff):
    # One compiled solve serves both vector fields (a traced switch) and every save grid of the same padded length.
    objective = problem.objective

    def vf(t, th, args):
        return jax.lax.cond(is_ncf, lambda v: ncf_gradient(objective, v), lambda v: objective.velocity(v), th)

    def diag(t, th, args):
        value = jax.lax.cond(is_ncf, lambda v: ncf_value(objective, v), lambda v: objective.log_loss(v), th)
        return {"theta": th, "value": value, "norm": safe_norm(th)}

    # Scale-free condition log(||theta|| / level): Bisection stops when both the time bracket and |condition| are
    # small, and |norm - level| cannot reach an absolute 1e-10 when the level is 1e4.
    tiny = jnp.finfo(theta0.dtype).tiny
    event = diffrax.Event(lambda t, y, args, **kw: jnp.log(jnp.maximum(safe_norm(y), tiny) / level),
                          root_finder=optx.Bisection(rtol=1e-14, atol=_EVENT_ATOL))
    controller = diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=pcoeff, icoeff=icoeff)
    saveat = diffrax.SaveAt(subs=[diffrax.SubSaveAt(ts=ts, fn=diag), diffrax.SubSaveAt(t1=True, fn=diag)])
    sol = diffrax.diffeqsolve(diffrax.ODETerm(vf), diffrax.Tsit5(), t0=ts[0], t1=t1, dt0=None, y0=theta0,
                              saveat=saveat, stepsize_controller=controller, event=event, max_steps=max_steps,
                              throw=False)
    return sol.ys, sol.ts[1][-1], sol.stats["num_steps"], sol.result._value


# Relative precision of the located event norm (|log(||theta|| / level)| below this at the stop).
_EVENT_ATOL = 1e-8


def _bucket(n: int) -> int:
    """Padded length of a save grid (few distinct lengths, so few compilations)."""
    return max(64, 1 << (int(n) - 1).bit_length())


class Solve(eqx.Module):
    """Result of :func:`integrate`: saved states (``ts``, ``thetas``, ``values`` = log loss or NCF value, ``norms``),
    the end time ``t_end`` and state ``theta_end``, whether the norm ``level`` was reached (``reached``), the number of
    steps and diffrax's result code ``code`` (0 = success)."""

    ts: np.ndarray
    thetas: np.ndarray
    values: np.ndarray
    norms: np.ndarray
    t_end: float
    theta_end: np.ndarray
    reached: bool
    num_steps: int
    code: int


def integrate(problem: Problem, theta0, *, field: str = "loss", t1: float, level: float, ts=None,
              rtol: float = 1e-9, atol: float | None = None, max_steps: int = 200_000) -> Solve:
    """Integrate the loss flow (``field='loss'``) or the NCF flow (``field='ncf'``) from ``theta0`` until
    ``||theta|| = level`` or ``t1``.

    Arguments:
        problem: from :func:`make_problem`.
        theta0: flat initial vector.
        t1: final time; level: stopping norm (> 0).
        ts: save times in ``[0, t1]`` (default: 0 only); states after the stop are dropped.
        rtol: relative tolerance; atol: absolute tolerance, default ``rtol * ||theta0||`` (it must follow the weight
            scale for a tiny initialisation).
        max_steps: the solver's step budget (static: changing it recompiles).

    Returns:
        A :class:`Solve`.

    Raises:
        ValueError: for a non-positive ``t1``, ``level`` or tolerance, or an unknown ``field``.
    """
    if field not in ("loss", "ncf"):
        raise ValueError(f"`field` must be 'loss' or 'ncf'; got {field!r}.")
    for name, v in (("t1", t1), ("level", level), ("rtol", rtol)):
        if not (float(v) > 0 and math.isfinite(float(v))):
            raise ValueError(f"`{name}` must be a finite number > 0; got {v!r}.")
    theta0 = jnp.asarray(theta0, dtype=problem.X.dtype)
    nrm = float(jnp.linalg.norm(theta0))
    if atol is None:
        atol = rtol * max(nrm, 1e-300)
    ts_np = np.zeros(1) if ts is None else np.asarray(ts, dtype=float)
    if ts_np.ndim != 1 or ts_np[0] < 0 or np.any(np.diff(ts_np) <= 0) or ts_np[-1] > t1:
        raise ValueError("`ts` must be increasing times in [0, t1].")
    dt = theta0.dtype
    n_real = ts_np.size
    padded = np.concatenate([ts_np, np.full(_bucket(n_real) - n_real, ts_np[-1])])
    ys, t_end, steps, code = _integrate(problem, jnp.asarray(field == "ncf"), theta0, jnp.asarray(padded, dt),
                                        jnp.asarray(t1, dt),
                                        jnp.asarray(level, dt), jnp.asarray(rtol, dt), jnp.asarray(atol, dt),
                                        int(max_steps), jnp.asarray(0.4, dt), jnp.asarray(0.3, dt))
    sub, end = ys
    sub = {k: np.asarray(v)[:n_real] for k, v in sub.items()}
    t_end = float(t_end)
    keep = (ts_np <= t_end * (1 + 1e-12)) & np.all(np.isfinite(np.asarray(sub["theta"])), axis=1)
    theta_end = np.asarray(end["theta"])[-1]
    # The event fired, or the root finder missed its tolerance but the state did stop at the level.
    end_norm = float(np.asarray(end["norm"])[-1])
    reached = int(code) == diffrax.RESULTS.event_occurred._value or (
        int(code) != diffrax.RESULTS.max_steps_reached._value and abs(math.log(max(end_norm, 1e-300) / level)) < 1e-6)
    return Solve(ts_np[keep], np.asarray(sub["theta"])[keep], np.asarray(sub["value"])[keep],
                 np.asarray(sub["norm"])[keep], t_end, theta_end, bool(reached), int(steps), int(code))
