"""Gradient flow ``d theta/dt = -grad L(theta)`` solved as an ODE with diffrax, in float64, to a stated tolerance.

Time can be reparametrised as ``u = log(1 + t)`` (``time='log'``), ``d theta/du = -(1 + t) grad L``, evaluated as
``-exp(u + log L) grad log L`` for classification losses: the late max-margin phase, where ``L ~ 1/t`` and ``t`` reaches
1e12, then takes a few hundred steps instead of a billion, and nothing underflows.
"""

from __future__ import annotations

import dataclasses
import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from ..models import AbstractHomogeneousModel, flatten, safe_norm
from ._batched import EVENT, MAX_STEPS, REACHED, EngineOptions, _engine, _stats_dict
from ._events import _check_events
from ._objective import Objective, make_objective
from ._solution import FlowResult, Trajectory

__all__ = ["gradient_flow", "gradient_flow_batch", "log_times", "SOLVERS", "largest_hessian_eigenvalue"]

# Explicit solvers and their vector-field evaluations per attempted step (first-same-as-last counted once).
_EXPLICIT = {"tsit5": (diffrax.Tsit5, 6), "dopri5": (diffrax.Dopri5, 6), "dopri8": (diffrax.Dopri8, 12),
             "bosh3": (diffrax.Bosh3, 3)}
_IMPLICIT = {"kvaerno5": diffrax.Kvaerno5, "kvaerno3": diffrax.Kvaerno3}
# homflow's own stiff-aware engine (_batched.py): 'auto' = DOPRI5 switching to RKC when the flow turns stiff,
# 'stiff' = RKC throughout.
_ENGINE = ("auto", "stiff")
SOLVERS = _ENGINE + tuple(_EXPLICIT) + tuple(_IMPLICIT)


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


def _check_tolerance(name, value, dtype):
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"`{name}` must be a finite number > 0; got {value!r}.")
    eps = float(jnp.finfo(dtype).eps)
    if name == "rtol" and v < 10 * eps:
        hint = (
            " Enable float64 first: jax.config.update('jax_enable_x64', True) (or homflow.enable_x64())."
            if dtype != jnp.float64
            else ""
        )
        raise ValueError(
            f"`rtol` = {v:g} is below what {jnp.dtype(dtype).name} can deliver (10 eps = {10 * eps:.1e}); the solve would "
            f"'succeed' with a far larger error.{hint}"
        )
    return v


def _make_solver(solver):
    if isinstance(solver, diffrax.AbstractSolver):
        return solver, None
    name = str(solver).lower()
    if name in _EXPLICIT:
        cls, evals = _EXPLICIT[name]
        return cls(), evals
    if name in _IMPLICIT:
        return _IMPLICIT[name](root_finder=optx.Chord(rtol=1e-10, atol=1e-12)), None
    raise ValueError(f"`solver` must be one of {SOLVERS} or a diffrax solver; got {solver!r}.")


@eqx.filter_jit
def _solve(objective: Objective, theta0, save_us, u1, rtol, atol, solver, log_time: bool, events, max_steps: int,
           pcoeff, icoeff, dt0=None):
    def vf(u, theta, args):
        return objective.velocity(theta, log_scale=u if log_time else 0.0)

    def diag(u, theta, args):
        return {"theta": theta, "log_loss": objective.log_loss(theta), "norm": safe_norm(theta)}

    event = None
    if events:
        conds = tuple((lambda e: (lambda t, y, args, **kw: e.condition(y, objective)))(e) for e in events)
        event = diffrax.Event(conds if len(conds) > 1 else conds[0],
                              root_finder=optx.Newton(rtol=1e-10, atol=1e-12))
    controller = diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=pcoeff, icoeff=icoeff)
    saveat = diffrax.SaveAt(subs=[diffrax.SubSaveAt(ts=save_us, fn=diag), diffrax.SubSaveAt(t1=True, fn=diag)])
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf), solver, t0=save_us[0], t1=u1, dt0=dt0, y0=theta0, saveat=saveat,
        stepsize_controller=controller, event=event, max_steps=max_steps, throw=False,
    )
    mask = sol.event_mask if events else None
    return sol.ys, sol.ts, sol.stats, sol.result._value, mask


