"""The one integrate path: every flow in homflow (single, batched, checkpointed segments, NCF flows, escape solves, the
joint narrow/wide flow) goes through :func:`integrate` with a solver object and a vector field over a
:class:`homflow.flow.Problem`.

Time can be reparametrised as ``u = log(1 + t)`` (``time='log'``), ``d theta/du = -(1 + t) grad L``, evaluated as
``-exp(u + log L) grad log L`` for classification losses: the late max-margin phase, where ``L ~ 1/t`` and ``t`` reaches
1e12, then takes a few hundred steps instead of a billion, and nothing underflows.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..models import safe_norm
from ._events import _check_events
from ._problem import Problem
from ._results import RESULTS, SolverError, classify_max_steps, reason_for
from ._solution import Trajectory
from ._solvers import FlowOutput, as_solver, default_atol

__all__ = ["integrate", "LossField", "NCFField", "log_times", "check_times", "check_max_steps", "check_rtol"]


class LossField(eqx.Module):
    """The gradient flow ``d theta/dt = -grad L(theta)`` of ``problem`` (in log time ``u = log(1 + t)`` when
    ``log_time``); ``value`` saves ``log L``."""

    problem: Problem
    log_time: bool = eqx.field(static=True, default=False)

    def __call__(self, t, y):
        return self.problem.velocity(y, log_scale=t if self.log_time else 0.0)

    def value(self, y):
        return self.problem.log_loss(y)


class NCFField(eqx.Module):
    """The NCF flow ``du/ds = grad N(u)`` of ``problem`` (docs/math.md section 3, arXiv 2403.08121); ``value`` saves
    ``N(u)``."""

    problem: Problem
    log_time: bool = eqx.field(static=True, default=False)

    def __call__(self, t, y):
        return self.problem.ncf_grad(y)

    def value(self, y):
        return self.problem.ncf(y)


class _Events(eqx.Module):
    """The events of a flow as one ``g(t, y) -> (E,)`` (thresholds traced, so new levels do not recompile)."""

    events: tuple
    problem: Problem

    @property
    def size(self) -> int:
        return len(self.events)

    def __call__(self, t, y):
        return jnp.stack([jnp.asarray(e.condition(y, self.problem), y.dtype) for e in self.events])


def log_times(t1: float, n: int = 200, *, t_min: float | None = None) -> np.ndarray:
    """``0`` followed by ``n - 1`` log-spaced times from ``t_min`` (default ``t1 * 1e-6``, at most 1e-3) to ``t1``.

    >>> log_times(100.0, 4)
    array([0.e+00, 1.e-04, 1.e-01, 1.e+02])
    """
    t1 = float(t1)
    if not (t1 > 0 and math.isfinite(t1)):
        raise ValueError(f"`t1` must be a finite time > 0; got {t1!r}.")
    if n < 2:
        raise ValueError(f"`n_save` must be >= 2; got {n!r}.")
    t_min = min(t1 * 1e-6, 1e-3) if t_min is None else float(t_min)
    return np.concatenate([[0.0], np.geomspace(t_min, t1, n - 1)])


def check_times(t1, ts=None, n_save: int = 200) -> tuple[float, np.ndarray]:
    """Validate a horizon ``t1`` and save times ``ts`` (default :func:`log_times` ``(t1, n_save)``); returns ``t1`` as a
    float and ``ts`` as increasing times in ``[0, t1]`` that start at 0.

    Raises:
        ValueError: for ``t1`` not finite and > 0, or ``ts`` not increasing in ``[0, t1]``.
    """
    try:
        t1 = float(t1)
    except (TypeError, ValueError):
        raise ValueError(f"`t1` must be a finite time > 0; got {t1!r}.") from None
    if not (t1 > 0 and math.isfinite(t1)):
        raise ValueError(f"`t1` must be a finite time > 0; got {t1!r}.")
    ts = log_times(t1, n_save) if ts is None else np.asarray(ts, dtype=float)
    if ts.ndim != 1 or ts.size < 1 or np.any(np.diff(ts) <= 0) or ts[0] < 0 or ts[-1] > t1:
        raise ValueError("`ts` must be increasing times in [0, t1].")
    if ts[0] != 0.0:
        ts = np.concatenate([[0.0], ts])
    return t1, ts


def check_max_steps(max_steps) -> int:
    """``max_steps`` as a positive int, or a ``ValueError`` naming it."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive integer; got {max_steps!r}.")
    return int(max_steps)


