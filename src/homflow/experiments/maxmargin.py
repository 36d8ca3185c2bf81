"""The built-in ``max-margin``: the late phase of gradient flow under exponential (or logistic) loss.

Lyu & Li (arXiv 1906.05890): once the loss is below 1 the smoothed margin ``log(1/L) / ||theta||^L`` is
non-decreasing (Thm 4.1) and lower-bounds the normalized margin; the normalized direction becomes an
``(eps, delta)``-KKT point of ``min 1/2 ||theta||^2 s.t. y_i Phi(theta; x_i) >= 1`` with both going to 0 (docs/math.md
sections 2 and 5). The flow is integrated in log time, in checkpointed segments (resumable), by the solver
:func:`homflow.flow.select_solver` picks (config key ``solver = 'default'``): for the default leaky-ReLU network, and
ReLU, the non-smooth flow :class:`homflow.flow.Clarke` (a differential inclusion; the smooth engine stalls in a sliding
mode on sphere and teacher data, docs/nonsmooth.md); a name of :data:`homflow.flow.SOLVERS` forces another. The KKT
measures along the flow and the polished point's certificate use Clarke subgradients at kinks
(:func:`homflow.kkt.max_margin_kkt`, :func:`homflow.kkt.solve_max_margin`).
"""

from __future__ import annotations

import math

import jax
import numpy as np

from .. import data as hdata
from ..activations import get_activation
from ..flow import SOLVERS
from ..models import TwoLayer
from ._registry import Context, Figure, Outcome, check, register
from ._segments import segmented_flow
from .phases import info
from ._solverstats import SolverLog

__all__ = ["late_phase", "MAX_MARGIN_DEFAULTS"]

MAX_MARGIN_DEFAULTS = {
    "data": "gaussian_toy",
    "n": 20,
    "d": 3,
    "data_seed": None,
    "width": 8,
    "activation": "leaky_relu",
    "p": 1,
    "alpha": 0.1,
    "scale": 0.5,
    "seed": 0,
    "loss": "exponential",
    "t1": 1e9,
    "segments": 4,
    "n_save": 30,
    "rtol": 1e-8,
    "monotone_tol": 1e-6,
    "shrink_factor": 0.5,
    "stationarity_tol": 0.05,
    "kkt_gap_tol": 0.05,
    "active_tol": 0.1,
    "solver": "default",
}
MAX_MARGIN_QUICK = {"t1": 1e8, "segments": 2, "n_save": 15}


def _validate(p: dict) -> None:
    for k in ("seed", "data_seed"):
        v = p[k]
        if not (v is None and k == "data_seed") and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"config key `{k}` must be an integer >= 0" + (" (or unset: the data from `seed`)" if
                             k == "data_seed" else "") + f"; got {v!r}.")
    if p["data"] not in ("gaussian_toy", "teacher_student", "sphere"):
        raise ValueError(f"config key `data` must be one of ('gaussian_toy', 'teacher_student', 'sphere'); got "
                         f"{p['data']!r}.")
    if p["loss"] not in ("exponential", "logistic"):
        raise ValueError(f"config key `loss` must be 'exponential' or 'logistic' for the late phase; got {p['loss']!r}.")
    for k in ("n", "d", "width", "segments", "n_save", "p"):
        if p[k] < 1:
            raise ValueError(f"config key `{k}` must be an integer >= 1; got {p[k]!r}.")
    for k in ("scale", "t1", "rtol", "monotone_tol", "shrink_factor", "stationarity_tol", "kkt_gap_tol", "active_tol"):
        if not p[k] > 0:
            raise ValueError(f"config key `{k}` must be > 0; got {p[k]!r}.")
    get_activation(p["activation"], p=p["p"], alpha=p["alpha"])
    solvers = ("default",) + tuple(SOLVERS)
    if not (isinstance(p["solver"], str) and p["solver"].lower() in solvers):
        raise ValueError(f"config key `solver` must be one of {solvers}; got {p['solver']!r}.")