def _initial_step(objective: Objective, theta, u1: float) -> float:
    """A first step that changes ``theta`` by about 0.1% (diffrax's own estimate can stall on non-smooth fields)."""
    v = float(jnp.linalg.norm(objective.velocity(theta)))
    nrm = float(jnp.linalg.norm(theta))
    if not (v > 0 and math.isfinite(v)) or nrm == 0.0:
        return 1e-6 * u1
    return min(1e-3 * nrm / v, 1e-3 * u1)


def largest_hessian_eigenvalue(objective: Objective, theta, iters: int = 50, *, key=None) -> float:
    """Largest-magnitude eigenvalue of ``Hess L(theta)`` by power iteration with Hessian-vector products."""
    key = jax.random.PRNGKey(0) if key is None else key
    v = jax.random.normal(key, theta.shape, theta.dtype)
    v = v / jnp.linalg.norm(v)

    @jax.jit
    def body(v, _):
        hv = objective.hvp(theta, v)
        lam = jnp.dot(v, hv)
        return hv / jnp.maximum(jnp.linalg.norm(hv), 1e-300), lam

    v, lams = jax.lax.scan(body, v, None, length=iters)
    return float(lams[-1])


def _reason(code: int, t_end: float, t1: float, stats, event_name, objective, theta_end, evals_per_step):
    R = diffrax.RESULTS
    if code == R.successful._value:
        return FlowResult(True, f"reached t1 = {t1:g}")
    if code == R.event_occurred._value:
        return FlowResult(True, f"event {event_name} at t = {t_end:.6g}", event=event_name)
    if code == R.max_steps_reached._value:
        lam = largest_hessian_eigenvalue(objective, theta_end, 30)
        n = int(stats["num_steps"])
        mean_dt = t_end / max(n, 1)
        msg = f"max_steps = {n} reached at t = {t_end:.6g} before t1 = {t1:g}"
        ratio = abs(lam) * mean_dt
        if evals_per_step is not None and 0.2 <= ratio < 20:
            msg += (
                f": the flow is stiff (largest Hessian eigenvalue ~ {lam:.3g}, explicit steps capped near "
                f"3.5/lambda = {3.5 / max(abs(lam), 1e-300):.3g}); use solver='kvaerno5' or raise max_steps"
            )
        elif ratio < 0.2:
            msg += (
                f": the mean step {mean_dt:.3g} is far below the stability bound 3.5/lambda = "
                f"{3.5 / max(abs(lam), 1e-300):.3g}, so this is not stiffness but a discontinuous vector field (a ReLU "
                "kink: a pre-activation sitting at zero on a data point, a sliding mode of the differential inclusion); "
                "use an activation of degree p >= 2, a looser rtol, or a discrete method"
            )
        return FlowResult(False, msg)
    if code in (R.nonfinite._value, R.nonfinite_input._value):
        return FlowResult(False, f"the state became non-finite near t = {t_end:.6g} (the flow diverged?)")
    return FlowResult(False, f"solver stopped at t = {t_end:.6g}: {R._index_to_message[code]}")