def check_rtol(rtol, dtype) -> float:
    """``rtol`` as a float, refused below ``10 eps`` of ``dtype`` (the solve would 'succeed' with a far larger error)."""
    v = float(rtol)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"`rtol` must be a finite number > 0; got {rtol!r}.")
    eps = float(jnp.finfo(dtype).eps)
    if v < 10 * eps:
        hint = (" Enable float64 first: jax.config.update('jax_enable_x64', True) (or homflow.enable_x64())."
                if dtype != jnp.float64 else "")
        raise ValueError(f"`rtol` = {v:g} is below what {jnp.dtype(dtype).name} can deliver (10 eps = {10 * eps:.1e}); "
                         f"the solve would 'succeed' with a far larger error.{hint}")
    return v


@eqx.filter_jit
def _diagnose(field, t, y, iters: int):
    """``(lam, rate)``: the largest-magnitude eigenvalue of the field's Jacobian at ``y`` (for a gradient flow
    ``-Hess L``; power iteration with Jacobian-vector products) and the field's own rate ``||f(y)|| / ||y||``."""
    v = jax.random.normal(jax.random.PRNGKey(0), y.shape, y.dtype)
    v = v / jnp.linalg.norm(v)
    tiny = jnp.finfo(y.dtype).tiny

    def body(v, _):
        jv = jax.jvp(lambda z: field(t, z), (y,), (v,))[1]
        return jv / jnp.maximum(jnp.linalg.norm(jv), tiny), jnp.dot(v, jv)

    _, lams = jax.lax.scan(body, v, None, length=iters)
    return lams[-1], jnp.linalg.norm(field(t, y)) / jnp.maximum(jnp.linalg.norm(y), tiny)


@eqx.filter_jit
def _diagnostics(field, thetas):
    return jax.vmap(lambda th: (field.value(th), safe_norm(th)))(thetas)