def _data(p: dict):
    """The data set of ``p['data']``, drawn from ``data_seed`` (default: ``seed``, which also draws the network)."""
    seed = p["seed"] if p["data_seed"] is None else p["data_seed"]
    if p["data"] == "gaussian_toy":
        return hdata.gaussian_toy(p["n"], separable=True, seed=seed)
    if p["data"] == "sphere":
        return hdata.sphere(p["n"], p["d"], seed=seed, labels="linear")
    return hdata.teacher_student(p["n"], p["d"], teacher_width=2, p=1, seed=seed, labels="sign")


def late_phase(model, data, *, loss: str, t1: float, segments: int, n_save: int, rtol: float, ctx: Context,
               name: str = "late", progress=(0.0, 0.8), theta0=None, prefix: str = "",
               monotone_tol: float = 1e-6, shrink_factor: float = 0.5, stationarity_tol: float = 0.1,
               kkt_gap_tol: float = 0.05, solve_kkt: bool = True, active_tol: float = 0.1, solver=None):
    """Integrate the late phase and measure it: returns ``(trajectory, arrays, checks, figures, summary)``.

    Checks: the smoothed margin is non-decreasing once ``L < 1`` (relative decrease ``<= monotone_tol``) and stays
    below the normalized margin (both hold at every finite t). The ``(eps, delta)``-KKT convergence of the direction
    has no rate at a finite ``t1`` in 1906.05890: when the relative stationarity at ``t1`` is below
    ``stationarity_tol`` and has shrunk by ``shrink_factor``, the direction counts as converged and the normalized
    margin is checked to be within ``kkt_gap_tol`` (relative) of the KKT point polished from the final direction
    (:func:`homflow.kkt.solve_max_margin`); otherwise both are reported as informational lines (raise ``t1``). A
    flow that has not separated the data by ``t1`` (no point with ``L < 1``) is reported, not failed. ``solver``:
    as for :func:`homflow.experiments.segmented_flow` (``None``: :func:`homflow.flow.select_solver`'s choice).
    """
    from ..kkt import margin_along, solve_max_margin

    tag = f"{prefix.rstrip('_')} phase: " if prefix else ""

    if theta0 is not None:
        from ..models import unflatten_like

        model = unflatten_like(model, jax.numpy.asarray(theta0))
    traj = segmented_flow(model, data, loss=loss, t1=t1, segments=segments, n_save=n_save, rtol=rtol, ctx=ctx,
                          name=name, progress=progress, solver=solver)
    ctx.progress(progress[1], f"{name}: margins and (eps, delta)-KKT along the flow")
    path = margin_along(traj, data, loss=loss, active_tol=active_tol)
    v = path.valid
    arrays = {f"{prefix}t": np.asarray(traj.ts), f"{prefix}loss": np.asarray(traj.loss),
              f"{prefix}log_loss": np.asarray(traj.log_loss), f"{prefix}norm": np.asarray(traj.norm),
              f"{prefix}theta_final": np.asarray(traj.thetas[-1])}
    for k, a in path.arrays(prefix + "margin_").items():
        arrays[k] = np.asarray(a, dtype=float)
    log = SolverLog()
    log.add(name, traj)
    checks, summary = [], {"reason": traj.reason, "t_final": float(traj.ts[-1]),
                           "log_loss_final": float(traj.log_loss[-1]), "valid_points": int(v.sum()), **log.summary()}
    checks.append(check(f"{tag}flow reached t1", 1.0 if traj.success else 0.0, 1.0, ">=",
                        traj.reason))
    if v.sum() >= 2:
        s = path.smoothed[v]
        q = path.normalized[v]
        dec = np.maximum(s[:-1] - s[1:], 0.0) / np.maximum(np.abs(s[1:]), 1e-300)
        checks.append(check(f"{tag}smoothed margin non-decreasing once L < 1 (max relative decrease)",
                            float(dec.max()), monotone_tol, "<=", "Lyu & Li 1906.05890 Thm 4.1 (exact along the flow; the "
                            "tolerance allows the solver's relative accuracy)"))
        checks.append(check(f"{tag}smoothed margin <= normalized margin (max excess)", float(np.max(s - q)),
                            1e-10, "<=", "the smoothed margin lower-bounds the normalized margin (an inequality; "
                            "rounding-level tolerance)"))
        st = path.stationarity[v]
        # 1906.05890 proves (eps, delta) -> 0 as t -> inf, with no rate at a finite t1: the stationarity is a measure of
        # how far along the flow is. Below `stationarity_tol` the direction is taken as converged and its margin is
        # checked against the polished KKT point; above it, that is reported, not failed.
        converged = bool(st[-1] <= stationarity_tol and st[-1] <= shrink_factor * st[0])
        how = (f"relative stationarity eps/||theta|| {st[0]:.3g} at the first late point, {st[-1]:.3g} at t1 "
               f"(converged when <= stationarity_tol = {stationarity_tol:g} and <= shrink_factor = {shrink_factor:g} "
               "x the first)")
        if converged:
            checks.append(check(f"{tag}(eps, delta)-KKT: relative stationarity at t1", float(st[-1]),
                                stationarity_tol, "<=", f"1906.05890: eps -> 0 (docs/math.md 5); {how}"))
        else:
            checks.append(info(f"{tag}(eps, delta)-KKT: relative stationarity at t1", float(st[-1]),
                               stationarity_tol, f"not converged by t1 (1906.05890 gives no rate; raise t1): {how}"))
        arrays[f"{prefix}kkt_residuals"] = np.array([st[-1], float(path.feasibility[v][-1]),
                                                     abs(float(path.slackness[v][-1]))])
        arrays[f"{prefix}kkt_index"] = np.arange(3.0)
        summary.update(smoothed_final=float(s[-1]), normalized_final=float(q[-1]), stationarity_final=float(st[-1]),
                       delta_final=float(path.delta[v][-1]), n_support=int(path.n_support[v][-1]))
        if solve_kkt:
            ctx.progress(progress[1], f"{name}: polishing the max-margin KKT point")
            try:
                kkt = solve_max_margin(traj.final, data)
                gap = abs(kkt.normalized_margin - q[-1]) / abs(kkt.normalized_margin)
                cert = (f"Clarke certificate (any slope in [alpha, 1] at {kkt.n_kinks} pre-activations within "
                        f"{kkt.kink_tol:.1e} of a kink; one-subgradient stationarity {kkt.smooth_stationarity:.2e})"
                        if kkt.clarke else "gradient certificate (no kinked activation)")
                desc = (f"1906.05890: the direction converges to a KKT point (threshold from a convergence study); "
                        f"KKT point converged: {kkt.converged} ({kkt.reason}); stationarity {kkt.stationarity:.2e}, "
                        f"{cert}")
                # the gap is a check only against a certified reference: a polish that failed (e.g. its margin
                # collapsed) says nothing about the flow, and is reported with its reason instead
                certified = bool(kkt.converged)
                label = f"{tag}normalized margin vs polished KKT point (relative gap)"
                if converged and certified:
                    checks.append(check(label, gap, kkt_gap_tol, "<=", desc))
                else:
                    why = ("the flow has not converged by t1 (see the stationarity)" if not converged else
                           "the polish from the final direction found no certified KKT point to compare with")
                    checks.append(info(label, gap, kkt_gap_tol, f"{why}; {desc}"))
                summary.update(kkt_normalized_margin=float(kkt.normalized_margin), kkt_converged=bool(kkt.converged),
                               kkt_stationarity=float(kkt.stationarity), kkt_reason=str(kkt.reason),
                               kkt_clarke=bool(kkt.clarke), kkt_n_kinks=int(kkt.n_kinks),
                               kkt_smooth_stationarity=float(kkt.smooth_stationarity))
                arrays[f"{prefix}kkt_polished_residuals"] = np.array([kkt.stationarity, kkt.feasibility,
                                                                      abs(kkt.slackness)])
                if certified:  # the line drawn on the margins figure
                    arrays[f"{prefix}kkt_normalized_margin"] = np.array([kkt.normalized_margin])
            except ValueError as e:
                summary["kkt_error"] = str(e)
    else:
        checks.append(info(f"{tag}late phase reached (saved points with L < 1 and q_min > 0)", float(v.sum()), 2.0,
                           "1906.05890's theorems hold once L < 1 (the data separated); not reached by t1: raise t1 "
                           "(or the network cannot separate these data)"))
    figs = [Figure(f"{prefix}loss_norm", f"{tag}loss and norm", f"{prefix}t",
                   (f"{prefix}loss", f"{prefix}norm"), ("loss", "||theta||"), xlabel="t", logx=True, logy=True,
                   display="loss_norm")]
    if v.sum() >= 2:
        hl = (float(arrays[f"{prefix}kkt_normalized_margin"][0]),) if f"{prefix}kkt_normalized_margin" in arrays \
            else ()
        figs.append(Figure(f"{prefix}margins", f"{tag}margins" + (" (line: polished KKT point)" if hl else ""), f"{prefix}margin_ts",
                           (f"{prefix}margin_normalized", f"{prefix}margin_smoothed"),
                           ("normalized margin", "smoothed margin"), xlabel="t", logx=True, hlines=hl,
                           display="margins"))
        figs.append(Figure(f"{prefix}eps_delta", f"{tag}(eps, delta)-KKT along the flow", f"{prefix}margin_ts",
                           (f"{prefix}margin_stationarity", f"{prefix}margin_slackness"),
                           ("stationarity eps/||theta||", "slackness delta/sum lambda"), xlabel="t", logx=True,
                           display="errors"))
    if f"{prefix}kkt_residuals" in arrays:
        figs.append(Figure(f"{prefix}kkt", f"{tag}(eps, delta)-KKT residuals of the final direction",
                           f"{prefix}kkt_index", (f"{prefix}kkt_residuals",),
                           ("stationarity", "feasibility", "slackness"), display="kkt"))
    if f"{prefix}kkt_polished_residuals" in arrays:
        figs.append(Figure(f"{prefix}kkt_polished", f"{tag}KKT residuals of the polished max-margin point",
                           f"{prefix}kkt_index", (f"{prefix}kkt_polished_residuals",),
                           ("stationarity", "feasibility", "slackness"), display="kkt"))
    return traj, arrays, checks, figs, summary