def gradient_flow(
    model: AbstractHomogeneousModel,
    data,
    *,
    loss="square",
    t1: float,
    rtol: float = 1e-8,
    atol: float | None = None,
    ts=None,
    n_save: int = 200,
    solver="auto",
    time: str = "auto",
    events=None,
    max_steps: int = 1_000_000,
    pcoeff: float = 0.4,
    icoeff: float = 0.3,
    theta0=None,
) -> Trajectory:
    """Integrate the gradient flow ``d theta/dt = -grad L(theta)`` from ``model`` to ``t1`` with an adaptive diffrax solver.

    Arguments:
        model: the network at ``t = 0`` (its parameters are ``theta(0)``).
        data: a :class:`homflow.data.Dataset`.
        loss: ``'square'``, ``'logistic'``, ``'exponential'`` or a :class:`homflow.losses.Loss` (summed over samples).
        t1: final time.
        rtol: relative tolerance of the PID step-size controller (default 1e-8).
        atol: absolute tolerance; default ``0.1 * rtol * ||theta(0)||``. It must follow the weight scale: with a tiny
            initialisation an absolute 1e-8 lets the early phase be taken in a few inaccurate steps. Flows that pass
            saddles amplify early errors, and from a tiny initialisation the individual weights are far below
            ``||theta(0)||``: the factor 0.1 (about ``rtol`` times a typical weight) makes their control relative (on
            the canonical problem to t = 250 it cut the endpoint error of ``'auto'`` at rtol 1e-8 from 1.1e-6, with
            ``rtol * ||theta(0)||``, to 0.9e-7 for 10% more gradient evaluations; docs/performance.md).
        ts: save times (default :func:`log_times` ``(t1, n_save)``: 0 and log-spaced times).
        solver: ``'auto'`` (default): homflow's engine, Dormand-Prince 5(4) while the flow is non-stiff, switching to
            the Runge-Kutta-Chebyshev method RKC2 when its steps become stability-limited (the stiff square-loss
            phases; docs/performance.md); ``'stiff'``: RKC2 throughout; diffrax solvers ``'tsit5'``, ``'dopri5'``,
            ``'dopri8'``, ``'bosh3'``, ``'kvaerno5'``/``'kvaerno3'`` (implicit), or any diffrax solver instance.
            ``stats['grad_evals']`` counts gradient evaluations: 6 per Dormand-Prince step, ``s`` per ``s``-stage RKC
            step, one per power iteration of the spectral-radius estimate (finite differences of gradients), one at
            the start; no Hessian or Hessian-vector product is used.
        time: ``'linear'`` (integrate in ``t``), ``'log'`` (in ``u = log(1 + t)``), or ``'auto'`` (log when ``t1 > 1e4``).
        events: :class:`LossBelow`, :class:`NormAbove`, :class:`NormBelow` (or a sequence): stop at the first one.
        max_steps: the solver gives up after this many steps and says why (a stiffness diagnosis included).
        pcoeff, icoeff: PID controller coefficients (0.4 / 0.3 cut rejected steps by two thirds here).
        theta0: optional flat initial vector overriding ``model``'s parameters (same architecture).

    Returns:
        A :class:`Trajectory` (``.ts``, ``.thetas``, ``.loss``, ``.log_loss``, ``.norm``, ``.final``, ``.stats``,
        ``.result``). The last saved state is the state at the end (``t1`` or the event time).

    Raises:
        ValueError: on bad arguments (named), e.g. ``rtol`` below the precision of the dtype in use.
    """
    objective, theta = make_objective(model, data, loss)
    if theta0 is not None:
        theta0 = jnp.asarray(theta0, dtype=theta.dtype)
        if theta0.shape != theta.shape:
            raise ValueError(f"`theta0` must have shape {theta.shape}; got {theta0.shape}.")
        theta = theta0
    if not bool(jnp.all(jnp.isfinite(theta))):
        raise ValueError("the initial parameters hold NaN or inf.")
    rtol = _check_tolerance("rtol", rtol, theta.dtype)
    nrm = float(jnp.linalg.norm(theta))
    atol = _check_tolerance("atol", atol if atol is not None else 0.1 * rtol * max(nrm, 1e-300), theta.dtype)
    max_steps = check_max_steps(max_steps)
    t1, ts = check_times(t1, ts, n_save)
    if time not in ("auto", "linear", "log"):
        raise ValueError(f"`time` must be 'auto', 'linear' or 'log'; got {time!r}.")
    log_time = time == "log" or (time == "auto" and t1 > 1e4)
    if isinstance(solver, str) and solver.lower() in _ENGINE:
        return _engine_flow(objective, theta, ts, t1, rtol, atol, solver.lower(), log_time, _check_events(events),
                            int(max_steps), pcoeff, icoeff)
    solver_obj, evals_per_step = _make_solver(solver)
    events = _check_events(events)
    save_us = jnp.asarray(np.log1p(ts) if log_time else ts, dtype=theta.dtype)
    u1 = math.log1p(t1) if log_time else t1
    dt0 = _initial_step(objective, theta, u1)
    f = lambda v: jnp.asarray(v, dtype=theta.dtype)  # noqa: E731  (arrays, not Python floats: no recompilation)
    ys, tsaved, stats, code, mask = _solve(objective, theta, save_us, f(u1), f(rtol), f(atol), solver_obj, log_time,
                                           events, int(max_steps), f(pcoeff), f(icoeff), f(dt0))
    return _to_trajectory(objective, ts, ys, tsaved, stats, int(code), mask, events, log_time, t1, evals_per_step)


