"""Plateaus and saddles after the escape (arXiv 2502.15952, docs/math.md §4): segment a trajectory into plateaus and
transitions, measure each plateau (gradient norm, loss, extreme Hessian eigenvalues by Lanczos on Hessian-vector
products, never a dense Hessian for large models), classify it, and polish a plateau point into a critical point."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from ..models import AbstractHomogeneousModel
from ._solve import Problem, make_problem

__all__ = ["Plateau", "hessian_extremes", "relative_gradient_norm", "segment_plateaus", "analyse_plateaus",
           "polish_critical_point", "classify_point"]

# Above this many parameters the Hessian is only touched through Hessian-vector products (Lanczos, scipy eigsh).
DENSE_MAX = 64


@eqx.filter_jit
def _hvp(problem: Problem, theta, v):
    return problem.hvp(theta, v)


@eqx.filter_jit
def _hvp_cols(problem: Problem, theta, V):
    return jax.vmap(lambda v: problem.hvp(theta, v))(V)


def hessian_extremes(problem: Problem, theta, *, tol: float = 1e-10) -> tuple[float, float]:
    """Smallest and largest eigenvalue of ``Hess L(theta)``.

    Up to :data:`DENSE_MAX` parameters the Hessian is assembled from ``P`` Hessian-vector products; above, the implicitly
    restarted Lanczos method (``scipy.sparse.linalg.eigsh``, ``which='SA'`` / ``'LA'``) runs on a ``LinearOperator``
    whose matvec is a jitted Hessian-vector product (forward over reverse).
    """
    import scipy.sparse.linalg as sla

    th = jnp.asarray(theta, dtype=problem.X.dtype)
    P = th.size
    if P <= DENSE_MAX:
        H = np.asarray(_hvp_cols(problem, th, jnp.eye(P, dtype=th.dtype)))
        e = np.linalg.eigvalsh(0.5 * (H + H.T))
        return float(e[0]), float(e[-1])
    op = sla.LinearOperator((P, P), matvec=lambda v: np.asarray(_hvp(problem, th, jnp.asarray(v.ravel(), th.dtype))),
                            dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(P)
    lo = sla.eigsh(op, k=1, which="SA", tol=tol, v0=v0, return_eigenvectors=False)[0]
    hi = sla.eigsh(op, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)[0]
    return float(lo), float(hi)


@eqx.filter_jit
def _rel_grad(problem: Problem, theta):
    obj = problem
    out = obj.outputs(theta)
    J = jax.jacrev(obj.outputs)(theta)
    g = jax.grad(lambda o: obj.loss.log_value(o, obj.y) if obj.loss.classification else obj.loss.value(o, obj.y))(out)
    grad = J.T @ g
    return jnp.linalg.norm(grad), jnp.linalg.norm(grad) / jnp.maximum(jnp.linalg.norm(J) * jnp.linalg.norm(g), 1e-300)


def relative_gradient_norm(problem: Problem, theta) -> tuple[float, float]:
    """``(||grad L||, ||J^T g|| / (||J||_F ||g||))`` with ``J = d Phi(theta; X) / d theta`` (n, P) and ``g = dl/dPhi``
    (``grad L = J^T g``; for classification losses ``L`` is replaced by ``log L``). The relative value lies in [0, 1]
    and does not depend on the scale of the data or the weights: 0 at a critical point."""
    a, r = _rel_grad(problem, jnp.asarray(theta, dtype=problem.X.dtype))
    return float(a), float(r)


def classify_point(lam_min: float, lam_max: float, rel_grad: float, *, grad_tol: float = 1e-3,
                   eig_rtol: float = 1e-8) -> str:
    """``'saddle'`` (a negative eigenvalue below ``-eig_rtol * |lam_max|``), ``'minimum'`` (none), or ``'not critical'``
    (relative gradient norm above ``grad_tol``)."""
    if rel_grad > grad_tol:
        return "not critical"
    return "saddle" if lam_min < -eig_rtol * max(abs(lam_max), 1e-300) else "minimum"


@dataclasses.dataclass(frozen=True)
class Plateau:
    """One plateau of the loss along a trajectory.

    Attributes:
        start, stop: saved indices (inclusive) of the plateau; index: the point of smallest gradient norm in it.
        t_start, t_stop, t: the matching times; loss: the loss at ``index``; norm: ``||theta||`` there.
        grad_norm, rel_grad_norm: :func:`relative_gradient_norm`; lam_min, lam_max: :func:`hessian_extremes`.
        kind: ``'origin'`` (``||theta||`` below ``origin_norm``), or :func:`classify_point`'s class.
    """

    start: int
    stop: int
    index: int
    t_start: float
    t_stop: float
    t: float
    loss: float
    norm: float
    grad_norm: float
    rel_grad_norm: float
    lam_min: float
    lam_max: float
    kind: str


def segment_plateaus(ts, loss, *, slope_tol: float = 1e-3, min_points: int = 3) -> list[tuple[int, int]]:
    """Runs of saved points where the loss is flat in log time: ``|d L / d log t| <= slope_tol * L`` between consecutive
    points (``t > 0``), at least ``min_points`` long. Returns ``(start, stop)`` index pairs (inclusive); the
    transitions are the gaps between them."""
    ts, loss = np.asarray(ts, float), np.asarray(loss, float)
    if ts.shape != loss.shape or ts.ndim != 1:
        raise ValueError(f"`ts` and `loss` must be 1-D of the same length; got {ts.shape} and {loss.shape}.")
    pos = np.flatnonzero(ts > 0)
    runs, cur = [], None
    for a, b in zip(pos[:-1], pos[1:]):
        slope = abs(loss[b] - loss[a]) / np.log(ts[b] / ts[a])
        if slope <= slope_tol * max(abs(loss[a]), 1e-300):
            cur = (a, b) if cur is None else (cur[0], b)
        else:
            if cur is not None and cur[1] - cur[0] + 1 >= min_points:
                runs.append(cur)
            cur = None
    if cur is not None and cur[1] - cur[0] + 1 >= min_points:
        runs.append(cur)
    return runs


def analyse_plateaus(model: AbstractHomogeneousModel, data, ts, thetas, *, loss="square", slope_tol: float = 1e-3,
                     min_points: int = 3, origin_norm: float | None = None, grad_tol: float = 1e-3) -> list[Plateau]:
    """Segment the saved trajectory ``(ts, thetas)`` of ``model``'s architecture into plateaus and measure each.

    Arguments:
        origin_norm: plateaus with ``||theta||`` below it are the origin saddle (default ``10 ||theta(0)||``).
        slope_tol, min_points: see :func:`segment_plateaus`; grad_tol: see :func:`classify_point`.
    """
    problem, _ = make_problem(model, data, loss)
    thetas = np.asarray(thetas, float)
    obj = problem
    losses = np.asarray(jax.vmap(obj.value)(jnp.asarray(thetas)))
    norms = np.linalg.norm(thetas, axis=1)
    origin_norm = 10 * norms[0] if origin_norm is None else float(origin_norm)
    out = []
    for a, b in segment_plateaus(ts, losses, slope_tol=slope_tol, min_points=min_points):
        rel = [relative_gradient_norm(problem, thetas[i]) for i in range(a, b + 1)]
        k = int(np.argmin([r[1] for r in rel]))
        i = a + k
        lo, hi = hessian_extremes(problem, thetas[i])
        kind = "origin" if norms[i] < origin_norm else classify_point(lo, hi, rel[k][1], grad_tol=grad_tol)
        out.append(Plateau(a, b, i, float(ts[a]), float(ts[b]), float(ts[i]), float(losses[i]), float(norms[i]),
                           rel[k][0], rel[k][1], lo, hi, kind))
    return out


def polish_critical_point(problem: Problem, theta, *, rtol: float = 1e-13, atol: float = 1e-15,
                          max_steps: int = 500) -> tuple[np.ndarray, float, float]:
    """Polish an approximate critical point (a plateau point) by Levenberg-Marquardt on ``grad L(theta) = 0``
    (optimistix; the damping handles the singular Hessians of sparse points and rescaling symmetries).

    Returns:
        ``(theta, grad_norm, rel_grad_norm)`` at the polished point (see :func:`relative_gradient_norm`).
    """
    th0 = jnp.asarray(theta, dtype=problem.X.dtype)
    sol = optx.least_squares(lambda th, p: p.grad(th), optx.LevenbergMarquardt(rtol=rtol, atol=atol),
                             th0, args=problem, max_steps=max_steps, throw=False)
    th = np.asarray(sol.value)
    a, r = relative_gradient_norm(problem, th)
    a0, r0 = relative_gradient_norm(problem, th0)
    if not (r <= r0):  # never return a worse point
        return np.asarray(th0), a0, r0
    return th, a, r
