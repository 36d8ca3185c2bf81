"""Polish a network into a certified KKT point of the max-margin problem (MATH.md section 5, arXiv 1906.05890).

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
from ._margin import MarginKKT, MarginProblem, _kkt_from_theta, _margins_jac, make_margin_problem

__all__ = ["solve_max_margin"]


@eqx.filter_jit
def _newton_parts(prob: MarginProblem, theta, lam):
    q, G = prob.margins(theta), prob.jacobian(theta)
    return q, G, prob.weighted_hessian(theta, lam)


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
    theta = np.asarray(theta, dtype=np.float64)
    n = int(prob.y.shape[0])
    P = theta.size
    its = 0
    msg = ""
    for _ in range(max_rounds):
        S = np.asarray(sorted(set(int(i) for i in S)), dtype=np.int64)
        lam_S = np.asarray(lam_S, dtype=np.float64)
        for _ in range(max_iter):
            lam = np.zeros(n)
            lam[S] = lam_S
            q, G, Hw = (np.asarray(a) for a in _newton_parts(prob, jnp.asarray(theta), jnp.asarray(lam)))
            F = np.concatenate([theta - G[S].T @ lam_S, q[S] - 1.0])
            if np.linalg.norm(F[:P]) <= tol * np.linalg.norm(theta) and np.linalg.norm(F[P:]) <= tol:
                break
            J = np.block([[np.eye(P) - Hw, -G[S].T], [G[S], np.zeros((S.size, S.size))]])
            step = np.linalg.lstsq(J, -F, rcond=None)[0]
            theta = theta + step[:P]
            lam_S = lam_S + step[P:]
            its += 1
        q = np.asarray(_margins_jac(prob, jnp.asarray(theta))[0])
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
) -> MarginKKT:
    """Polish ``model`` into a KKT point of ``min 1/2 ||theta||^2`` s.t. ``y_i Phi(theta; x_i) >= 1``.

    Arguments:
        model: a start with positive minimum margin (only its direction matters; it is rescaled to ``q_min = 1``).
        data: a ``Dataset`` with labels +-1.
        tol: certify when the re-computed relative stationarity ``eps / ||theta||`` is ``<= tol`` (float64: 1e-8).
        presolve: ``'slsqp'`` (always), ``'none'``, or ``'auto'`` (SLSQP when the start is not already within ``1e-3``
            relative stationarity and ``P <= 3000``).
        newton_tol: Newton's own stopping tolerance (default ``tol / 100``, at least ``100 eps``).
        max_iter, max_rounds: Newton iterations per active set, active-set changes.
        support_tol: initial support = ``q_i <= 1 + support_tol`` after the presolve, or NNLS multipliers ``> 0``.
        active_tol: near-active tolerance of the final certificate (default ``max(1e3 * newton_tol, 1e-9)``).
        ridge: see :func:`max_margin_kkt`.

    Returns:
        A :class:`MarginKKT` with ``converged`` (stationarity ``<= tol``, feasibility ``<= 1e-9`` and every multiplier
        on a constraint active to ``active_tol``), ``message`` (why not, if not) and ``iterations``.

    Raises:
        ValueError: if the start's minimum margin is not positive or an argument is out of range.
    """
    if presolve not in ("auto", "slsqp", "none"):
        raise ValueError(f"`presolve` must be 'auto', 'slsqp' or 'none'; got {presolve!r}.")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"`tol` must be a finite number > 0; got {tol!r}.")
    prob, theta = make_margin_problem(model, data)
    unflatten = flatten(model)[1]
    eps64 = float(jnp.finfo(theta.dtype).eps)
    newton_tol = max(tol / 100.0, 100 * eps64) if newton_tol is None else float(newton_tol)
    active_tol = max(1e3 * newton_tol, 1e-9) if active_tol is None else float(active_tol)
    start = _kkt_from_theta(prob, theta, unflatten, active_tol=1e-2, ridge=ridge)
    th = start.theta
    P = th.size
    messages = []
    do_slsqp = presolve == "slsqp" or (presolve == "auto" and start.stationarity > 1e-3 and P <= 3000)
    if do_slsqp:
        th, res = _slsqp(prob, th, slsqp_maxiter)
        slsqp_note = "" if res.success else f"SLSQP: {res.message}"
        q = np.asarray(_margins_jac(prob, jnp.asarray(th))[0])
        if not q.min() > 0:
            raise ValueError("the SLSQP presolve left a non-positive margin; try presolve='none'.")
        th = th / q.min() ** (1.0 / prob.degree)
        mid = _kkt_from_theta(prob, th, unflatten, active_tol=support_tol, ridge=ridge)
    else:
        mid, slsqp_note = start, ""
    S = mid.support if mid.support.size else mid.active
    lam_S = mid.multipliers[S]
    th, its, msg = _active_set_newton(prob, th, S, lam_S, tol=newton_tol, max_iter=max_iter, max_rounds=max_rounds,
                                      feas_tol=1e-12)
    if msg:
        messages.append(msg)
    out = _kkt_from_theta(prob, th, unflatten, active_tol=active_tol, ridge=ridge)
    ok = out.stationarity <= tol and out.feasibility <= 1e-9
    if not ok:
        if slsqp_note:
            messages.insert(0, slsqp_note)
        messages.append(f"stationarity {out.stationarity:.2e} (target {tol:.0e}), feasibility {out.feasibility:.1e}")
    return out.replace(converged=bool(ok), message="; ".join(messages), iterations=int(its))