def integrate(problem: Problem, solver=None, theta0=None, *, t1: float, ts=None, n_save: int = 200,
              field="loss", time: str = "auto", events=None, max_steps: int = 1_000_000, throw: bool = True,
              diagnose_iters: int = 30):
    """Integrate a flow of ``problem`` from ``theta0`` (P,) or a batch ``theta0`` (B, P) to ``t1``.

    Arguments:
        problem: a :class:`homflow.flow.Problem` (:func:`homflow.flow.make_problem`).
        solver: an :class:`AbstractFlowSolver` (:class:`Auto` default, :class:`RKC`, :class:`DOPRI5`, :class:`Diffrax`,
            a non-smooth solver, ...), a name of :data:`SOLVERS`, or a diffrax solver instance.
        theta0: initial parameters, (P,) or (B, P).
        t1: final time; ts: save times in ``[0, t1]`` (default :func:`log_times` ``(t1, n_save)``).
        field: ``'loss'`` (the gradient flow), ``'ncf'`` (the NCF flow ``du/ds = grad N(u)``), or a field module
            ``field(t, y)`` with ``.problem``, ``.log_time`` and ``.value(y)`` (e.g. the joint narrow/wide flow).
        time: ``'linear'``, ``'log'`` (integrate in ``u = log(1 + t)``; loss field only) or ``'auto'`` (log when
            ``t1 > 1e4`` for the loss field).
        events: :class:`LossBelow`, :class:`NormAbove`, :class:`NormBelow` (or a sequence): stop at the first one.
        max_steps: attempted steps per member before the solver gives up and says why.
        throw: raise :class:`SolverError` when a flow fails (default); ``False`` returns the trajectory with its
            ``result`` and ``reason``.
        diagnose_iters: power iterations of the diagnosis of a max_steps stop (stiff / kink / budget, see
            :func:`classify_max_steps`).

    Returns:
        A :class:`Trajectory` (or a list of them for a batch): states at the save times reached and at the end,
        ``log_loss`` / ``norm`` (for the NCF field ``extras['ncf']`` holds ``N``), ``result``, ``stats``, ``reason``.

    Raises:
        ValueError: bad arguments (named). SolverError: a failed flow when ``throw``.
    """
    solver = as_solver(solver)
    if not isinstance(problem, Problem):
        raise ValueError(f"`problem` must be a homflow.flow.Problem (make_problem); got {type(problem).__name__}.")
    if theta0 is None:
        raise ValueError("`theta0` is required: the initial parameters, (P,) or (B, P).")
    dtype = problem.X.dtype
    y0 = jnp.asarray(theta0, dtype=dtype)
    single = y0.ndim == 1
    y0 = y0[None] if single else y0
    if y0.ndim != 2 or not bool(jnp.all(jnp.isfinite(y0))):
        raise ValueError(f"`theta0` must be a finite (P,) or (B, P) array; got shape {tuple(y0.shape)}"
                         f"{'' if y0.ndim != 2 else ' with NaN or inf'}.")
    rtol = check_rtol(solver.rtol, dtype)
    atol = default_atol(rtol, np.asarray(y0)) if solver.atol is None else np.full(y0.shape[0], float(solver.atol))
    max_steps = check_max_steps(max_steps)
    t1, ts = check_times(t1, ts, n_save)
    if time not in ("auto", "linear", "log"):
        raise ValueError(f"`time` must be 'auto', 'linear' or 'log'; got {time!r}.")
    if isinstance(field, str):
        if field not in ("loss", "ncf"):
            raise ValueError(f"`field` must be 'loss', 'ncf' or a field module; got {field!r}.")
        log_time = field == "loss" and (time == "log" or (time == "auto" and t1 > 1e4))
        fld = LossField(problem, log_time) if field == "loss" else NCFField(problem)
    else:
        fld, log_time = field, bool(field.log_time)
    evs = _check_events(events)
    ev_mod = None
    if evs:
        traced = tuple(jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), e) for e in evs)
        ev_mod = _Events(traced, problem)
    save_us = np.log1p(ts) if log_time else ts
    u1 = math.log1p(t1) if log_time else t1
    rest = _at_rest(fld, y0, solver)
    if rest.all():
        out = _rest_output(solver, y0, u1, save_us)
    elif rest.any():
        moving = np.flatnonzero(~rest)
        part = solver.run(fld, y0[moving], 0.0, u1, save_us, atol[moving], ev_mod, max_steps)
        out = _merge_rest(part, moving, _rest_output(solver, y0, u1, save_us))
    else:
        out = solver.run(fld, y0, 0.0, u1, save_us, atol, ev_mod, max_steps)
    trajs = [_trajectory(problem, fld, out, b, ts, t1, log_time, evs, rtol, diagnose_iters) for b in range(y0.shape[0])]
    if throw:
        for tr in trajs:
            if not tr.success:
                raise SolverError(tr.reason, tr.result, tr)
    return trajs[0] if single else trajs


@eqx.filter_jit
def _velocities(fld, y0):
    return jax.vmap(lambda y: fld(jnp.zeros((), y.dtype), y))(y0)


def _at_rest(fld, y0, solver) -> np.ndarray:
    """(B,) members that start at ``theta = 0`` where the velocity vanishes: a critical point, where the flow stays.

    For a Lipschitz field the constant is then the only solution, and no solver should spend its step budget finding
    it out: from ``theta = 0`` the error control has no scale (``atol = 0.1 rtol ||theta(0)||`` is zero). For a
    non-smooth solver the autodiff velocity is one subgradient, not the minimal-norm one, so there ``theta = 0``
    counts only for a network of degree ``L >= 2``: ``|L(theta) - L(0)| = O(||theta||^L)``, so every Clarke subgradient
    vanishes. (Other critical points have a scale, and the solvers' steps grow there at once.)
    """
    y = np.asarray(y0)
    rest = np.all(y == 0.0, axis=1)
    if not rest.any():
        return rest
    if getattr(solver, "name", "") == "clarke":
        return rest & (int(fld.problem.degree) >= 2)
    v = np.asarray(_velocities(fld, jnp.asarray(y[rest])))
    rest[np.flatnonzero(rest)] = np.all(v == 0.0, axis=1)
    return rest


def _rest_output(solver, y0, u1, save_us) -> FlowOutput:
    """The exact (constant) solution of members at rest."""
    B, S = y0.shape[0], len(save_us)
    y = np.asarray(y0)
    stats = [{"solver": solver.name, "num_steps": 0, "num_accepted_steps": 0, "num_rejected_steps": 0,
              "grad_evals": 1, "at_rest": True} for _ in range(B)]
    return FlowOutput(ys=np.broadcast_to(y[:, None, :], (B, S, y.shape[1])).copy(), n_saved=np.full(B, S),
                      t_end=np.full(B, float(u1)), y_end=y.copy(), results=[RESULTS.successful] * B,
                      event=np.full(B, -1), stats=stats)


