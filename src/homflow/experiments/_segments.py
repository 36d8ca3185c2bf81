"""A gradient flow integrated in equal segments with a checkpoint after each, so a killed run resumes exactly.

The flow ``d theta/dt = -grad L(theta)`` is autonomous, so the segment ``[k T, (k+1) T]`` is the flow of length ``T``
started at the state reached at ``k T``. An uninterrupted run and a resumed one integrate the very same segments from
the very same (bit-identical, checkpointed) states with the same compiled solve, hence give the same numbers bit for
bit. Equal segment lengths, a fixed number of saved states per segment and an absolute tolerance fixed at the start
(``rtol * ||theta(0)||``) make every segment reuse one compiled solve.
"""

from __future__ import annotations

import numpy as np

from ..flow import FlowResult, Trajectory, gradient_flow, log_times, make_objective
from ._registry import Context

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
    ctx = ctx or Context()
    objective, theta0 = make_objective(model, data, loss)
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
        tr = gradient_flow(model, data, loss=loss, t1=T, ts=local, rtol=rtol, atol=atol, solver=solver, time=time,
                           events=events, max_steps=max_steps, theta0=np.asarray(thetas[-1]))
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


def _shift_reason(result: FlowResult, t_start: float) -> str:
    r = result.reason
    if t_start > 0:
        r += f" (segment starting at t = {t_start:.6g}; times in the message are from the segment's start)"
    return r
