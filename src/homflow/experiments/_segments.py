"""A gradient flow integrated in equal segments with a checkpoint after each, so a killed run resumes exactly.

The flow ``d theta/dt = -grad L(theta)`` is autonomous, so the segment ``[k T, (k+1) T]`` is the flow of length ``T``
started at the state reached at ``k T``. An uninterrupted run and a resumed one integrate the very same segments from
the very same (bit-identical, checkpointed) states with the same compiled solve, hence give the same numbers bit for
bit. Each segment is one call of :func:`homflow.flow.integrate` (the one integrate path) with the solver object the
config names, or by default the one :func:`homflow.flow.gradient_flow` picks (:func:`homflow.flow.select_solver`:
the non-smooth solver :class:`homflow.flow.Clarke` for ReLU / leaky-ReLU networks without stop events, whose flow is a
differential inclusion, docs/nonsmooth.md; else ``'auto'``, homflow's stiff-aware engine). A non-smooth segment starts
from the previous segment's end state and reads its mode (activation pattern, units sliding on a kink) off that state
(a sliding unit ends a segment projected onto its kink, so it is found there again). The absolute tolerance is fixed
once from ``theta(0)`` (:func:`homflow.flow.default_atol`), so the segments together are the one-shot flow restarted at
the segment boundaries (equal to it to the tolerance). The compiled solve is reused across segments and calls.
"""

from __future__ import annotations


import numpy as np

from ..flow import (RESULTS, LossBelow, NormAbove, Trajectory, default_atol, integrate, log_times, make_problem,
                    select_solver)
from ._registry import Context

__all__ = ["segmented_flow", "DEFAULT_SOLVER"]

DEFAULT_SOLVER = "default"
"""The config value of ``flow.solver`` that leaves the choice to :func:`homflow.flow.select_solver` (as ``None``)."""

# Counters summed over segments (the engines' and the non-smooth solver's), maxima over segments, and float sums (the
# non-smooth solver's dissipated energy ``int ||dtheta/dt||^2``, additive over segments).
_COUNT_KEYS = ("num_steps", "num_accepted_steps", "num_rejected_steps", "grad_evals", "num_stiff_steps",
               "num_locate_steps", "events", "pattern_changes", "sliding_entered", "sliding_left")
_MAX_KEYS = ("max_sliding",)
_FLOAT_SUM_KEYS = ("energy",)