def _field_linear(t, theta, objective):
    return objective.velocity(theta)


def _field_log(u, theta, objective):
    return objective.velocity(theta, log_scale=u)


class _EventConditions(eqx.Module):
    """The events of a flow as one ``g(t, theta, objective) -> (E,)`` for the engine (hashable: a static argument)."""

    events: tuple = eqx.field(static=True)

    def __call__(self, t, theta, objective):
        return jnp.stack([jnp.asarray(e.condition(theta, objective), theta.dtype) for e in self.events])


@eqx.filter_jit
def _diagnostics(objective, thetas):
    return jax.vmap(lambda th: (objective.log_loss(th), safe_norm(th)))(thetas)


def _engine_flow(objective, theta, ts, t1, rtol, atol, method, log_time, events, max_steps, pcoeff, icoeff,
                 options=None):
    """Run the stiff-aware engine (batch of one or many rows of ``theta``) and return Trajectories."""
    thetas0 = theta[None] if theta.ndim == 1 else theta
    dt = thetas0.dtype
    opts = dataclasses.replace(options or EngineOptions(), method=method, pcoeff=pcoeff, icoeff=icoeff)
    save_us = np.log1p(ts) if log_time else ts
    u1 = math.log1p(t1) if log_time else t1
    atol_v = jnp.broadcast_to(jnp.asarray(atol, dt), (thetas0.shape[0],))
    saves, idx, u_end, y_end, status, ev, stats = _engine(
        _field_log if log_time else _field_linear, objective, thetas0, jnp.asarray(0.0, dt), jnp.asarray(u1, dt),
        jnp.asarray(save_us, dt), jnp.asarray(rtol, dt), atol_v, _EventConditions(events) if events else None, opts,
        max_steps)
    saves, idx, u_end, y_end = np.asarray(saves), np.asarray(idx), np.asarray(u_end), np.asarray(y_end)
    status, ev = np.asarray(status), np.asarray(ev)
    st = _stats_dict(stats)
    out = []
    for b in range(thetas0.shape[0]):
        k = int(idx[b])
        t_end = math.expm1(float(u_end[b])) if log_time else float(u_end[b])
        ts_k, th_k = ts[:k], saves[b, :k]
        if ts_k.size == 0 or t_end > ts_k[-1] * (1 + 1e-12):
            ts_k = np.append(ts_k, t_end)
            th_k = np.vstack([th_k, y_end[b][None]])
        log_l, norm = (np.asarray(a) for a in _diagnostics(objective, jnp.asarray(th_k)))
        s_b = {
            "num_steps": int(st["num_steps"][b]),
            "num_accepted_steps": int(st["num_accepted_steps"][b]),
            "num_rejected_steps": int(st["num_rejected_steps"][b]),
            "grad_evals": int(st["grad_evals"][b]),
            "log_time": bool(log_time),
            "solver": method,
            "num_stiff_steps": int(st["num_stiff_steps"][b]),
            "num_rho_estimates": int(st["num_rho_estimates"][b]),
            "max_stages": int(st["max_stages"][b]),
            "spectral_radius": float(st["spectral_radius"][b]),
            "t_switch": (math.expm1(float(st["t_switch"][b])) if log_time else float(st["t_switch"][b]))
            if np.isfinite(st["t_switch"][b]) else None,
        }
        code = int(status[b])
        if code == REACHED:
            result = FlowResult(True, f"reached t1 = {t1:g}")
        elif code == EVENT:
            name = events[int(ev[b])].name if ev[b] >= 0 else "event"
            result = FlowResult(True, f"event {name} at t = {t_end:.6g}", event=name)
        elif code == MAX_STEPS:
            result = FlowResult(False, f"max_steps = {s_b['num_steps']} reached at t = {t_end:.6g} before t1 = {t1:g} "
                                f"({s_b['num_stiff_steps']} stiff RKC steps, spectral radius ~ "
                                f"{s_b['spectral_radius']:.3g}); raise max_steps")
        else:
            result = FlowResult(False, f"the step size underflowed near t = {t_end:.6g}: the state became "
                                "non-finite (the flow diverged?)")
        out.append(Trajectory(ts=ts_k, thetas=th_k, loss=np.exp(log_l), log_loss=log_l, norm=norm, stats=s_b,
                              result=result, unflatten=objective.unflatten, degree=objective.degree))
    return out if theta.ndim == 2 else out[0]


