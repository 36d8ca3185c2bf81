"""A gradient flow integrated in equal segments with a checkpoint after each, so a killed run resumes exactly.

The flow ``d theta/dt = -grad L(theta)`` is autonomous, so the segment ``[k T, (k+1) T]`` is the flow of length ``T``
started at the state reached at ``k T``. An uninterrupted run and a resumed one integrate the very same segments from
the very same (bit-identical, checkpointed) states with the same compiled solve, hence give the same numbers bit for
bit. The segment solve is compiled once per architecture, loss and solver (the segment length, the tolerances and the
stop levels are traced; ``homflow.flow.gradient_flow`` builds a fresh closure per call, which recompiles), so segments
cost integration only.
"""

from __future__ import annotations

import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ..flow import FlowResult, Objective, Trajectory, log_times, make_objective
from ..losses import Loss
from ..models import AbstractHomogeneousModel, safe_norm
from ._registry import Context

_SOLVERS = {"tsit5": (diffrax.Tsit5, 6), "dopri5": (diffrax.Dopri5, 6), "dopri8": (diffrax.Dopri8, 12),
            "bosh3": (diffrax.Bosh3, 3)}


class _Problem(eqx.Module):
    """Architecture (template network), data and loss as one pytree: its static parts are the architecture and the
    loss only, so the compiled segment solve is reused across calls."""

    X: jax.Array
    y: jax.Array
    template: AbstractHomogeneousModel
    loss: Loss

    def objective(self) -> Objective:
        params, static = eqx.partition(self.template, eqx.is_inexact_array)
        unravel = ravel_pytree(params)[1]
        return Objective(self.X, self.y, self.loss, lambda th: eqx.combine(unravel(th), static), self.template.degree)


@eqx.filter_jit
def _segment(problem: _Problem, theta0, save_us, u1, rtol, atol, log_loss_stop, norm_stop, solver_name: str,
             log_time: bool, stop_loss: bool, stop_norm: bool, max_steps: int):
    objective = problem.objective()

    def vf(u, th, args):
        return objective.velocity(th, log_scale=u if log_time else 0.0)

    def diag(u, th, args):
        return {"theta": th, "log_loss": objective.log_loss(th), "norm": safe_norm(th)}

    conds = []
    if stop_loss:
        conds.append(lambda t, y, args, **kw: log_loss_stop - objective.log_loss(y))
    if stop_norm:
        conds.append(lambda t, y, args, **kw: safe_norm(y) - norm_stop)
    event = None
    if conds:
        import optimistix as optx

        event = diffrax.Event(tuple(conds) if len(conds) > 1 else conds[0],
                              root_finder=optx.Newton(rtol=1e-10, atol=1e-12))
    controller = diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=0.4, icoeff=0.3)
    saveat = diffrax.SaveAt(subs=[diffrax.SubSaveAt(ts=save_us, fn=diag), diffrax.SubSaveAt(t1=True, fn=diag)])
    sol = diffrax.diffeqsolve(diffrax.ODETerm(vf), _SOLVERS[solver_name][0](), t0=save_us[0], t1=u1, dt0=None,
                              y0=theta0, saveat=saveat, stepsize_controller=controller, event=event,
                              max_steps=max_steps, throw=False)
    mask = sol.event_mask if conds else None
    return sol.ys, sol.ts[1][-1], sol.stats, sol.result._value, mask

__all__ = ["segmented_flow"]