def _merge_rest(part: FlowOutput, moving, rest: FlowOutput) -> FlowOutput:
    """``rest`` (every member at rest) with the members ``moving`` replaced by the solver's output ``part``."""
    ys, n_saved, t_end, y_end = rest.ys.copy(), rest.n_saved.copy(), rest.t_end.copy(), rest.y_end.copy()
    results, event, stats = list(rest.results), rest.event.copy(), list(rest.stats)
    lam = None if part.lam_max is None else np.full(len(results), np.nan)
    for i, b in enumerate(moving):
        ys[b], n_saved[b], t_end[b], y_end[b] = part.ys[i], part.n_saved[i], part.t_end[i], part.y_end[i]
        results[b], event[b], stats[b] = part.results[i], part.event[i], part.stats[i]
        if lam is not None:
            lam[b] = part.lam_max[i]
    return FlowOutput(ys=ys, n_saved=n_saved, t_end=t_end, y_end=y_end, results=results, event=event, stats=stats,
                      lam_max=lam, batch_stats=part.batch_stats)


def _trajectory(problem, fld, out, b, ts, t1, log_time, events, rtol, diag_iters) -> Trajectory:
    k = int(out.n_saved[b])
    u_end = float(out.t_end[b])
    t_end = math.expm1(u_end) if log_time else u_end
    ts_k, th_k = ts[:k], np.asarray(out.ys[b, :k])
    y_end = np.asarray(out.y_end[b])
    if np.all(np.isfinite(y_end)) and (ts_k.size == 0 or t_end > ts_k[-1] * (1 + 1e-12)):
        ts_k = np.append(ts_k, t_end)
        th_k = np.vstack([th_k, y_end[None]]) if th_k.size else y_end[None]
    value, norm = (np.asarray(a) for a in _diagnostics(fld, jnp.asarray(th_k)))
    stats = dict(out.stats[b])
    stats["log_time"] = bool(log_time)
    if stats.get("t_switch") is not None and log_time:
        stats["t_switch"] = math.expm1(stats["t_switch"])
    for key, v in out.batch_stats.items():
        stats[f"batch_{key}"] = v
    result = out.results[b]
    lam = None if out.lam_max is None or not np.isfinite(out.lam_max[b]) else float(out.lam_max[b])
    n = max(int(stats.get("num_steps") or 0), 1)
    mostly_explicit = 2 * int(stats.get("num_stiff_steps") or 0) < n and not stats.get("implicit", False)
    stalled = bool((result == RESULTS.max_steps_reached) | (result == RESULTS.step_size_underflow))
    if stalled and np.all(np.isfinite(y_end)):
        # why did it stall: a non-finite field, stiffness, a kink (sliding mode), or just too small a budget?
        lam, rate = (float(x) for x in _diagnose(fld, jnp.asarray(u_end, y_end.dtype), jnp.asarray(y_end), diag_iters))
        if not (math.isfinite(rate) and math.isfinite(lam)):
            result = RESULTS.nonfinite
        elif bool(result == RESULTS.max_steps_reached) and mostly_explicit:
            result = classify_max_steps(lam, u_end / n, rate, rtol)
    elif stalled:
        result = RESULTS.nonfinite
    ev = int(out.event[b])
    event = events[ev].name if (ev >= 0 and ev < len(events)) else None
    if bool(result == RESULTS.event_occurred) and event is None:
        event = "event"
    reason = reason_for(result, t_end=t_end, t1=t1, stats=stats, event=event, lam_max=lam)
    extras = {} if isinstance(fld, LossField) else {"value": value}
    log_l = value
    if isinstance(fld, NCFField):
        extras["ncf"] = value
        log_l = np.full_like(value, np.nan)
    return Trajectory(ts=ts_k, thetas=th_k, loss=np.exp(log_l), log_loss=log_l, norm=norm, stats=stats,
                      result=result, unflatten=problem.unflatten, degree=problem.degree, extras=extras,
                      reason=reason, event=event)