def _to_trajectory(objective, ts, ys, tsaved, stats, code, mask, events, log_time, t1, evals_per_step):
    sub, end = ys
    u_end = float(np.asarray(tsaved[1])[-1])
    t_end = math.expm1(u_end) if log_time else u_end
    thetas = np.asarray(sub["theta"])
    keep = np.all(np.isfinite(thetas), axis=1) & (ts <= t_end * (1 + 1e-12))
    ts_k, thetas = ts[keep], thetas[keep]
    log_l, norm = np.asarray(sub["log_loss"])[keep], np.asarray(sub["norm"])[keep]
    th_end = np.asarray(end["theta"])[-1]
    if np.all(np.isfinite(th_end)) and (ts_k.size == 0 or t_end > ts_k[-1] * (1 + 1e-12)):
        ts_k = np.append(ts_k, t_end)
        thetas = np.vstack([thetas, th_end])
        log_l = np.append(log_l, np.asarray(end["log_loss"])[-1])
        norm = np.append(norm, np.asarray(end["norm"])[-1])
    n_steps = int(stats["num_steps"])
    st = {
        "num_steps": n_steps,
        "num_accepted_steps": int(stats["num_accepted_steps"]),
        "num_rejected_steps": int(stats["num_rejected_steps"]),
        "grad_evals": (evals_per_step * n_steps + 1) if evals_per_step is not None else None,
        "log_time": bool(log_time),
    }
    event_name = None
    if mask is not None:
        m = mask if isinstance(mask, (tuple, list)) else (mask,)
        fired = [e.name for e, b in zip(events, m) if bool(np.asarray(b))]
        event_name = fired[0] if fired else None
    result = _reason(code, t_end, t1, st, event_name, objective, jnp.asarray(th_end) if np.all(np.isfinite(th_end))
                     else jnp.asarray(thetas[-1]), evals_per_step)
    return Trajectory(ts=ts_k, thetas=thetas, loss=np.exp(log_l), log_loss=log_l, norm=norm, stats=st, result=result,
                      unflatten=objective.unflatten, degree=objective.degree)


def gradient_flow_batch(model: AbstractHomogeneousModel, data, thetas0, *, method: str = "map", **kwargs):
    """Gradient flows from many initial vectors ``thetas0`` (B, P) of ``model``'s architecture in one call.

    ``method='batched'`` integrates all members in one compiled lock-step loop of homflow's stiff-aware engine
    (``solver='auto'`` or ``'stiff'``): each member keeps its own step size, error control and stiffness switch, and
    every stage evaluates one batched gradient (the cost per member approaches the raw ``vmap(grad)`` cost; see
    docs/performance.md); its default ``atol`` is ``0.1 * rtol * ||theta0[b]||`` per member, as in single calls.
    ``method='map'`` runs one compiled solve per member (compiled once; the cost of B separate calls without their
    overhead), ``'vmap'`` vectorises a diffrax solve (every member then takes the steps of the stiffest: measured 7x
    slower on a CPU for spread-out problems; with the engine's solvers ``'auto'``/``'stiff'`` it is ``'batched'``). Keyword arguments are those of
    :func:`gradient_flow`. Returns a list of :class:`Trajectory`.
    """
    thetas0 = np.asarray(thetas0)
    P = flatten(model)[0].size
    if thetas0.ndim != 2 or thetas0.shape[1] != P:
        raise ValueError(f"`thetas0` must have shape (batch, {P}); got {thetas0.shape}.")
    if method not in ("map", "vmap", "batched"):
        raise ValueError(f"`method` must be 'map', 'vmap' or 'batched'; got {method!r}.")
    if method == "map":
        return [gradient_flow(model, data, theta0=th, **kwargs) for th in thetas0]
    if method == "batched":
        return _batched_flows(model, data, thetas0, **kwargs)
    if str(kwargs.get("solver", "auto")).lower() in _ENGINE:
        return _batched_flows(model, data, thetas0, **kwargs)  # the engine is vectorised already
    return _vmap_flows(model, data, thetas0, **kwargs)


