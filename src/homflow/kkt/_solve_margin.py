"""Polish a network into a certified KKT point of the max-margin problem (docs/math.md section 5, arXiv 1906.05890).

Two stages. (1) Optional SLSQP on ``min 1/2 ||theta||^2`` s.t. ``q_i(theta) >= 1`` (SciPy, with JAX gradients and
Jacobians) to get near a KKT point from a rough start. (2) Active-set Newton on the KKT system of the support ``S``:
``theta - G_S(theta)^T lambda_S = 0``, ``q_S(theta) = 1``, Jacobian ``[[I - sum lambda_i Hess q_i, -G_S^T], [G_S, 0]]``
solved by least squares (minimum-norm steps where symmetries make it singular); a constraint with a negative
multiplier leaves ``S``, a violated one joins it. The result is re-certified from scratch by :func:`max_margin_kkt`
(NNLS over the near-active set).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize

from ..models import AbstractHomogeneousModel, flatten
from ._clarke import DEFAULT_KINK_TOL, DEFAULT_MAX_PATTERNS
from ._clarke_sqp import clarke_sqp
from ._kink_newton import _margins, cell_slsqp, kink_newton
from ._margin import (
    DEFAULT_FEAS_TOL,
    MARGIN_COLLAPSED,
    TOO_FAR,
    MarginKKT,
    MarginProblem,
    _kkt_from_theta,
    _margins_jac,
    make_margin_problem,
    resolve_clarke,
)

__all__ = ["solve_max_margin"]


@eqx.filter_jit
def _weighted_hessian(prob: MarginProblem, theta, lam):
    return prob.weighted_hessian(theta, lam)


def _slsqp(prob: MarginProblem, theta, maxiter):
    f = lambda t: (0.5 * float(t @ t), t)  # noqa: E731

    def cons(t):
        return np.asarray(_margins_jac(prob, jnp.asarray(t))[0]) - 1.0

    def cons_jac(t):
        return np.asarray(_margins_jac(prob, jnp.asarray(t))[1])

    res = minimize(f, np.asarray(theta), jac=True, method="SLSQP",
                   constraints=[{"type": "ineq", "fun": cons, "jac": cons_jac}],
                   options={"maxiter": int(maxiter), "ftol": 1e-15})
    return res.x, res


def _active_set_newton(prob: MarginProblem, theta, S, lam_S, *, tol, max_iter, max_rounds, feas_tol):
    """Damped active-set Newton on ``F = (theta - G_S^T lam_S, q_S - 1)``.

    Each Newton step (least squares on the KKT Jacobian) is backtracked (halving, at most 30 times) until the merit
    ``||F||`` decreases by the Armijo factor and every margin stays positive, so a start that is not yet near a KKT
    point is not thrown away by a full step (a full step can leave every ReLU^p unit off, i.e. ``q = 0``). Returns
    ``(theta, iterations, message)``; ``message`` is empty when the active set settled.
    """
    theta = np.asarray(theta, dtype=np.float64)
    n = int(prob.y.shape[0])
    P = theta.size
    its = 0
    msg = ""

    def residual(th, S, lam_S):
        q, G = (np.asarray(a) for a in _margins_jac(prob, jnp.asarray(th)))
        return np.concatenate([th - G[S].T @ lam_S, q[S] - 1.0]), q, G

    def hessian(th, S, lam_S):
        lam = np.zeros(n)
        lam[S] = lam_S
        return np.asarray(_weighted_hessian(prob, jnp.asarray(th), jnp.asarray(lam)))

    for _ in range(max_rounds):
        S = np.asarray(sorted(set(int(i) for i in S)), dtype=np.int64)
        lam_S = np.asarray(lam_S, dtype=np.float64)
        F, q, G = residual(theta, S, lam_S)
        for _ in range(max_iter):
            if np.linalg.norm(F[:P]) <= tol * np.linalg.norm(theta) and np.linalg.norm(F[P:]) <= tol:
                break
            Hw = hessian(theta, S, lam_S)
            J = np.block([[np.eye(P) - Hw, -G[S].T], [G[S], np.zeros((S.size, S.size))]])
            step = np.linalg.lstsq(J, -F, rcond=None)[0]
            f0, alpha = float(np.linalg.norm(F)), 1.0
            for _ in range(31):
                th_t, lam_t = theta + alpha * step[:P], lam_S + alpha * step[P:]
                F_t, q_t, G_t = residual(th_t, S, lam_t)
                if q_t.min() > 0 and np.linalg.norm(F_t) <= (1.0 - 1e-4 * alpha) * f0:
                    break
                alpha *= 0.5
            else:
                msg = "the Newton line search found no decrease of the KKT residual"
                return theta, its, msg
            theta, lam_S, F, q, G = th_t, lam_t, F_t, q_t, G_t
            its += 1
        violated = np.setdiff1d(np.flatnonzero(q < 1.0 - feas_tol), S)
        if S.size and lam_S.min() < 0:
            k = int(np.argmin(lam_S))
            S, lam_S = np.delete(S, k), np.delete(lam_S, k)
            msg = "dropped a constraint with a negative multiplier"
            continue
        if violated.size:
            k = int(violated[np.argmin(q[violated])])
            S, lam_S = np.append(S, k), np.append(lam_S, 0.0)
            msg = "added a violated constraint"
            continue
        return theta, its, ""
    return theta, its, f"active-set Newton did not settle in {max_rounds} rounds ({msg})"


def _direction_distance(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a / np.linalg.norm(a) - b / np.linalg.norm(b)))


def _candidate_sets(prob, unflatten, th, thresholds, ridge, kink_tols=(None,), max_patterns=DEFAULT_MAX_PATTERNS):
    """Distinct initial ``(support, kinks)``: the NNLS support over ``q_i <= 1 + tau`` for each ``tau`` (increasing),
    with (Clarke) the kinks of the support's samples within each ``kink_tol`` and the slopes the certificate chose."""
    seen, out = set(), []
    pairs = sorted(((a, b) for a in range(len(kink_tols)) for b in range(len(thresholds))),
                   key=lambda ab: (ab[0] + ab[1], ab[0]))  # interleaved: small thresholds of both kinds first
    for a, b in pairs:
        kt, tau = kink_tols[a], thresholds[b]
        r = _kkt_from_theta(prob, th, unflatten, active_tol=tau, ridge=ridge, rescale=False, kink_tol=kt,
                            max_patterns=max_patterns)
        S = r.support if r.support.size else r.active
        kinks, slopes = [], []
        if r.kinks is not None:
            for i in S:
                for k, j in r.kinked_units(int(i)):
                    s = r.slopes[k][i, j]
                    kinks.append((int(i), k, j))
                    slopes.append(float(s) if np.isfinite(s) else 0.5 * (1.0 + prob.unflatten(
                        jnp.asarray(th)).activation.alpha))
        key = (tuple(int(i) for i in S), tuple(kinks))
        if key[0] and key not in seen:
            seen.add(key)
            out.append((float(tau), kt, S, r.multipliers[S], kinks, slopes))
    return out


