"""A Clarke SQP presolve for the max-margin problem of ReLU-type networks (docs/kkt.md, "the Clarke SQP").

The max-margin problem ``min 1/2 ||theta||^2`` s.t. ``q_i(theta) >= 1`` of a leaky-ReLU / ReLU network has piecewise
polynomial margins. Near ``theta``, every sample's margin is one of its *pieces* ``q_i^s = y_i Phi_s(theta; x_i)``
(:func:`homflow.kkt._clarke.gated_output`): the gated output with the slopes of the current activation pattern off the
kinks and, at each pre-activation within ``tau`` (relative, a cosine) of zero, either ``alpha`` or ``1``. The SQP asks
*every* piece of a near-active sample to stay ``>= 1`` to first order:

    min_d  1/2 d^T H d + theta^T d    s.t.  q_p(theta) + grad q_p(theta) . d >= 1   for every piece p,

with ``H`` the Hessian of the Lagrangian ``1/2 ||theta||^2 - sum_p w_p q_p`` (previous multipliers), made positive
definite (negative curvature along the normals of the active pieces is removed by a penalty on those normals, which
does not change a step at a solution; what is left is mirrored, ``|eigenvalue|``, floored at ``hess_floor``). The QP is
a least-distance problem after the Cholesky-like change of variables ``e = H^(1/2) d + H^(-1/2) theta`` and is solved by
NNLS (Lawson and Hanson's LDP reduction), which tolerates the highly dependent piece gradients (``2^m`` per sample with
``m`` kinks) that made SLSQP stop at its iteration limit. Steps are capped at ``max_step ||theta||`` and backtracked on
the exact l1 merit ``1/2 ||theta||^2 + rho sum_i max(0, 1 - q_i)`` over the *true* margins, with one second-order
correction against the Maratos effect.

A fixed point satisfies ``theta = sum_p w_p grad q_p``, ``w >= 0``, ``w_p (q_p - 1) = 0``: a KKT point in the sense of
the Clarke certificate (:func:`homflow.kkt.max_margin_kkt`) with kink tolerance ``tau``. The iteration converges only
linearly on these degenerate problems, so it is a *presolve*: a few dozen iterations at ``tau = 1e-2`` then ``1e-3``
bring a long-GD start near a KKT point and its kinks near zero, from where the kink-holding Newton method
(:mod:`homflow.kkt._kink_newton`) converges quadratically and the certificate is computed from scratch.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import nnls

from ._clarke import gated_output, kink_structure, padded_columns, pattern_slopes
from ._kink_newton import _margins

__all__ = ["clarke_sqp", "least_distance"]


def _piece_values(prob, theta, idx, slopes):
    return jax.vmap(lambda i, s: prob.y[i] * gated_output(prob.unflatten(theta), prob.X[i], s))(idx, slopes)


@eqx.filter_jit
def _pieces(prob, theta, idx, slopes):
    return _piece_values(prob, theta, idx, slopes), jax.jacrev(_piece_values, argnums=1)(prob, theta, idx, slopes)


@eqx.filter_jit
def _lagrangian_hessian(prob, theta, w, idx, slopes):
    return jax.hessian(lambda t: 0.5 * t @ t - w @ _piece_values(prob, t, idx, slopes))(theta)


def least_distance(G, h):
    """``min ||e||`` s.t. ``G e >= h`` by NNLS (Lawson and Hanson, *Solving Least Squares Problems*, ch. 23).

    Returns ``(e, w)`` with the multipliers ``w >= 0`` (``e = G^T w``), or ``(None, None)`` if the constraints are
    inconsistent.
    """
    m, P = G.shape
    E = np.vstack([G.T, h[None, :]])
    f = np.zeros(P + 1)
    f[-1] = 1.0
    u, _ = nnls(E, f, maxiter=50 * (m + P))
    r = E @ u - f
    if not -r[-1] > 1e-14:
        return None, None
    return -r[:P] / r[-1], u / -r[-1]


def clarke_sqp(prob, theta, *, kink_tols=(1e-2, 1e-3), max_iter: int = 40, tol: float = 1e-11,
               expand_tol: float = 0.1, max_patterns: int = 256, hess_floor: float = 1e-3, max_step: float = 0.1,
               armijo: float = 1e-4, max_halvings: int = 30):
    """Run the Clarke SQP (module docstring) from ``theta`` (flat, positive margins), ``max_iter`` iterations per kink
    tolerance in ``kink_tols`` (a continuation: pieces beyond a unit's kink are asked for only while it is within the
    current tolerance).

    Arguments:
        prob: a :class:`homflow.kkt.MarginProblem` of a supported network (:func:`homflow.kkt.clarke_supported`).
        theta: the start (any scale with positive margins; rescaled to ``q_min = 1``).
        kink_tols: the continuation's kink tolerances (relative, as :func:`homflow.kkt.max_margin_kkt`'s).
        max_iter: iterations per tolerance; tol: stop a stage when stationarity ``||theta - sum w_p grad q_p||`` /
            ``||theta||``, infeasibility and complementarity of the pieces are all below it.
        expand_tol: only samples with ``q_i <= 1 + expand_tol`` contribute every piece; the others their current one.
        max_patterns: cap on the pieces per sample (beyond it the inner set of :func:`homflow.kkt._clarke._patterns`).
        hess_floor: smallest eigenvalue of the modified Hessian; max_step: longest step, relative to ``||theta||``.
        armijo, max_halvings: the line search on the l1 merit.

    Returns:
        ``(theta, iterations, message)``; ``message`` is empty when the last stage met ``tol``.
    """
    th = np.asarray(theta, dtype=np.float64)
    q = np.asarray(_margins(prob, jnp.asarray(th)))
    if not q.min() > 0:
        raise ValueError(f"the Clarke SQP needs positive margins at the start; got q_min = {q.min():.3g}.")
    L = prob.degree
    th = th / q.min() ** (1.0 / L)
    dtype = jnp.asarray(theta).dtype
    n = int(prob.X.shape[0])
    mult, rho, its, msg = {}, 1.0, 0, ""

    def merit(t, q=None):
        q = np.asarray(_margins(prob, jnp.asarray(t, dtype=dtype))) if q is None else q
        return 0.5 * float(t @ t) + rho * float(np.maximum(1.0 - q, 0.0).sum())

    for tau in kink_tols:
        msg = f"the Clarke SQP did not meet tol {tol:g} in {max_iter} iterations at kink tolerance {tau:g}"
        for _ in range(max_iter):
            q = np.asarray(_margins(prob, jnp.asarray(th, dtype=dtype)))
            ks = kink_structure(prob.unflatten, th, prob.X, kink_tol=tau)
            owner, pats, slopes, _ = pattern_slopes(range(n), ks, max_patterns=max_patterns,
                                                    expand=q <= 1.0 + expand_tol)
            keys = [(int(o), tuple(sorted(p.items()))) for o, p in zip(owner, pats)]
            N = len(keys)
            idx, sl = padded_columns(owner, slopes, dtype)
            v, A = _pieces(prob, jnp.asarray(th, dtype=dtype), idx, sl)
            c = np.asarray(v, dtype=np.float64)[:N] - 1.0
            A = np.asarray(A, dtype=np.float64)[:N]
            w = np.array([mult.get(k, 0.0) for k in keys])
            nrm = float(np.linalg.norm(th))
            stat = float(np.linalg.norm(th - A.T @ w)) / nrm
            if (stat <= tol and max(0.0, -c.min()) <= tol
                    and abs(float(w @ c)) <= tol * max(float(w.sum()), np.finfo(np.float64).tiny)):
                msg = ""
                break
            w_pad = np.zeros(idx.shape[0])
            w_pad[:N] = w
            H = np.asarray(_lagrangian_hessian(prob, jnp.asarray(th, dtype=dtype), jnp.asarray(w_pad, dtype=dtype),
                                               idx, sl), dtype=np.float64)
            H = 0.5 * (H + H.T)
            act = w > 0
            if act.any():
                An = A[act] / np.maximum(np.linalg.norm(A[act], axis=1, keepdims=True), np.finfo(np.float64).tiny)
                H = H + (2.0 * max(0.0, -float(np.linalg.eigvalsh(H)[0])) + 1.0) * (An.T @ An)
            e, V = np.linalg.eigh(H)
            e = np.maximum(np.abs(e), hess_floor)
            se = np.sqrt(e)
            Rinv = V / se
            G = A @ Rinv
            vt = V.T @ th
            shift = A @ (V @ (vt / e))
            ev, wn = least_distance(G, -c + shift)
            if ev is None:
                return th, its, "the Clarke SQP's linearised constraints are inconsistent"
            d = Rinv @ (ev - vt / se)
            cap = max_step * nrm
            if np.linalg.norm(d) > cap:
                d *= cap / float(np.linalg.norm(d))
            rho = max(rho, 2.0 * float(wn.max(initial=0.0)))
            f0 = merit(th, q)
            slope = float(th @ d) - rho * float(np.maximum(1.0 - q, 0.0).sum())
            if merit(th + d) > f0 + armijo * min(slope, 0.0):  # second-order correction (Maratos effect)
                v1 = np.asarray(_pieces(prob, jnp.asarray(th + d, dtype=dtype), idx, sl)[0], dtype=np.float64)[:N]
                ev2, wn2 = least_distance(G, -(v1 - 1.0 - A @ d) + shift)
                if ev2 is not None:
                    d2 = Rinv @ (ev2 - vt / se)
                    if np.linalg.norm(d2) <= cap and merit(th + d2) <= f0 + armijo * min(slope, 0.0):
                        d, wn = d2, wn2
            a = 1.0
            for _ in range(max_halvings):
                if merit(th + a * d) <= f0 + armijo * a * min(slope, 0.0):
                    break
                a *= 0.5
            th = th + a * d
            w = w + a * (wn - w)
            mult = {k: float(x) for k, x in zip(keys, w) if x > 0}
            its += 1
    q = np.asarray(_margins(prob, jnp.asarray(th, dtype=dtype)))
    if not q.min() > 0:
        return th, its, "the Clarke SQP ended at a non-positive margin"
    return th / q.min() ** (1.0 / L), its, msg
