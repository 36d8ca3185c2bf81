"""Certified KKT points of the two constrained NCFs neuron pursuit needs, exact on ReLU-type activation patterns.

The Riemannian ascent of :func:`homflow.kkt.sphere_ascent` finds the basin; for ``p = 1`` activations the KKT points
of interest often sit on a kink (a pre-activation exactly 0 on some samples, common on the hypercube), where Newton
polishing stalls. There the NCF is *exactly* polynomial on each activation pattern, and the KKT point of a piece has a
closed form; a point is accepted when its own pattern is the piece's (a fixed point), and certified by the generic
tangential residual ``||grad N(u) - <u, grad N(u)> u||`` of :class:`homflow.kkt.NCF` (autodiff, independent of the
closed form). Other activations (``p >= 2``, smooth) use :func:`homflow.kkt.polish_ncf_theta` (Newton).

* New neuron (docs/math.md section 4): on the pattern ``s_i = sigma'(a . f_i)`` (1 or ``alpha``) the residual NCF is the
  bilinear form ``N_r(a, b) = a^T M_s b`` with ``M_s = sum_i r_i s_i f_i g_i^T``; its KKT points on the sphere are the
  singular pairs ``(a, b) = (u_j, v_j) / sqrt(2)`` with ``N_r = sigma_j / 2``; the largest is taken.
* Width-one ReLU network (``alpha = 0``), ``H = w_K relu(w_{K-1} ... relu(w_2 relu(w_1 . x)))
  = c relu(w_1 . x)`` with ``c = w_K prod_{1<k<K} relu(w_k)``: at a positive KKT point ``w_1`` maximises
  ``n(w_1) = sum_i y_i relu(w_1 . x_i)`` (on the pattern ``S``: ``w_1 ~ sum_{i in S} ytilde_i x_i``) and the layers are
  balanced, ``|w_k| = ||w_1|| = 1/sqrt(K)``, with ``c > 0``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..kkt import NCFPoint, classify, default_residual_rtol, make_ncf, polish_ncf_theta, riemannian_hessian_eigenvalues
from ..kkt import sphere_ascent, zero_preserving_groups
from ..models import flatten

__all__ = ["certify", "increment_kkt", "width_one_kkt"]


@eqx.filter_jit
def _derivatives(ncf, u):
    res, lam, val = ncf.residual(u)
    g = ncf.grad(u)
    return res, lam, val, g, riemannian_hessian_eigenvalues(ncf.hessian(u), u, lam)


def certify(ncf, u, *, unflatten, rtol: float, kink=None) -> tuple[NCFPoint, dict]:
    """The :class:`homflow.kkt.NCFPoint` of the unit vector ``u`` with its certificate.

    ``residual`` is the tangential residual of the autodiff gradient of ``ncf`` (:meth:`homflow.kkt.NCF.residual`),
    or, where ``kink = (C, lower, upper)`` describes samples on a kink, the smallest one over the Clarke
    subdifferential (:func:`clarke_residual`); the dict holds both, the number of ties and the second-order class.
    """
    u = jnp.asarray(u) / jnp.linalg.norm(jnp.asarray(u))
    res, lam, val, g, eigs = _derivatives(ncf, u)
    gn = max(float(jnp.linalg.norm(g)), float(jnp.finfo(u.dtype).tiny))
    info = {"autodiff_residual": float(res), "ties": 0}
    cres = float(res)
    if kink is not None and kink[0].shape[0]:
        cres, t = clarke_residual(np.asarray(u), np.asarray(g), *kink)
        cres = min(cres, float(res))
        info["ties"] = int(kink[0].shape[0])
    info["clarke_residual"] = cres
    rel = cres / gn
    so = classify(np.asarray(eigs))
    info["second_order"] = so.kind
    pt = NCFPoint(model=unflatten(u), theta=np.asarray(u), value=float(val), lam=float(lam), residual=cres,
                  relative_residual=rel, certified=bool(rel <= rtol), rtol=rtol, vanishing=(), second_order=so,
                  singular_values=())
    return pt, info


def _ties(z, scale, tie_tol):
    return np.abs(z) <= tie_tol * scale


def _ascent(ncf, P, n_starts, steps, key, dtype):
    U0 = jax.random.normal(key, (int(n_starts), P), dtype)
    U, vals, _ = sphere_ascent(ncf, U0, int(steps))
    order = np.argsort(-np.asarray(vals))
    return np.asarray(U)[order], np.asarray(vals)[order]


def _null_projector(FZ, m):
    """Orthogonal projector onto ``{a : FZ a = 0}``."""
    if FZ.shape[0] == 0:
        return np.eye(m)
    _, sv, Vt = np.linalg.svd(FZ, full_matrices=True)
    rank = int(np.sum(sv > sv.max() * m * np.finfo(FZ.dtype).eps)) if sv.size else 0
    N = Vt[rank:]
    return N.T @ N


def _tie_candidates(F, r, G, a, *, gap: float = 10.0, zmax: float = 1e-2, max_candidates: int = 3):
    """Candidate tie sets at an approximate maximiser ``a`` (an ascent end point, which hovers around the kinks it
    converges to): the ``k`` live samples of smallest ``|a . f_i| / (||a|| ||f_i||)`` (at most ``zmax``) when the next
    one is ``>= gap`` times larger; the empty set first."""
    live = (r != 0) & np.any(G != 0, axis=1)
    idx = np.flatnonzero(live)
    z = np.abs(F[idx] @ a) / np.maximum(np.linalg.norm(F[idx], axis=1) * np.linalg.norm(a), np.finfo(float).tiny)
    order = np.argsort(z)
    zs = z[order]
    scored = []
    for k in range(1, min(F.shape[1], len(zs))):
        if zs[k - 1] <= zmax and zs[k] >= gap * max(zs[k - 1], np.finfo(float).tiny):
            scored.append((zs[k] / max(zs[k - 1], np.finfo(float).tiny), k))
    out = [np.zeros(F.shape[0], bool)]
    for _, k in sorted(scored, reverse=True)[:max_candidates]:
        Z = np.zeros(F.shape[0], bool)
        Z[idx[order[:k]]] = True
        out.append(Z)
    return out


def _bilinear_fixed_point(F, G, r, a, alpha, max_rounds, tie_tol, Z0=None, H0=None, b=None, bzero=None):
    """Pattern iteration for ``max a^T M_s b`` on the sphere with a ``p = 1`` activation (module docstring).

    A sample whose pre-activation flips within a cycle of patterns is a tie: the iteration then keeps it exactly on
    the kink (``a . f_i = 0``, ``a`` restricted to the null space of the tied rows). Returns ``(u, ties, converged)``.
    """
    n, m = F.shape
    H0 = np.zeros_like(G) if H0 is None else H0
    fn = np.linalg.norm(F, axis=1)
    live = (r != 0) & (np.any(G != 0, axis=1) | np.any(H0 != 0, axis=1))  # weightless samples have no kink in N
    Z = np.zeros(n, bool) if Z0 is None else Z0.copy()
    seen = []
    bn = np.ones(G.shape[1]) if b is None else np.asarray(b)
    keep_b = np.ones(G.shape[1], bool) if bzero is None else ~bzero  # out-weights held exactly at their kink b_k = 0
    for _ in range(int(max_rounds)):
        z = F @ a
        pos = (z > tie_tol * fn) & ~Z & live
        s = np.where(pos, 1.0, alpha) * ~Z
        Geff = G + H0 * (bn > 0)  # on a piece (sign pattern of b) the kink term relu(b) . h is linear in b
        M = (F * (r * s)[:, None]).T @ (Geff * keep_b)
        Pz = _null_projector(F[Z], m)
        Uu, sv, Vt = np.linalg.svd(Pz @ M, full_matrices=False)
        j = int(np.argmax(np.abs(Uu.T @ a) * (sv > 0)))  # the pair nearest the current point (a local, not global, max)
        an, bn = Pz @ Uu[:, j], Vt[j] * keep_b
        if not np.linalg.norm(an) > 0:  # the ties leave no direction: give up on this start
            return np.concatenate([a, bn]) / np.sqrt(2.0), Z, False
        an = an / np.linalg.norm(an)
        if an @ a < 0:  # (u, v) and (-u, -v) are the same pair on this piece; keep the side of the current pattern
            an, bn = -an, -bn
        zn = F @ an
        pos_n = (zn > tie_tol * fn) & ~Z & live
        same_b = np.array_equal(G + H0 * (bn > 0), Geff)
        if same_b and np.array_equal(pos_n, pos) and np.all(np.abs(zn[Z]) <= tie_tol * fn[Z]):
            if Z.any():  # a tie whose Clarke slope would leave [alpha, 1] is not a kink maximum: release it
                idx = np.flatnonzero(Z)
                g = M @ bn  # gradient in a on the piece, slopes of the ties excluded
                lam = an @ g
                c = r[idx] * (Geff[idx] @ bn)
                t, *_ = np.linalg.lstsq(F[idx].T * c[None, :], lam * an - g, rcond=None)
                bad = (t < alpha - 1e-6) | (t > 1.0 + 1e-6)
                if bad.any():
                    Z[idx[bad]] = False
                    a = an
                    continue
            near = (np.abs(zn) <= tie_tol * fn) & ~Z & live
            return np.concatenate([an, bn]) / np.sqrt(2.0), Z | near, True
        key = pos_n.tobytes() + (bn > 0).tobytes()
        if any(key == k for k, _ in seen):  # a cycle: its few flipping samples are ties (many: give up)
            cyc = [p for k, p in seen[[k for k, _ in seen].index(key):]] + [pos_n]
            flip = np.any(np.stack(cyc) != cyc[0][None], axis=0)
            if int((Z | flip).sum()) >= m:
                return np.concatenate([a, bn]) / np.sqrt(2.0), Z, False
            Z = Z | flip
            seen = []
        else:
            seen.append((key, pos_n))
        a = an
    return np.concatenate([a, bn]) / np.sqrt(2.0), Z, False


def clarke_residual(u, g, C, lower, upper):
    """Smallest tangential residual over the Clarke subdifferential at a kinked point (docs/math.md section 6).

    At a tie the activation's slope ``s_i`` may be anything in ``[alpha, 1]``; the gradient is affine in the slopes,
    ``g(t) = g + C^T t`` with ``t_i = s_i - s_i(autodiff)`` in ``[lower_i, upper_i]``. Returns
    ``(min_t ||P_u g(t)||, t)`` (bounded least squares, :func:`scipy.optimize.lsq_linear`; ``P_u = I - u u^T``).
    """
    from scipy.optimize import lsq_linear

    u = np.asarray(u, float)
    g = np.asarray(g, float)
    Pg = g - (u @ g) * u
    if C.shape[0] == 0:
        return float(np.linalg.norm(Pg)), np.zeros(0)
    A = C.T - np.outer(u, u @ C.T)
    sol = lsq_linear(A, -Pg, bounds=(np.asarray(lower, float), np.asarray(upper, float) + 1e-300), lsmr_tol="auto")
    return float(np.linalg.norm(A @ sol.x + Pg)), sol.x


def increment_kkt(template, lifted, *, key, n_starts: int = 32, ascent_steps: int = 400, rtol: float | None = None,
                  keep: int = 4, max_rounds: int = 100, tie_tol: float | None = None, refine_rounds: int = 2,
                  refine_steps: int = 1000, certified_ratio: float = 0.5, bkink_tol: float = 1e-2):
    """Best certified KKT point of the residual NCF of a new neuron (see the module docstring).

    Arguments:
        template, lifted: from :func:`homflow.pursuit.increment_ncf_data`.
        key, n_starts, ascent_steps: random starts and iterations of the Riemannian ascent.
        rtol: certificate tolerance (default :func:`homflow.kkt.default_residual_rtol`).
        keep: the ``keep`` highest ascent end points are polished; max_rounds: pattern iterations per point.
        refine_rounds, refine_steps: if the pattern iteration does not converge from an end point, climb
            ``refine_steps`` more ascent steps and retry, at most ``refine_rounds`` times.
        certified_ratio: a certified point is preferred to a larger uncertified one if its value is at least this
            fraction of the largest value found.
        bkink_tol: an out-weight ``|b_k| <= bkink_tol ||b||`` of a unit with a kink term is tried exactly at 0.
        tie_tol: a sample is on the kink when ``|a . f_i| <= tie_tol ||a|| ||f_i||`` (default ``sqrt(eps)``).

    Returns:
        ``(best, candidates)``, each a pair ``(NCFPoint, certificate dict)`` (see :func:`certify`): the certified
        point of largest ``N_r`` (see ``certified_ratio``; else the best uncertified one) and all polished candidates.
    """
    ncf, theta = make_ncf(template, lifted, "square")
    dt = theta.dtype
    rtol = default_residual_rtol(dt) if rtol is None else float(rtol)
    tie_tol = float(np.sqrt(np.finfo(dt).eps)) if tie_tol is None else float(tie_tol)
    unflatten = flatten(template)[1]
    U, _ = _ascent(ncf, theta.size, n_starts, ascent_steps, key, dt)
    act = template.activation
    alpha = float(act.alpha)
    m = template.a.shape[0]
    k = template.b.shape[0]
    F, Gm, H0 = (np.asarray(lifted.X[:, :m]), np.asarray(lifted.X[:, m : m + k]), np.asarray(lifted.X[:, m + k :]))
    r = np.asarray(lifted.y)
    fn = np.linalg.norm(F, axis=1)
    cands = []
    for u0 in U[: int(keep)]:
        if act.degree == 1:
            u = u0
            for round_ in range(1 + int(refine_rounds)):
                if round_:  # not yet close enough to identify the piece: climb further, then retry
                    u0 = np.asarray(sphere_ascent(ncf, jnp.asarray(u0)[None], int(refine_steps))[0][0])
                    u = u0
                conv = False
                bz = (np.abs(u0[m:]) <= bkink_tol * np.linalg.norm(u0[m:])) & np.any(H0 != 0, axis=0)
                for bzero in ([bz, np.zeros_like(bz)] if bz.any() else [bz]):
                    for Z0 in _tie_candidates(F, r, Gm + H0, u0[:m]):
                        uc, _, conv = _bilinear_fixed_point(F, Gm, r, u0[:m], alpha, max_rounds, tie_tol, Z0, H0,
                                                            u0[m:], bzero)
                        if conv:
                            u = uc
                            break
                    if conv:
                        break
                if conv:
                    break
        else:
            u = polish_ncf_theta(ncf, jnp.asarray(u0), rtol=rtol, second_order=False).theta
        u = np.asarray(u) / np.linalg.norm(u)
        kink = None
        if act.degree == 1:
            a, b = u[:m], u[m:]
            z = F @ a
            Z = _ties(z, fn * np.linalg.norm(a), tie_tol)
            s_auto = np.where(z[Z] > 0, 1.0, alpha)
            Geff = Gm[Z] + H0[Z] * (b > 0)
            C = np.concatenate([(r[Z] * (Geff @ b))[:, None] * F[Z], np.zeros((int(Z.sum()), Gm.shape[1]))], 1)
            lo, hi = alpha - s_auto, 1.0 - s_auto
            # out-weights on their own kink (b_k = 0 where unit k of the next layer is on its kink on some samples):
            # the slope of relu(b_k) is free in [0, 1]
            bt = np.flatnonzero((np.abs(b) <= tie_tol * np.linalg.norm(b)) & np.any(H0 != 0, axis=0))
            if bt.size:
                sig = np.where(z > 0, z, alpha * z)
                Cb = np.zeros((bt.size, m + Gm.shape[1]))
                Cb[np.arange(bt.size), m + bt] = H0[:, bt].T @ (r * sig)
                sb = (b[bt] > 0).astype(float)  # autodiff's slope of relu(b_k) at the tie
                C, lo, hi = np.concatenate([C, Cb]), np.concatenate([lo, -sb]), np.concatenate([hi, 1.0 - sb])
            kink = (C, lo, hi)
        cands.append(certify(ncf, jnp.asarray(u, dt), unflatten=unflatten, rtol=rtol, kink=kink))
    return _select(cands, certified_ratio), cands


def _select(cands, ratio: float = 0.5):
    """The certified candidate of largest value if that value is at least ``ratio`` times the largest value found
    (any certified positive KKT point is a direction the small weights can converge to; a certified dead neuron,
    ``N = 0``, must not displace a real maximiser); otherwise the uncertified candidate of largest value."""
    top = max(cands, key=lambda c: c[0].value)
    ok = [c for c in cands if c[0].certified and c[0].value > 0]
    if ok:
        best = max(ok, key=lambda c: c[0].value)
        if best[0].value >= ratio * top[0].value:
            return best
    return top


def width_one_kkt(template, data, loss, *, key, n_starts: int = 32, ascent_steps: int = 400,
                  rtol: float | None = None, max_rounds: int = 100, tie_tol: float | None = None):
    """Best KKT point of the constrained NCF of the width-one MLP ``template`` (the start of neuron pursuit).

    ReLU (``alpha = 0``, ``p = 1``): the closed form of the module docstring (the pattern iteration with ``G = 1``),
    seeded by the ascent's best end point, certified over the Clarke subdifferential at ties; other activations: the
    ascent's best end point polished by :func:`homflow.kkt.polish_ncf_theta`. Returns ``(NCFPoint, certificate)``.
    """
    ncf, theta = make_ncf(template, data, loss)
    dt = theta.dtype
    rtol = default_residual_rtol(dt) if rtol is None else float(rtol)
    tie_tol = float(np.sqrt(np.finfo(dt).eps)) if tie_tol is None else float(tie_tol)
    unflatten = flatten(template)[1]
    U, _ = _ascent(ncf, theta.size, n_starts, ascent_steps, key, dt)
    act = template.activation
    K = len(template.weights)
    if act.degree == 1 and float(act.alpha) == 0.0:
        X, yt = np.asarray(ncf.X), np.asarray(ncf.ytilde)
        n, d = X.shape
        uu, _, _ = _bilinear_fixed_point(X, np.ones((n, 1)), yt, U[0][:d], 0.0, max_rounds, tie_tol)
        w = uu[:d] / np.linalg.norm(uu[:d])
        outer = np.ones(K - 1)
        outer[-1] = np.sign(uu[d]) or 1.0  # middle scalars > 0 (relu passes them), the read-out carries the sign
        u = np.concatenate([w, outer]) / np.sqrt(K)  # flat order of MLP: W_1, W_2, ..., W_K
        z = X @ w
        Z = _ties(z, np.linalg.norm(X, axis=1), tie_tol)
        s_auto = np.where(z[Z] > 0, 1.0, 0.0)
        c = float(np.prod(u[d:]))  # d H / d(slope) = w_K ... w_2 (w_1 . x) -> gradient factor on w_1
        C = np.concatenate([(yt[Z] * c)[:, None] * X[Z], np.zeros((int(Z.sum()), K - 1))], 1)
        return certify(ncf, jnp.asarray(u, dt), unflatten=unflatten, rtol=rtol, kink=(C, -s_auto, 1.0 - s_auto))
    pt = polish_ncf_theta(ncf, jnp.asarray(U[0]), groups=zero_preserving_groups(template), unflatten=unflatten,
                          rtol=rtol, refine_rounds=1)
    return pt, {"autodiff_residual": pt.residual, "clarke_residual": pt.residual, "ties": 0,
                "second_order": pt.second_order.kind if pt.second_order else ""}
