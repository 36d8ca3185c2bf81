"""After the escape (arXiv 2502.15952, docs/math.md section 4): the limiting path ``p(t)`` (the flow from ``b * u*``,
time-shifted so that its norm crosses a fixed level at ``t = 0``, as ``b -> 0``), the first saddle it reaches and the
sparsity pattern it keeps."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..flow import SolverError
from ..kkt import group_norms, polish_ncf, zero_preserving_groups
from ..models import AbstractHomogeneousModel
from ._saddles import analyse_plateaus, hessian_extremes, polish_critical_point, relative_gradient_norm, \
    classify_point
from ._solve import integrate, make_problem
from ._sparsity import group_norm_track, remove_neurons

__all__ = ["LimitingPath", "limiting_path", "FirstSaddle", "first_saddle"]

_NEVER = 1e12  # a norm level no flow here reaches: integrate to t1


@dataclasses.dataclass(frozen=True)
class LimitingPath:
    """Shifted flows from ``b * u*``: ``paths[k][i]`` is the state ``taus[i]`` after the norm crossed ``level``,
    started from ``bs[k] * u*``; ``distances[k] = max_i ||paths[k][i] - paths[k+1][i]||`` (should shrink as ``b -> 0``);
    ``real`` (if a real flow was given) is the real flow shifted the same way and ``real_distance`` its largest distance
    from the last (smallest ``b``) path; ``losses`` (K, T) the losses along each path."""

    bs: np.ndarray
    taus: np.ndarray
    level: float
    paths: np.ndarray
    losses: np.ndarray
    distances: np.ndarray
    real: np.ndarray | None
    real_losses: np.ndarray | None
    real_distance: float


def _shifted(problem, theta0, level, taus, t_max, rtol, max_steps):
    hit = integrate(problem, theta0, t1=t_max, level=level, rtol=rtol, max_steps=max_steps)
    if not hit.reached:
        raise ValueError(f"the flow from norm {np.linalg.norm(theta0):.3g} did not reach the level {level:g} "
                         f"by t = {t_max:g}.")
    sol = integrate(problem, hit.theta_end, t1=float(taus[-1]), level=_NEVER, ts=taus, rtol=rtol,
                    atol=rtol * level, max_steps=max_steps)
    if sol.thetas.shape[0] < taus.size:
        raise SolverError(f"the shifted flow stopped at tau = {sol.t_end:.4g} before {taus[-1]:g}: {sol.reason}",
                          sol.result)
    return sol.thetas, np.exp(sol.values)


def limiting_path(model: AbstractHomogeneousModel, data, u_star, *, loss="square", bs=(1e-2, 1e-3, 1e-4),
                  level: float = 0.1, tau_max: float = 100.0, n_save: int = 100, real_delta: float | None = None,
                  rtol: float = 1e-9, max_steps: int = 200_000) -> LimitingPath:
    """Compute the limiting path from the KKT direction ``u_star`` (docs/math.md section 4).

    Arguments:
        model: the architecture (and, with ``real_delta``, the direction ``theta_hat`` of the real flow).
        u_star: a flat unit vector (normalised here), e.g. a certified positive KKT point of the NCF.
        bs: decreasing initial scales ``b``; level: the norm that defines ``t = 0``; tau_max, n_save: the shifted times
            ``linspace(0, tau_max, n_save)``.
        real_delta: also shift the real flow from ``real_delta * theta_hat`` and compare it with the last path.
    """
    problem, theta = make_problem(model, data, loss)
    u = np.asarray(u_star, float)
    if u.shape != theta.shape:
        raise ValueError(f"`u_star` must have shape {theta.shape}; got {u.shape}.")
    u = u / np.linalg.norm(u)
    bs = np.asarray(bs, float)
    if bs.ndim != 1 or bs.size < 2 or np.any(bs <= 0) or np.any(bs >= level) or np.any(np.diff(bs) >= 0):
        raise ValueError(f"`bs` must be >= 2 decreasing scales in (0, level = {level:g}); got {bs!r}.")
    taus = np.linspace(0.0, float(tau_max), int(n_save))
    L = problem.degree
    t_max = lambda b: 1e4 / b ** max(L - 2, 0) if L > 2 else 1e4 * (1 + math.log(level / b))  # noqa: E731
    paths, losses = zip(*[_shifted(problem, b * u, level, taus, t_max(b), rtol, max_steps) for b in bs])
    paths, losses = np.stack(paths), np.stack(losses)
    dist = np.array([np.max(np.linalg.norm(paths[k] - paths[k + 1], axis=1)) for k in range(len(bs) - 1)])
    real = real_l = None
    real_d = float("nan")
    if real_delta is not None:
        th_hat = np.asarray(theta) / np.linalg.norm(theta)
        real, real_l = _shifted(problem, real_delta * th_hat, level, taus, t_max(real_delta), rtol, max_steps)
        real_d = float(np.max(np.linalg.norm(real - paths[-1], axis=1)))
    return LimitingPath(bs, taus, float(level), paths, losses, dist, real, real_l, real_d)


@dataclasses.dataclass(frozen=True)
class FirstSaddle:
    """The first saddle after the escape of the real flow from ``model``, and the sparsity kept until then.

    Attributes:
        ts, thetas, losses: the flow saved on a linear grid from before the escape to ``t_escape + t_after``.
        t_escape: when ``||theta||`` reached ``factor * delta``; plateaus: :func:`analyse_plateaus` of that window.
        theta: the polished saddle; loss, grad_norm, rel_grad_norm, lam_min, lam_max, kind: measured there.
        u_star: the certified KKT point (``polish_ncf`` of the direction at the escape); u_star_residual its relative
            residual; sparse_groups: the zero-preserving groups exactly zero at ``u_star``.
        sparse_track: their norms along ``thetas`` (T, k); sparse_max_before_saddle: the largest of them up to the
            saddle (an absolute norm; compare with ``delta``); saddle_sparse_norm: their joint norm at the polished
            saddle.
        reduced_rel_grad_norm, reduced_lam_min: the saddle restricted to the network without those neurons.
    """

    ts: np.ndarray
    thetas: np.ndarray
    losses: np.ndarray
    t_escape: float
    plateaus: list
    theta: np.ndarray
    loss: float
    grad_norm: float
    rel_grad_norm: float
    lam_min: float
    lam_max: float
    kind: str
    u_star: np.ndarray
    u_star_residual: float
    u_star_certified: bool
    sparse_groups: np.ndarray
    sparse_track: np.ndarray
    sparse_max_before_saddle: float
    saddle_sparse_norm: float
    reduced_rel_grad_norm: float
    reduced_lam_min: float


def first_saddle(model: AbstractHomogeneousModel, data, *, loss="square", factor: float = 100.0,
                 t_after: float | None = None, n_save: int = 200, rtol: float = 1e-9, slope_tol: float = 1e-3,
                 max_steps: int = 200_000) -> FirstSaddle:
    """Follow the real flow from ``model`` (``delta * theta_hat``) through its escape to the first saddle.

    Arguments:
        factor: the escape is at ``||theta|| = factor * delta``.
        t_after: how long to follow the flow after the escape (default ``0.3 * t_escape``, at least 50).
        n_save: points of the linear save grid on ``[0.9 t_escape, t_escape + t_after]``.
        slope_tol: plateau detection (see :func:`segment_plateaus`).

    Raises:
        ValueError: if the flow does not escape, or no saddle plateau is met in the window.
    """
    problem, theta = make_problem(model, data, loss)
    delta = float(np.linalg.norm(theta))
    L = problem.degree
    hit = integrate(problem, theta, t1=1e5 / delta ** max(L - 2, 0), level=factor * delta, rtol=rtol,
                    max_steps=max_steps)
    if not hit.reached:
        raise ValueError(f"the flow did not escape (norm {factor:g} * delta) by t = {hit.t_end:.4g}.")
    t_esc = hit.t_end
    t_after = max(0.3 * t_esc, 50.0) if t_after is None else float(t_after)
    ts = np.concatenate([[0.0], np.linspace(0.9 * t_esc, t_esc + t_after, int(n_save))])
    sol = integrate(problem, theta, t1=float(ts[-1]), level=_NEVER, ts=ts, rtol=rtol, max_steps=max_steps)
    thetas = sol.thetas
    losses = np.exp(sol.values)
    pls = analyse_plateaus(model, data, sol.ts, thetas, loss=loss, slope_tol=slope_tol,
                           origin_norm=10 * factor * delta)
    sad = [p for p in pls if p.kind != "origin" and p.t > t_esc]
    if not sad:
        raise ValueError(f"no plateau after the escape (t = {t_esc:.4g}) up to t = {ts[-1]:.4g}; raise `t_after`.")
    p0 = sad[0]
    th, g, r = polish_critical_point(problem, thetas[p0.index])
    lo, hi = hessian_extremes(problem, th)
    kind = classify_point(lo, hi, r)
    # The KKT point the early phase aligned with, certified, and its vanishing neurons.
    groups = zero_preserving_groups(model)
    pt = polish_ncf(problem.unflatten(hit.theta_end), data, loss=loss)
    u_star = np.asarray(pt.theta)
    zero = np.asarray([g_ for g_ in range(len(groups)) if group_norms(u_star, [groups[g_]])[0] == 0.0], dtype=int)
    track = group_norm_track(thetas, groups, zero)
    upto = sol.ts <= p0.t
    smax = float(track[upto].max()) if zero.size else 0.0
    s_sad = float(np.linalg.norm(th[np.concatenate([groups[g_] for g_ in zero])])) if zero.size else 0.0
    red_r, red_lo = float("nan"), float("nan")
    if zero.size and zero.size < len(groups):
        small = remove_neurons(problem.unflatten(th), zero)
        rp, rth = make_problem(small, data, loss)
        red_r = relative_gradient_norm(rp, rth)[1]
        red_lo = hessian_extremes(rp, rth)[0]
    return FirstSaddle(sol.ts, thetas, losses, t_esc, pls, th, float(problem.value(th)), g, r, lo, hi, kind,
                       u_star, float(pt.relative_residual), bool(pt.certified), zero, track, smax, s_sad, red_r,
                       red_lo)