@register("max-margin", description="Late phase under exponential loss: smoothed margin non-decreasing, "
                                    "(eps, delta)-KKT shrinking, direction -> max-margin KKT point (1906.05890).",
          defaults=MAX_MARGIN_DEFAULTS, quick=MAX_MARGIN_QUICK, validate=_validate)
def max_margin(params: dict, ctx: Context) -> Outcome:
    p = params
    data = _data(p)
    act = get_activation(p["activation"], p=p["p"], alpha=p["alpha"])
    model = TwoLayer(data.d, p["width"], act, key=jax.random.PRNGKey(p["seed"]), scale=p["scale"])
    _, arrays, checks, figs, summary = late_phase(
        model, data, loss=p["loss"], t1=p["t1"], segments=p["segments"], n_save=p["n_save"], rtol=p["rtol"],
        ctx=ctx, monotone_tol=p["monotone_tol"], shrink_factor=p["shrink_factor"],
        stationarity_tol=p["stationarity_tol"], kkt_gap_tol=p["kkt_gap_tol"], active_tol=p["active_tol"],
        solver=p["solver"])
    summary = {k: v for k, v in summary.items() if not (isinstance(v, float) and not math.isfinite(v))}
    return Outcome(checks=checks, arrays=arrays, figures=figs, summary=summary)