def segmented_flow(model, data, *, loss, t1: float, segments: int = 4, n_save: int = 25, rtol: float = 1e-8,
                   atol: float | None = None, solver: str = "tsit5", time: str = "auto", events=None,
                   max_steps: int = 1_000_000, ctx: Context | None = None, name: str = "flow",
                   progress: tuple[float, float] = (0.0, 1.0)) -> Trajectory:
    """Integrate the gradient flow of ``model`` on ``data`` to ``t1`` in ``segments`` equal segments.

    Arguments:
        model, data, loss, rtol, solver, time, events, max_steps: as for :func:`homflow.flow.gradient_flow`.
        t1: final time; segments: number of equal segments (one checkpoint after each).
        n_save: saved states per segment (the first segment's are log-spaced, the others evenly spaced).
        atol: absolute tolerance, default ``rtol * ||theta(0)||`` for every segment.
        ctx: the runner's :class:`Context`: checkpoints under ``name`` (resumed from when present), progress reports
            mapped into the ``progress`` interval.

    Returns:
        A :class:`homflow.flow.Trajectory` over the whole flow (``stats`` summed over segments, ``stats['segments']``
        the number integrated, ``stats['resumed_from']`` the segment a resume started at).
    """
    if isinstance(segments, bool) or int(segments) != segments or segments < 1:
        raise ValueError(f"`segments` must be an integer >= 1; got {segments!r}.")
    if solver not in _SOLVERS:
        raise ValueError(f"`solver` must be one of {tuple(_SOLVERS)} for a segmented flow; got {solver!r}.")
    if time not in ("auto", "linear", "log"):
        raise ValueError(f"`time` must be 'auto', 'linear' or 'log'; got {time!r}.")
    ctx = ctx or Context()
    objective, theta0 = make_objective(model, data, loss)
    problem = _Problem(objective.X, objective.y, model, objective.loss)
    stop_loss = stop_norm = None
    for e in events or ():
        if type(e).__name__ == "LossBelow":
            stop_loss = math.log(e.target)
        elif type(e).__name__ == "NormAbove":
            stop_norm = float(e.level)
        else:
            raise ValueError(f"`events` of a segmented flow must be LossBelow or NormAbove; got {e!r}.")
    th0 = np.asarray(theta0)
    if atol is None:
        atol = rtol * max(float(np.linalg.norm(th0)), 1e-300)
    T = float(t1) / segments
    ck = ctx.load_checkpoint(name)
    if ck is not None and int(ck["n_params"]) == th0.size and float(ck["t1"]) == float(t1) \
            and int(ck["segments"]) == segments:
        done = int(ck["segment"]) + 1
        ts, thetas = list(ck["ts"]), list(ck["thetas"])
        log_l, norm = list(ck["log_loss"]), list(ck["norm"])
        stats = {k: int(ck[k]) for k in ("num_steps", "num_accepted_steps", "num_rejected_steps", "grad_evals")}
        finished, ok, reason, event = bool(ck["finished"]), bool(ck["success"]), str(ck["reason"]), str(ck["event"])
        resumed_from = done
    else:
        done, ts, thetas, log_l, norm = 0, [0.0], [th0], [float(objective.log_loss(theta0))], \
            [float(np.linalg.norm(th0))]
        stats = {"num_steps": 0, "num_accepted_steps": 0, "num_rejected_steps": 0, "grad_evals": 0}
        finished, ok, reason, event, resumed_from = False, True, "", "", 0
    lo, hi = progress
    k = done
    while k < segments and not finished:
        ctx.progress(lo + (hi - lo) * k / segments, f"{name}: segment {k + 1}/{segments} (t = {k * T:.4g} .. "
                                                    f"{(k + 1) * T:.4g})")
        local = log_times(T, n_save) if k == 0 else np.linspace(0.0, T, n_save)
        tr = _run_segment(problem, np.asarray(thetas[-1]), local, T, rtol, atol, stop_loss, stop_norm, solver, time,
                          max_steps)
        t_start = k * T
        for i in range(1, len(tr.ts)):
            ts.append(t_start + float(tr.ts[i]))
            thetas.append(np.asarray(tr.thetas[i]))
            log_l.append(float(tr.log_loss[i]))
            norm.append(float(tr.norm[i]))
        for key in stats:
            stats[key] += int(tr.stats.get(key) or 0)
        if not tr.result.success or tr.result.event:
            finished, ok, reason, event = True, tr.result.success, _shift_reason(tr.result, t_start), \
                tr.result.event or ""
        elif k == segments - 1:
            finished, ok, reason = True, True, f"reached t1 = {float(t1):g} in {segments} segments"
        ctx.save_checkpoint(name, {
            "segment": k, "segments": segments, "t1": float(t1), "n_params": th0.size,
            "ts": np.asarray(ts), "thetas": np.asarray(thetas), "log_loss": np.asarray(log_l),
            "norm": np.asarray(norm), **stats, "finished": finished, "success": ok, "reason": np.str_(reason),
            "event": np.str_(event),
        })
        k += 1
    ctx.progress(hi, f"{name}: done")
    ll = np.asarray(log_l)
    st = {**stats, "segments": k, "resumed_from": resumed_from, "log_time": None}
    return Trajectory(ts=np.asarray(ts), thetas=np.asarray(thetas), loss=np.exp(ll), log_loss=ll,
                      norm=np.asarray(norm), stats=st, result=FlowResult(ok, reason, event or None),
                      unflatten=objective.unflatten, degree=objective.degree)


