"""The early phase of gradient flow from a tiny initialisation ``theta(0) = delta * theta_hat`` (arXiv 2403.08121).

While ``||theta|| = O(delta)`` the flow follows the rescaled NCF flow, ``theta(t) ~ delta * u(delta^(L-2) t)`` with
``du/ds = grad N(u)``, ``u(0) = theta_hat`` (docs/math.md §3). For ``L > 2`` the NCF flow blows up at a finite ``s*``
with its direction converging to a positive KKT point ``u*`` of the constrained NCF, so the weights escape after a time
of order ``s* / delta^(L-2)``; for ``L = 2`` it grows exponentially and the escape takes ``O(log(1/delta))``.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..models import AbstractHomogeneousModel
from ._solve import Problem, _bucket, integrate, make_problem

__all__ = ["NCFFlow", "EarlyPhase", "ncf_flow", "early_phase", "escape_time", "direction_residual"]


@eqx.filter_jit
def _residuals(problem: Problem, us):
    return jax.vmap(lambda v: _residual(problem, v))(us)


def _residual(objective, u):
    uh = u / jnp.linalg.norm(u)
    g = objective.ncf_grad(uh)
    tang = g - jnp.dot(uh, g) * uh
    return jnp.linalg.norm(tang) / jnp.maximum(jnp.linalg.norm(g), jnp.finfo(u.dtype).tiny)


@eqx.filter_jit
def _ncf_values_jit(problem: Problem, us):
    return jax.vmap(lambda v: problem.ncf(v))(us)


def _padded(fn, problem, us):
    """``fn(problem, us)`` on rows padded to a bucketed count (one compilation for many batch sizes)."""
    us = np.atleast_2d(np.asarray(us, dtype=float))
    n = us.shape[0]
    pad = np.concatenate([us, np.repeat(us[-1:], _bucket(n) - n, axis=0)])
    return np.asarray(fn(problem, jnp.asarray(pad, dtype=problem.X.dtype)))[:n]


def _ncf_values(problem, us):
    return _padded(_ncf_values_jit, problem, us)


def direction_residual(problem: Problem, u):
    """Relative KKT residual of a direction for the constrained NCF: ``||g - <u_hat, g> u_hat|| / ||g||`` with
    ``g = grad N(u_hat)``, ``u_hat = u / ||u||`` (the tangential gradient, docs/math.md §3; 0 at a KKT point, 1 when
    the gradient is orthogonal to ``u``). ``u`` is one vector (returns a float) or a batch (P,)-rows (an array).
    ``problem`` comes from :func:`make_problem`."""
    u = np.asarray(u, dtype=float)
    out = _padded(_residuals, problem, u)
    return float(out[0]) if u.ndim == 1 else out


class NCFFlow(eqx.Module):
    """The NCF flow ``du/ds = grad N(u)`` from a unit vector, integrated until ``||u|| = level`` or ``s1``.

    Attributes:
        ss, norms, directions, ncf_values: saved times, ``||u||``, ``u / ||u||`` and ``N(u / ||u||)``.
        s_level: the time at which ``||u|| = level`` (``nan`` if not reached by ``s1``).
        s_star: the blow-up time for ``L > 2``, ``s_level + level^-(L-2) / ((L-2) L N(u_hat))`` (from
            ``d||u||/ds ~ L N(u_hat) ||u||^(L-1)`` near the blow-up); ``inf`` for ``L = 2`` or without escape.
        direction: the last direction (a prediction of the KKT point ``u*``), residual: its
            :func:`direction_residual`; escaped: whether the level was reached; degree: ``L``.
    """

    ss: np.ndarray
    norms: np.ndarray
    directions: np.ndarray
    ncf_values: np.ndarray
    s_level: float
    s_star: float
    level: float
    direction: np.ndarray
    residual: float
    escaped: bool
    degree: int


def _unit(theta):
    nrm = float(jnp.linalg.norm(theta))
    if not (nrm > 0 and math.isfinite(nrm)):
        raise ValueError(f"the initial parameters must be finite and not all zero; got norm {nrm!r}.")
    return theta / nrm, nrm


def ncf_flow(model: AbstractHomogeneousModel, data, *, loss="square", level: float = 1e4, s1: float = 1e4,
             n_save: int = 100, rtol: float = 1e-10) -> NCFFlow:
    """Integrate the NCF flow ``du/ds = grad N(u)`` from the direction of ``model``'s parameters.

    Arguments:
        model: its parameter direction ``theta_hat`` is ``u(0)`` (the norm is ignored).
        data, loss: define ``N(u) = sum_i ytilde_i Phi(u; x_i)``.
        level: stop when ``||u|| = level`` (default 1e4: the direction has converged to ``u*`` up to ``O(1/level)``).
        s1: give up at this time (the flow may shrink to 0 instead of escaping).
        n_save: saved points (linear in ``s`` up to the estimated escape); rtol: solver tolerance.

    Returns:
        An :class:`NCFFlow`.
    """
    problem, theta = make_problem(model, data, loss)
    u0, _ = _unit(theta)
    L = problem.degree
    first = integrate(problem, u0, field="ncf", t1=s1, level=level, rtol=rtol)
    s_end = first.t_end
    ss = np.linspace(0.0, s_end, int(n_save))
    sol = integrate(problem, u0, field="ncf", t1=s_end * (1 + 1e-9) if first.reached else s1, level=level,
                    ts=ss, rtol=rtol)
    norms = sol.norms
    dirs = sol.thetas / np.maximum(norms, 1e-300)[:, None]
    end_dir = np.asarray(sol.theta_end) / max(float(np.linalg.norm(sol.theta_end)), 1e-300)
    n_hat = float(_ncf_values(problem, end_dir)[0])
    reached = bool(first.reached)
    s_level = float(first.t_end) if reached else float("nan")
    if reached and L > 2 and n_hat > 0:
        s_star = s_level + level ** (-(L - 2)) / ((L - 2) * L * n_hat)
    else:
        s_star = float("inf")
    ncf_vals = _ncf_values(problem, dirs)
    res = direction_residual(problem, end_dir)
    return NCFFlow(sol.ts, norms, dirs, ncf_vals, s_level, s_star, float(level), end_dir, res, reached, L)


def escape_time(model: AbstractHomogeneousModel, data, *, loss="square", factor: float | None = 1e4,
                level: float | None = None, t1: float | None = None, rtol: float = 1e-9,
                max_steps: int = 200_000) -> float:
    """First time the gradient-flow norm reaches ``factor * delta`` (``delta = ||theta(0)||``) or the absolute ``level``.

    Arguments:
        factor: relative escape level (used when ``level`` is None).
        level: absolute escape level (overrides ``factor``; the ``L = 2`` log law needs an absolute level).
        t1: give up at this time (default ``1e4 / delta^(L-2)``, or 1e4 for ``L <= 2``).

    Returns:
        The escape time, or ``inf`` if the level was not reached by ``t1``.

    Raises:
        ValueError: if neither ``factor`` nor ``level`` is a number > 1 (relative) / > delta (absolute).
    """
    problem, theta = make_problem(model, data, loss)
    _, delta = _unit(theta)
    lev = _escape_level(delta, factor, level)
    L = problem.degree
    t1 = (1e4 / delta ** max(L - 2, 0)) if t1 is None else float(t1)
    sol = integrate(problem, theta, field="loss", t1=t1, level=lev, rtol=rtol, max_steps=max_steps)
    return float(sol.t_end) if sol.reached else float("inf")


def _escape_level(delta, factor, level):
    if level is not None:
        lev = float(level)
        if not (lev > delta and math.isfinite(lev)):
            raise ValueError(f"`level` must be a finite norm above delta = {delta:.3g}; got {level!r}.")
        return lev
    if factor is None or not (float(factor) > 1 and math.isfinite(float(factor))):
        raise ValueError(f"`factor` must be a finite number > 1 (the escape level is factor * delta); got {factor!r}.")
    return float(factor) * delta


class EarlyPhase(eqx.Module):
    """Measurements along the real flow from ``delta * theta_hat`` during the early phase.

    Attributes:
        delta: ``||theta(0)||``; degree: ``L``; factor: the escape level over ``delta``.
        ts: saved times up to the escape; norm_ratio: ``||theta(t)|| / delta``; cos_u_star: ``cos(theta(t), u*)``;
        residual: :func:`direction_residual` of ``theta(t)``; ncf_norm_ratio: ``||u(delta^(L-2) t)||`` of the NCF flow
        at the same rescaled times (the prediction of ``norm_ratio``).
        t_escape: first time ``||theta|| = factor * delta`` (``inf`` if never); t_escape_predicted: ``s_level /
        delta^(L-2)`` from the NCF flow to the same level; rescaled_escape: ``t_escape * delta^(L-2)``.
        theta_escape: the state at the escape; cos_escape, residual_escape: alignment and residual there.
        u_star: the KKT direction compared with.
    """

    delta: float
    degree: int
    factor: float
    ts: np.ndarray
    norm_ratio: np.ndarray
    cos_u_star: np.ndarray
    residual: np.ndarray
    ncf_norm_ratio: np.ndarray
    t_escape: float
    t_escape_predicted: float
    rescaled_escape: float
    theta_escape: np.ndarray
    cos_escape: float
    residual_escape: float
    u_star: np.ndarray


def early_phase(model: AbstractHomogeneousModel, data, *, loss="square", u_star=None, factor: float = 1e4,
                n_save: int = 100, rtol: float = 1e-9, ncf: NCFFlow | None = None,
                max_steps: int = 200_000) -> EarlyPhase:
    """Measure the early phase of the real flow from ``model`` (``theta(0) = delta * theta_hat``).

    Arguments:
        model: the initial network (its norm is ``delta``).
        u_star: the KKT direction to compare with (flat vector, normalised here); default the direction reached by the
            NCF flow (:func:`ncf_flow` at level 1e4).
        factor: the escape is the first time ``||theta|| = factor * delta`` (default 1e4).
        n_save: saved points (linear in time up to the escape); rtol: solver tolerance (atol = rtol * delta).
        ncf: a precomputed :func:`ncf_flow` of the same direction (to reuse it across deltas).

    Returns:
        An :class:`EarlyPhase`.
    """
    problem, theta = make_problem(model, data, loss)
    th_hat, delta = _unit(theta)
    L = problem.degree
    if not (float(factor) > 1):
        raise ValueError(f"`factor` must be > 1; got {factor!r}.")
    nf = ncf if ncf is not None else ncf_flow(model, data, loss=loss, level=max(1e4, float(factor)))
    if u_star is None:
        u_star = nf.direction
    u_star = np.asarray(u_star, dtype=float)
    if u_star.shape != theta.shape:
        raise ValueError(f"`u_star` must have shape {theta.shape}; got {u_star.shape}.")
    u_star = u_star / np.linalg.norm(u_star)
    scale = delta ** (L - 2)
    # The NCF flow's time to reach ||u|| = factor, rescaled: the predicted escape time.
    pred = integrate(problem, th_hat, field="ncf", t1=max(nf.ss[-1] * 10, 1.0) if nf.escaped else 1e4,
                     level=float(factor), rtol=rtol)
    t_pred = pred.t_end / scale if pred.reached else float("inf")
    t1 = (10 * t_pred) if math.isfinite(t_pred) else 1e4 / scale
    first = integrate(problem, theta, field="loss", t1=t1, level=float(factor) * delta, rtol=rtol,
                      max_steps=max_steps)
    t_esc = first.t_end if first.reached else float("inf")
    t_end = first.t_end
    ts = np.linspace(0.0, t_end, int(n_save))
    sol = integrate(problem, theta, field="loss", t1=t_end * (1 + 1e-9), level=float(factor) * delta * 1.001,
                    ts=ts, rtol=rtol, max_steps=max_steps)
    thetas = jnp.asarray(sol.thetas)
    dirs = thetas / jnp.linalg.norm(thetas, axis=1, keepdims=True)
    cos = np.asarray(dirs @ jnp.asarray(u_star))
    res = direction_residual(problem, thetas)
    # The NCF prediction at the rescaled times up to its own escape (later times, reached by the real flow when it
    # escapes after the prediction, e.g. for a large delta, are left nan).
    ncf_ts = sol.ts * scale
    ncf_ts = ncf_ts[ncf_ts <= pred.t_end]
    ncf_ratio = np.full(sol.ts.shape, np.nan)
    if ncf_ts.size:
        ncf_pred = integrate(problem, th_hat, field="ncf", t1=float(ncf_ts[-1]) * (1 + 1e-9) + 1e-300,
                             level=float(factor) * 1.001, ts=ncf_ts, rtol=rtol)
        ncf_ratio[: ncf_pred.norms.size] = ncf_pred.norms
    th_esc = np.asarray(first.theta_end)
    cos_esc = float(th_esc @ u_star / np.linalg.norm(th_esc))
    return EarlyPhase(delta, L, float(factor), sol.ts, sol.norms / delta, cos, res, ncf_ratio, t_esc, t_pred,
                      t_esc * scale, th_esc, cos_esc, direction_residual(problem, th_esc),
                      u_star)