LOCAL_THRESHOLDS = (1e-6, 1e-3, 1e-2, 3e-2, 0.1, 0.3)
POLISH_KINK_TOLS = (1e-6, 1e-4, 1e-3, 1e-2, 3e-2)
"""Kink tolerances whose kink sets seed the Clarke polish (a long-GD point wobbles around its kinks by ~1e-3)."""

SQP_KINK_TOLS = (1e-2, 1e-3)
"""The Clarke SQP presolve's continuation in the kink tolerance (:mod:`homflow.kkt._clarke_sqp`)."""


def solve_max_margin(
    model: AbstractHomogeneousModel,
    data,
    *,
    tol: float = 1e-8,
    presolve: str = "auto",
    slsqp_maxiter: int = 500,
    newton_tol: float | None = None,
    max_iter: int = 30,
    max_rounds: int = 20,
    support_tol: float = 1e-6,
    active_tol: float | None = None,
    ridge: float = 1e-13,
    local_thresholds: tuple[float, ...] = LOCAL_THRESHOLDS,
    clarke: bool | None = None,
    kink_tol: float = DEFAULT_KINK_TOL,
    polish_kink_tols: tuple[float, ...] = POLISH_KINK_TOLS,
    max_patterns: int = DEFAULT_MAX_PATTERNS,
    max_distance: float = 1.0,
    min_margin_ratio: float = 0.5,
    feas_tol: float = DEFAULT_FEAS_TOL,
    max_seeds: int = 12,
    sqp_kink_tols: tuple[float, ...] = SQP_KINK_TOLS,
    sqp_max_iter: int = 40,
) -> MarginKKT:
    """Polish ``model`` into a KKT point of ``min 1/2 ||theta||^2`` s.t. ``y_i Phi(theta; x_i) >= 1``.

    By default the polish is *local*: it stays near the start (for instance a late-phase flow direction) and does not
    jump to another, possibly better, KKT point. From the start rescaled to ``q_min = 1``, for each threshold ``tau``
    in ``local_thresholds`` the NNLS support over the constraints with ``q_i <= 1 + tau`` seeds a damped active-set
    Newton method on the KKT system (module docstring); of the runs that are certified, the one whose direction is
    nearest the start's is returned. Only if none is does ``presolve='auto'`` fall back to an SLSQP presolve (a
    global-ish move that may land on a different KKT point; the result's ``distance`` says how far it went).

    ReLU-type networks (``clarke``, see :func:`max_margin_kkt`): the seeds also carry the kinks of the support samples
    (pre-activations within each of ``polish_kink_tols`` of zero), and the Newton method holds those at zero with their
    slopes as unknowns (:mod:`homflow.kkt._kink_newton`); the result is certified with Clarke subgradients at
    ``kink_tol``. If no seed is certified, ``'auto'`` runs the *Clarke SQP* (:mod:`homflow.kkt._clarke_sqp`: SQP steps
    whose QP asks every slope piece of a near-active sample's kinks to stay feasible, solved as a least-distance problem
    by NNLS, with a continuation in the kink tolerance ``sqp_kink_tols``) and polishes from where it ends; then SLSQP
    *inside the start's activation cell* (every pre-activation near zero keeps its side, so the problem is smooth and
    SLSQP cannot wander far: :func:`homflow.kkt._kink_newton.cell_slsqp`) and polishes from there, and only then the
    global SLSQP (whose BFGS model is spoiled by the kinks: it wandered to norms ~3,000 with normalized margin ~1e-11 on
    depth-3 leaky-ReLU nets, which the guards below now report as ``'margin_collapsed'``).

    Whatever the route, a result is ``converged`` only if it is certified *and* it stays near the start: its direction
    within ``max_distance`` of the start's and its normalized margin at least ``min_margin_ratio`` times the start's
    (a KKT point far away, or one whose normalized margin collapsed, is reported as a failure with ``reason``
    ``'too_far'`` / ``'margin_collapsed'``).

    Arguments:
        model: a start with positive minimum margin (only its direction matters; it is rescaled to ``q_min = 1``).
        data: a ``Dataset`` with labels +-1.
        tol: certify when the re-computed relative stationarity ``eps / ||theta||`` (and ``|slackness|``) is
            ``<= tol`` (float64: 1e-8).
        presolve: ``'auto'`` (local Newton polish first; SLSQP then Newton only if it fails and ``P <= 3000``),
            ``'none'`` (local Newton polish only) or ``'slsqp'`` (SLSQP from the start, then Newton).
        newton_tol: Newton's own stopping tolerance (default ``tol / 100``, at least ``100 eps``).
        max_iter, max_rounds: Newton iterations per active set, active-set changes.
        support_tol: after an SLSQP presolve, the initial support is the NNLS support over ``q_i <= 1 + support_tol``.
        active_tol: near-active tolerance of the final certificate (default ``max(1e3 * newton_tol, 1e-9)``).
        ridge: see :func:`max_margin_kkt`.
        local_thresholds: the thresholds ``tau`` of the local polish's candidate initial supports.
        clarke, kink_tol, max_patterns: the certificate's Clarke options (see :func:`max_margin_kkt`).
        polish_kink_tols: kink tolerances of the Clarke polish's candidate kink sets.
        max_distance: largest accepted ``||theta/||theta|| - theta_0/||theta_0||||`` (in ``[0, 2]``; default 1.0,
            about 60 degrees).
        min_margin_ratio: smallest accepted ratio of the result's normalized margin to the start's (default 0.5).
        feas_tol: feasibility tolerance of the certificate (default 1e-9).
        max_seeds: most candidate seeds (support, kinks) tried per start (default 12; small thresholds of both kinds first).
        sqp_kink_tols, sqp_max_iter: the Clarke SQP presolve's kink tolerances (default ``(1e-2, 1e-3)``) and iterations
            per tolerance (default 40; 0 skips the Clarke SQP). Used when the local polish fails, ``presolve='auto'``,
            Clarke certificates apply and ``P <= 3000``.

    Returns:
        A :class:`MarginKKT` with ``converged`` (certified and within the guards), ``reason`` (``'certified'`` or why
        not: ``'not_stationary'``, ``'infeasible'``, ``'slackness'``, ``'too_far'``, ``'margin_collapsed'``),
        ``message`` (the route taken and what went wrong), ``iterations``, ``distance`` (from the start's direction),
        ``start_normalized_margin`` and the certificate's kinks, slopes and ``smooth_stationarity``.

    Raises:
        ValueError: if the start's minimum margin is not positive or an argument is out of range.
    """
    if presolve not in ("auto", "slsqp", "none"):
        raise ValueError(f"`presolve` must be 'auto', 'slsqp' or 'none'; got {presolve!r}.")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"`tol` must be a finite number > 0; got {tol!r}.")
    local_thresholds = tuple(float(t) for t in local_thresholds)
    if not all(t >= 0 and math.isfinite(t) for t in local_thresholds):
        raise ValueError(f"`local_thresholds` must be finite numbers >= 0; got {local_thresholds!r}.")
    polish_kink_tols = tuple(float(t) for t in polish_kink_tols)
    if not all(t >= 0 and math.isfinite(t) for t in polish_kink_tols):
        raise ValueError(f"`polish_kink_tols` must be finite numbers >= 0; got {polish_kink_tols!r}.")
    if not (0 <= max_distance and math.isfinite(max_distance)):
        raise ValueError(f"`max_distance` must be a finite number >= 0 (directions differ by at most 2); "
                         f"got {max_distance!r}.")
    if not (0 <= min_margin_ratio and math.isfinite(min_margin_ratio)):
        raise ValueError(f"`min_margin_ratio` must be a finite number >= 0; got {min_margin_ratio!r}.")
    sqp_kink_tols = tuple(float(t) for t in sqp_kink_tols)
    if not all(t >= 0 and math.isfinite(t) for t in sqp_kink_tols):
        raise ValueError(f"`sqp_kink_tols` must be finite numbers >= 0; got {sqp_kink_tols!r}.")
    if not (isinstance(sqp_max_iter, (int, np.integer)) and sqp_max_iter >= 0):
        raise ValueError(f"`sqp_max_iter` must be an integer >= 0; got {sqp_max_iter!r}.")
    kt = resolve_clarke(model, clarke, kink_tol, max_patterns)
    prob, theta = make_margin_problem(model, data)
    unflatten = flatten(model)[1]
    eps64 = float(jnp.finfo(theta.dtype).eps)
    newton_tol = max(tol / 100.0, 100 * eps64) if newton_tol is None else float(newton_tol)
    active_tol = max(1e3 * newton_tol, 1e-9) if active_tol is None else float(active_tol)
    cert = dict(kink_tol=kt, max_patterns=int(max_patterns), tol=tol, feas_tol=feas_tol, ridge=ridge)
    start = _kkt_from_theta(prob, theta, unflatten, active_tol=1e-2, **cert)
    th0 = start.theta
    P = th0.size
    newton = dict(tol=newton_tol, max_iter=max_iter, max_rounds=max_rounds, feas_tol=1e-12)

    def finish(th, its, messages):
        out = _kkt_from_theta(prob, th, unflatten, active_tol=active_tol, **cert)
        return out, out.certified, its, messages

    def report(res):
        out, ok, its, messages = res
        dist = _direction_distance(out.theta, th0)
        far = dist > max_distance
        collapsed = out.normalized_margin < min_margin_ratio * start.normalized_margin
        messages = list(messages)
        if not ok:
            messages.append(f"stationarity {out.stationarity:.2e} (target {tol:.0e}), feasibility "
                            f"{out.feasibility:.1e}, slackness {out.slackness:.1e}")
        if far:
            messages.append(f"the point found is {dist:.3g} from the start's direction (max_distance {max_distance:g})")
        if collapsed:
            messages.append(f"its normalized margin {out.normalized_margin:.3g} is below {min_margin_ratio:g} times "
                            f"the start's {start.normalized_margin:.3g}")
        # the guards name the failure first: a far or collapsed point is never a result, certified or not
        reason = TOO_FAR if far else (MARGIN_COLLAPSED if collapsed else out.reason)
        ok = bool(ok and not far and not collapsed)
        return out.replace(converged=ok, certified=ok, reason=reason,
                           message="; ".join(m for m in messages if m), iterations=int(its), distance=dist,
                           start_normalized_margin=start.normalized_margin)

    def acceptable(res):
        out = res[0]
        return (res[1] and _direction_distance(out.theta, th0) <= max_distance
                and out.normalized_margin >= min_margin_ratio * start.normalized_margin)

    tried = []

    def polish_from(th_s, label, kink_tols=None):
        """Local polish from ``th_s`` over the candidate seeds; returns the nearest acceptable certified result."""
        best, total = None, 0
        kink_seeds = (None,) if kt is None else (polish_kink_tols if kink_tols is None else kink_tols)
        seeds = _candidate_sets(prob, unflatten, th_s, local_thresholds, ridge, kink_seeds, int(max_patterns))
        for tau, ktau, S, lam_S, kinks, slopes in seeds[:max_seeds]:
            if kt is None:
                th, its, msg = _active_set_newton(prob, th_s, S, lam_S, **newton)
                route = f"{label} (support from q_i <= 1 + {tau:g})"
            else:
                th, its, msg = kink_newton(prob, th_s, S, lam_S, kinks, slopes, kink_tol=ktau, **newton)
                route = f"{label} with kinks (support from q_i <= 1 + {tau:g}, {len(kinks)} kinks within {ktau:g})"
            total += its
            q = np.asarray(_margins_jac(prob, jnp.asarray(th))[0])
            if not q.min() > 0:
                continue
            res = finish(th, total, [route, msg])
            tried.append(res)
            if acceptable(res) and (best is None or _direction_distance(res[0].theta, th0)
                                    < _direction_distance(best[0].theta, th0)):
                best = res
        return best, total

    if presolve in ("auto", "none"):
        best, total = polish_from(th0, "local polish")
        if best is None and kt is not None and presolve == "auto" and P <= 3000 and sqp_max_iter > 0:
            # Clarke: the SQP over every slope piece of the near-active samples, then the kink polish from there
            th_q, its_q, msg_q = clarke_sqp(prob, th0, kink_tols=sqp_kink_tols, max_iter=sqp_max_iter)
            total += its_q
            if np.asarray(_margins(prob, jnp.asarray(th_q))).min() > 0:  # then clarke_sqp rescaled it to q_min = 1
                label = f"Clarke SQP presolve ({its_q} iterations{'; ' + msg_q if msg_q else ''}), then local polish"
                # its kinks sit within its last kink tolerance: seeds with looser ones only add columns
                last = sqp_kink_tols[-1] if sqp_kink_tols else 0.0
                near = tuple(t for t in polish_kink_tols if t <= last) or None
                best, total_q = polish_from(th_q, label, near)
                total += total_q
        if best is None and kt is not None and presolve == "auto":
            # Clarke: a smooth SLSQP inside the start's activation cell, then the kink polish from where it ends
            th_c, res_c, _ = cell_slsqp(prob, th0, maxiter=slsqp_maxiter)
            q = np.asarray(_margins_jac(prob, jnp.asarray(th_c))[0])
            if q.min() > 0:
                th_c = th_c / q.min() ** (1.0 / prob.degree)
                best, total_c = polish_from(th_c, "SLSQP in the start's activation cell, then local polish")
                total += total_c
        if best is not None:
            return report((best[0], True, total, best[3]))
        if presolve == "none" or P > 3000:
            if not tried:
                return report(finish(th0, 0, ["no near-active constraint to start the local polish from"]))
            closest = min(tried, key=lambda r: r[0].stationarity)
            return report((closest[0], closest[1], total, closest[3] + ["the local polish did not converge"]))
    th, res = _slsqp(prob, th0, slsqp_maxiter)
    slsqp_note = "" if res.success else f"SLSQP: {res.message}"
    q = np.asarray(_margins_jac(prob, jnp.asarray(th))[0])
    if not q.min() > 0:
        raise ValueError("the SLSQP presolve left a non-positive margin; try presolve='none'.")
    th = th / q.min() ** (1.0 / prob.degree)
    route = "SLSQP presolve then Newton" + (" (the local polish did not converge)" if tried else "")
    if kt is not None:
        best, its = polish_from(th, route)
        if best is not None:
            return report((best[0], True, its, best[3]))
    mid = _kkt_from_theta(prob, th, unflatten, active_tol=support_tol, **cert)
    S = mid.support if mid.support.size else mid.active
    th, its, msg = _active_set_newton(prob, th, S, mid.multipliers[S], **newton)
    out = finish(th, its, [route, msg])
    if not out[1] and slsqp_note:
        out[3].insert(1, slsqp_note)
    return report(out)
