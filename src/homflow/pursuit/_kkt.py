"""Certified KKT points of the two constrained NCFs neuron pursuit needs, exact on ReLU-type activation patterns.

The Riemannian ascent of :func:`homflow.kkt.sphere_ascent` finds the basin; for ``p = 1`` activations the KKT points
of interest often sit on a kink (a pre-activation exactly 0 on some samples, common on the hypercube), where Newton
polishing stalls. There the NCF is *exactly* polynomial on each activation pattern, and the KKT point of a piece has a
closed form; a point is accepted when its own pattern is the piece's (a fixed point), and certified by the generic
tangential residual ``||grad N(u) - <u, grad N(u)> u||`` of :class:`homflow.kkt.NCF` (autodiff, independent of the
closed form). Other activations (``p >= 2``, smooth) use :func:`homflow.kkt.polish_ncf_theta` (Newton).

* New neuron (MATH.md section 4): on the pattern ``s_i = sigma'(a . f_i)`` (1 or ``alpha``) the residual NCF is the
  bilinear form ``N_r(a, b) = a^T M_s b`` with ``M_s = sum_i r_i s_i f_i g_i^T``; its KKT points on the sphere are the
  singular pairs ``(a, b) = (u_j, v_j) / sqrt(2)`` with ``N_r = sigma_j / 2``; the largest is taken.
* Width-one ReLU network (``alpha = 0``), ``H = w_K relu(w_{K-1} ... relu(w_2 relu(w_1 . x)))
  = c relu(w_1 . x)`` with ``c = w_K prod_{1<k<K} relu(w_k)``: at a positive KKT point ``w_1`` maximises
  ``n(w_1) = sum_i y_i relu(w_1 . x_i)`` (on the pattern ``S``: ``w_1 ~ sum_{i in S} ytilde_i x_i``) and the layers are
  balanced, ``|w_k| = ||w_1|| = 1/sqrt(K)``, with ``c > 0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..kkt import NCFPoint, classify, default_residual_rtol, make_ncf, polish_ncf_theta, riemannian_hessian_eigenvalues
from ..kkt import sphere_ascent, zero_preserving_groups
from ..models import flatten

__all__ = ["certify", "increment_kkt", "width_one_kkt"]


def certify(ncf, u, *, unflatten, rtol: float, second_order: bool = True) -> NCFPoint:
    """The :class:`homflow.kkt.NCFPoint` of the unit vector ``u`` with its residual computed by ``ncf`` (autodiff)."""
    u = jnp.asarray(u) / jnp.linalg.norm(jnp.asarray(u))
    res, lam, val = ncf.residual(u)
    gn = float(jnp.linalg.norm(ncf.grad(u)))
    rel = float(res) / max(gn, float(jnp.finfo(u.dtype).tiny))
    so = None
    if second_order:
        so = classify(np.asarray(riemannian_hessian_eigenvalues(ncf.hessian(u), u, lam)))
    model = unflatten(u)
    return NCFPoint(model=model, theta=np.asarray(u), value=float(val), lam=float(lam), residual=float(res),
                    relative_residual=rel, certified=bool(rel <= rtol), rtol=rtol, vanishing=(), second_order=so,
                    singular_values=())


def _ascent(ncf, P, n_starts, steps, key, dtype):
    U0 = jax.random.normal(key, (int(n_starts), P), dtype)
    U, vals, _ = sphere_ascent(ncf, U0, int(steps))
    order = np.argsort(-np.asarray(vals))
    return np.asarray(U)[order], np.asarray(vals)[order]


def _bilinear_fixed_point(F, G, r, a, alpha, max_rounds):
    """Pattern iteration for ``N_r(a, b)`` with a ``p = 1`` activation; returns ``(u, converged)``."""
    s = np.where(F @ a > 0, 1.0, alpha)
    for _ in range(int(max_rounds)):
        M = (F * (r * s)[:, None]).T @ G
        Uu, _, Vt = np.linalg.svd(M, full_matrices=False)
        an, bn = Uu[:, 0], Vt[0]
        if an @ a < 0:  # (u, v) and (-u, -v) are the same pair on this piece; keep the side of the current pattern
            an, bn = -an, -bn
        sn = np.where(F @ an > 0, 1.0, alpha)
        if np.array_equal(sn, s):
            return np.concatenate([an, bn]) / np.sqrt(2.0), True
        a, s = an, sn
    return np.concatenate([a, bn]) / np.sqrt(2.0), False


def increment_kkt(template, lifted, *, key, n_starts: int = 32, ascent_steps: int = 400, rtol: float | None = None,
                  keep: int = 4, max_rounds: int = 100):
    """Best certified KKT point of the residual NCF of a new neuron (see the module docstring).

    Arguments:
        template, lifted: from :func:`homflow.pursuit.increment_ncf_data`.
        key, n_starts, ascent_steps: random starts and iterations of the Riemannian ascent.
        rtol: certificate tolerance (default :func:`homflow.kkt.default_residual_rtol`).
        keep: the ``keep`` highest ascent end points are polished; max_rounds: pattern iterations per point.

    Returns:
        ``(point, candidates)``: the certified point of largest ``N_r`` (else the best uncertified one) and all
        polished candidates.
    """
    ncf, theta = make_ncf(template, lifted, "square")
    dt = theta.dtype
    rtol = default_residual_rtol(dt) if rtol is None else float(rtol)
    unflatten = flatten(template)[1]
    U, _ = _ascent(ncf, theta.size, n_starts, ascent_steps, key, dt)
    act = template.activation
    m = template.a.shape[0]
    F, Gm = np.asarray(lifted.X[:, :m]), np.asarray(lifted.X[:, m:])
    r = np.asarray(lifted.y)
    cands = []
    for u0 in U[: int(keep)]:
        if act.degree == 1:
            u, _ = _bilinear_fixed_point(F, Gm, r, u0[:m], float(act.alpha), max_rounds)
        else:
            u = polish_ncf_theta(ncf, jnp.asarray(u0), rtol=rtol, second_order=False).theta
        cands.append(certify(ncf, jnp.asarray(u, dt), unflatten=unflatten, rtol=rtol))
    ok = [c for c in cands if c.certified]
    best = max(ok or cands, key=lambda c: c.value)
    return best, cands


def width_one_kkt(template, data, loss, *, key, n_starts: int = 32, ascent_steps: int = 400,
                  rtol: float | None = None, max_rounds: int = 100) -> NCFPoint:
    """Best KKT point of the constrained NCF of the width-one MLP ``template`` (the start of neuron pursuit).

    ReLU (``alpha = 0``, ``p = 1``): the closed form of the module docstring, seeded by the ascent's best end point;
    other activations: the ascent's best end point polished by :func:`homflow.kkt.polish_ncf_theta`.
    """
    ncf, theta = make_ncf(template, data, loss)
    dt = theta.dtype
    rtol = default_residual_rtol(dt) if rtol is None else float(rtol)
    unflatten = flatten(template)[1]
    U, _ = _ascent(ncf, theta.size, n_starts, ascent_steps, key, dt)
    act = template.activation
    K = len(template.weights)
    if act.degree == 1 and float(act.alpha) == 0.0:
        X, yt = np.asarray(ncf.X), np.asarray(ncf.ytilde)
        d = X.shape[1]
        w = U[0][:d]
        S = X @ w > 0
        for _ in range(int(max_rounds)):
            v = X[S].T @ yt[S]
            w = v / max(np.linalg.norm(v), np.finfo(v.dtype).tiny)
            Sn = X @ w > 0
            if np.array_equal(Sn, S):
                break
            S = Sn
        u = np.concatenate([w, np.ones(K - 1)]) / np.sqrt(K)  # layer order of MLP.flatten: W_1, W_2, ..., W_K
        return certify(ncf, jnp.asarray(u, dt), unflatten=unflatten, rtol=rtol)
    pt = polish_ncf_theta(ncf, jnp.asarray(U[0]), groups=zero_preserving_groups(template), unflatten=unflatten,
                          rtol=rtol, refine_rounds=1)
    return pt