def _batched_flows(model, data, thetas0, *, loss="square", t1, rtol=1e-8, atol=None, ts=None, n_save=200,
                   solver="auto", time="auto", events=None, max_steps=1_000_000, pcoeff=0.4, icoeff=0.3,
                   options: EngineOptions | None = None):
    objective, theta = make_objective(model, data, loss)
    thetas0 = jnp.asarray(thetas0, dtype=theta.dtype)
    if not bool(jnp.all(jnp.isfinite(thetas0))):
        raise ValueError("`thetas0` holds NaN or inf.")
    if not (isinstance(solver, str) and solver.lower() in _ENGINE):
        raise ValueError(f"`solver` must be one of {_ENGINE} with method='batched'; got {solver!r}.")
    rtol = _check_tolerance("rtol", rtol, theta.dtype)
    if atol is None:
        atol = 0.1 * rtol * jnp.maximum(jnp.linalg.norm(thetas0, axis=1), 1e-300)
    else:
        atol = jnp.full((thetas0.shape[0],), _check_tolerance("atol", atol, theta.dtype), theta.dtype)
    max_steps = check_max_steps(max_steps)
    t1, ts = check_times(t1, ts, n_save)
    if time not in ("auto", "linear", "log"):
        raise ValueError(f"`time` must be 'auto', 'linear' or 'log'; got {time!r}.")
    log_time = time == "log" or (time == "auto" and t1 > 1e4)
    return _engine_flow(objective, thetas0, ts, t1, rtol, atol, solver.lower(), log_time, _check_events(events),
                        int(max_steps), pcoeff, icoeff, options)


def _vmap_flows(model, data, thetas0, *, loss="square", t1, rtol=1e-8, atol=None, ts=None, n_save=200,
                solver="tsit5", time="auto", events=None, max_steps=1_000_000, pcoeff=0.4, icoeff=0.3):
    objective, theta = make_objective(model, data, loss)
    thetas0 = jnp.asarray(thetas0, dtype=theta.dtype)
    rtol = _check_tolerance("rtol", rtol, theta.dtype)
    nrm = float(jnp.min(jnp.linalg.norm(thetas0, axis=1)))
    atol = _check_tolerance("atol", atol if atol is not None else 0.1 * rtol * max(nrm, 1e-300), theta.dtype)
    t1, ts = check_times(t1, ts, n_save)
    log_time = time == "log" or (time == "auto" and t1 > 1e4)
    solver_obj, evals_per_step = _make_solver(solver)
    events = _check_events(events)
    save_us = jnp.asarray(np.log1p(ts) if log_time else ts, dtype=theta.dtype)
    u1 = math.log1p(t1) if log_time else float(t1)
    # the same first step as single calls (gradient_flow), member by member
    dt0s = jnp.asarray([_initial_step(objective, th, u1) for th in thetas0], dtype=thetas0.dtype)
    fn = eqx.filter_vmap(
        lambda th, dt0: _solve(objective, th, save_us, u1, rtol, atol, solver_obj, log_time, events, int(max_steps),
                               pcoeff, icoeff, dt0)
    )
    ys, tsaved, stats, code, mask = fn(thetas0, dt0s)
    out = []
    for b in range(thetas0.shape[0]):
        pick = lambda tree: jax.tree_util.tree_map(lambda x: x[b] if np.ndim(x) > 0 else x, tree)  # noqa: E731
        out.append(_to_trajectory(objective, ts, pick(ys), pick(tsaved), pick(stats), int(code[b]),
                                  pick(mask) if mask is not None else None, events, log_time, float(t1),
                                  evals_per_step))
    return out