def _run_segment(problem, theta0, ts, T, rtol, atol, stop_loss, stop_norm, solver, time, max_steps):
    log_time = time == "log" or (time == "auto" and T > 1e4)
    dt = problem.X.dtype
    save_us = jnp.asarray(np.log1p(ts) if log_time else ts, dt)
    u1 = math.log1p(T) if log_time else T
    ys, u_end, stats, code, mask = _segment(
        problem, jnp.asarray(theta0, dt), save_us, jnp.asarray(u1, dt), jnp.asarray(rtol, dt), jnp.asarray(atol, dt),
        jnp.asarray(stop_loss if stop_loss is not None else 0.0, dt),
        jnp.asarray(stop_norm if stop_norm is not None else 1.0, dt), solver, log_time, stop_loss is not None,
        stop_norm is not None, int(max_steps))
    sub, end = ys
    u_end = float(u_end)
    t_end = math.expm1(u_end) if log_time else u_end
    thetas = np.asarray(sub["theta"])
    keep = np.all(np.isfinite(thetas), axis=1) & (ts <= t_end * (1 + 1e-12))
    out_ts, out_th = list(ts[keep]), list(thetas[keep])
    out_ll, out_n = list(np.asarray(sub["log_loss"])[keep]), list(np.asarray(sub["norm"])[keep])
    th_end = np.asarray(end["theta"])[-1]
    if np.all(np.isfinite(th_end)) and (not out_ts or t_end > out_ts[-1] * (1 + 1e-12)):
        out_ts.append(t_end)
        out_th.append(th_end)
        out_ll.append(float(np.asarray(end["log_loss"])[-1]))
        out_n.append(float(np.asarray(end["norm"])[-1]))
    R = diffrax.RESULTS
    code = int(code)
    event = None
    if code == R.successful._value:
        res = FlowResult(True, f"reached t = {T:g}")
    elif code == R.event_occurred._value:
        m = mask if isinstance(mask, (tuple, list)) else (mask,)
        names = ([f"loss_below_{math.exp(stop_loss):g}"] if stop_loss is not None else []) + \
                ([f"norm_above_{stop_norm:g}"] if stop_norm is not None else [])
        fired = [n for n, b in zip(names, m) if bool(np.asarray(b))]
        event = fired[0] if fired else "event"
        res = FlowResult(True, f"event {event} at t = {t_end:.6g}", event=event)
    elif code == R.max_steps_reached._value:
        res = FlowResult(False, f"max_steps = {max_steps} reached at t = {t_end:.6g} (the flow is stiff? raise "
                                "flow.max_steps)")
    elif code in (R.nonfinite._value, R.nonfinite_input._value):
        res = FlowResult(False, f"the state became non-finite near t = {t_end:.6g} (the flow diverged?)")
    else:
        res = FlowResult(False, f"solver stopped at t = {t_end:.6g}: {R._index_to_message[code]}")
    n = int(stats["num_steps"])
    st = {"num_steps": n, "num_accepted_steps": int(stats["num_accepted_steps"]),
          "num_rejected_steps": int(stats["num_rejected_steps"]), "grad_evals": _SOLVERS[solver][1] * n + 1}
    ll = np.asarray(out_ll)
    return Trajectory(ts=np.asarray(out_ts), thetas=np.asarray(out_th), loss=np.exp(ll), log_loss=ll,
                      norm=np.asarray(out_n), stats=st, result=res, unflatten=None, degree=0)


def _shift_reason(result: FlowResult, t_start: float) -> str:
    r = result.reason
    if t_start > 0:
        r += f" (segment starting at t = {t_start:.6g}; times in the message are from the segment's start)"
    return r