def segmented_flow(model, data, *, loss, t1: float, segments: int = 4, n_save: int = 25, rtol: float = 1e-8,
                   atol: float | None = None, solver=None, time: str = "auto", events=None,
                   max_steps: int = 1_000_000, ctx: Context | None = None, name: str = "flow",
                   progress: tuple[float, float] = (0.0, 1.0)) -> Trajectory:
    """Integrate the gradient flow of ``model`` on ``data`` to ``t1`` in ``segments`` equal segments.

    Arguments:
        model, data, loss, rtol, time, events, max_steps: as for :func:`homflow.flow.gradient_flow` (``events``:
            :class:`homflow.flow.LossBelow` / :class:`homflow.flow.NormAbove`).
        solver: a name of :data:`homflow.flow.SOLVERS` or a solver object, forced for every segment; ``None`` or
            ``'default'`` (default): :func:`homflow.flow.select_solver`'s choice, as in
            :func:`homflow.flow.gradient_flow` (:class:`homflow.flow.Clarke` for ReLU / leaky-ReLU networks without
            ``events``, else ``'auto'``).
        t1: final time; segments: number of equal segments (one checkpoint after each).
        n_save: saved states per segment (the first segment's are log-spaced, the others evenly spaced).
        atol: absolute tolerance, default :func:`homflow.flow.default_atol` of ``theta(0)`` for every segment.
        ctx: the runner's :class:`Context`: checkpoints under ``name`` (resumed from when present), progress reports
            mapped into the ``progress`` interval.

    Returns:
        A :class:`homflow.flow.Trajectory` over the whole flow (``stats`` summed over segments: steps, gradient
        evaluations and, for the non-smooth solver, events, pattern changes, sliding modes entered / left and
        ``energy``; ``stats['segments']`` the number integrated, ``stats['resumed_from']`` the segment a resume started
        at). A failed segment ends the flow with its ``result`` and ``reason`` (no exception: what was computed is
        kept).

    Raises:
        ValueError: for bad ``segments`` / ``time`` / ``events`` or an unknown solver; for a forced non-smooth solver
            with ``events`` (it does not support them).
    """
    if isinstance(segments, bool) or int(segments) != segments or segments < 1:
        raise ValueError(f"`segments` must be an integer >= 1; got {segments!r}.")
    if time not in ("auto", "linear", "log"):
        raise ValueError(f"`time` must be 'auto', 'linear' or 'log'; got {time!r}.")
    for e in events or ():
        if not isinstance(e, (LossBelow, NormAbove)):
            raise ValueError(f"`events` of a segmented flow must be LossBelow or NormAbove; got {e!r}.")
    ctx = ctx or Context()
    problem, theta0 = make_problem(model, data, loss)
    th0 = np.asarray(theta0)
    solver = select_solver(problem, theta0, None if _is_default(solver) else solver, events=events, rtol=rtol,
                           atol=atol)
    if events and solver.name == "clarke":
        raise ValueError("`events` (stop_loss / stop_norm) are not supported by the non-smooth solver 'clarke'; "
                         "stop at t1 instead, or name a smooth solver.")
    if solver.atol is None:
        solver = solver.with_tolerances(atol=float(default_atol(solver.rtol, th0)[0]))
    T = float(t1) / segments
    ck = ctx.load_checkpoint(name)
    # a checkpoint of another flow (size, horizon, segments, or solver: older checkpoints name none) is not resumed
    if ck is not None and int(ck["n_params"]) == th0.size and float(ck["t1"]) == float(t1) \
            and int(ck["segments"]) == segments and str(ck["solver"] if "solver" in ck else solver.name) == solver.name:
        done = int(ck["segment"]) + 1
        ts, thetas = list(ck["ts"]), list(ck["thetas"])
        log_l, norm = list(ck["log_loss"]), list(ck["norm"])
        stats = {k: int(ck[k]) for k in _COUNT_KEYS + _MAX_KEYS if k in ck}
        stats.update({k: float(ck[k]) for k in _FLOAT_SUM_KEYS if k in ck})
        finished, reason, event = bool(ck["finished"]), str(ck["reason"]), str(ck["event"])
        res_name = str(ck["result"]) if "result" in ck else ("successful" if bool(ck["success"]) else "internal_error")
        resumed_from = done
    else:
        done, ts, thetas, log_l, norm = 0, [0.0], [th0], [float(problem.log_loss(theta0))], \
            [float(np.linalg.norm(th0))]
        stats = {k: 0 for k in _COUNT_KEYS[:5]}
        finished, reason, event, res_name, resumed_from = False, "", "", "successful", 0
    lo, hi = progress
    k = done
    while k < segments and not finished:
        ctx.progress(lo + (hi - lo) * k / segments, f"{name}: segment {k + 1}/{segments} (t = {k * T:.4g} .. "
                                                    f"{(k + 1) * T:.4g})")
        local = log_times(T, n_save) if k == 0 else np.linspace(0.0, T, n_save)
        tr = integrate(problem, solver, np.asarray(thetas[-1]), t1=T, ts=local, time=time, events=events or None,
                       max_steps=max_steps, throw=False)
        t_start = k * T
        for i in range(1, len(tr.ts)):
            ts.append(t_start + float(tr.ts[i]))
            thetas.append(np.asarray(tr.thetas[i]))
            log_l.append(float(tr.log_loss[i]))
            norm.append(float(tr.norm[i]))
        _accumulate(stats, tr.stats)
        if not tr.success or tr.event:
            finished, res_name, reason, event = True, tr.result_name, _shift_reason(tr.reason, t_start), \
                tr.event or ""
        elif k == segments - 1:
            finished, res_name = True, "successful"
            reason = (f"reached t1 = {float(t1):g} in {segments} segments ({solver.name}, {stats['grad_evals']} "
                      "gradient evaluations)")
        ctx.save_checkpoint(name, {
            "segment": k, "segments": segments, "t1": float(t1), "n_params": th0.size, "solver": np.str_(solver.name),
            "ts": np.asarray(ts), "thetas": np.asarray(thetas), "log_loss": np.asarray(log_l),
            "norm": np.asarray(norm), **stats, "finished": finished, "success": res_name in ("successful",
                                                                                             "event_occurred"),
            "result": np.str_(res_name), "reason": np.str_(reason), "event": np.str_(event),
        })
        k += 1
    ctx.progress(hi, f"{name}: done")
    ll = np.asarray(log_l)
    st = {"solver": solver.name, **stats, "segments": k, "resumed_from": resumed_from}
    return Trajectory(ts=np.asarray(ts), thetas=np.asarray(thetas), loss=np.exp(ll), log_loss=ll,
                      norm=np.asarray(norm), stats=st, result=getattr(RESULTS, res_name), unflatten=problem.unflatten,
                      degree=problem.degree, reason=reason, event=event or None)


def _is_default(solver) -> bool:
    return solver is None or (isinstance(solver, str) and solver.lower() == DEFAULT_SOLVER)


def _accumulate(stats: dict, seg: dict) -> None:
    """Add one segment's ``stats`` into the running ``stats`` (counters and energy summed, maxima kept); keys a solver
    does not report stay absent (the smooth engines' five counters are always there)."""
    for key in _COUNT_KEYS:
        if key in stats or seg.get(key) is not None:
            stats[key] = stats.get(key, 0) + int(seg.get(key) or 0)
    for key in _MAX_KEYS:
        if seg.get(key) is not None:
            stats[key] = max(stats.get(key, 0), int(seg[key]))
    for key in _FLOAT_SUM_KEYS:
        if seg.get(key) is not None:
            stats[key] = stats.get(key, 0.0) + float(seg[key])


def _shift_reason(reason: str, t_start: float) -> str:
    if t_start > 0:
        reason += f" (segment starting at t = {t_start:.6g}; times in the message are from the segment's start)"
    return reason
