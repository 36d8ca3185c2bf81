"""KKT residual of the constrained NCF with Clarke subgradients at kinks (docs/math.md sections 3 and 6).

``max N(u) = sum_i ytilde_i Phi(u; x_i)`` s.t. ``||u|| = 1`` is a KKT point when some ``h`` in the (Clarke)
subdifferential of ``N`` at ``u`` satisfies ``h = <u, h> u``. For ReLU / leaky-ReLU networks the certificate takes
``h = sum_i ytilde_i h_i`` with ``h_i`` in ``conv D_i(u)``, the convex hull of the gradients at the extreme slope
patterns of sample ``i``'s kinks (:mod:`homflow.kkt._clarke`; the sum rule gives a subset of the Clarke
subdifferential's outer estimate ``sum_i ytilde_i conv D_i``, which is what backpropagation with free slopes produces):

    residual = min over beta_i in the simplex of || P_u sum_i ytilde_i sum_b beta_ib g_ib ||,   P_u = I - u u^T.

The simplex constraints are imposed by NNLS with heavily weighted rows ``w (1^T beta_i - 1)`` (Lawson & Hanson's
weighting method for equality constraints); the weights found are then renormalised to sum to one exactly and the
residual recomputed from them, so the number reported is the honest residual of a valid element of the set.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from scipy.optimize import nnls

from ..models import AbstractHomogeneousModel, flatten, safe_norm
from ._clarke import (
    DEFAULT_KINK_TOL,
    DEFAULT_MAX_PATTERNS,
    chosen_slopes,
    clarke_columns,
    clarke_supported,
    kink_structure,
)
from ._ncf import make_ncf, tangent_gradient

__all__ = ["NCFClarke", "ncf_clarke_residual", "DEFAULT_NCF_CLARKE_RTOL"]

DEFAULT_NCF_CLARKE_RTOL = 1e-10
"""Default relative residual of a Clarke-certified NCF KKT point (the weighting method's accuracy is ~1e-12)."""


@dataclasses.dataclass(frozen=True)
class NCFClarke:
    """The Clarke KKT residual of the constrained NCF at ``u = theta / ||theta||``.

    Attributes:
        residual: ``||h - <u, h> u||`` for the best ``h`` found; relative_residual: divided by ``||h||``.
        smooth_residual: the residual with autodiff's gradient (slope ``alpha`` at kinks), for comparison.
        lam: ``<u, h>``; value: ``N(u)``.
        kinks: per hidden layer, boolean ``(n, h_k)``; slopes: the slopes used, the weighted mean at kinks.
        exact: every extreme pattern enumerated; certified: ``relative_residual <= rtol``; rtol, kink_tol: tolerances.
    """

    residual: float
    relative_residual: float
    smooth_residual: float
    lam: float
    value: float
    kinks: tuple | None
    slopes: tuple | None
    exact: bool
    certified: bool
    rtol: float
    kink_tol: float

    @property
    def n_kinks(self) -> int:
        return 0 if self.kinks is None else int(sum(int(np.sum(K)) for K in self.kinks))


def ncf_clarke_residual(model: AbstractHomogeneousModel, data, *, loss, kink_tol: float = DEFAULT_KINK_TOL,
                        max_patterns: int = DEFAULT_MAX_PATTERNS, rtol: float = DEFAULT_NCF_CLARKE_RTOL,
                        weight: float = 1e6) -> NCFClarke:
    """Clarke-aware KKT residual of ``max N(u)`` s.t. ``||u|| = 1`` at ``u = theta / ||theta||`` (module docstring).

    Arguments:
        model: the network (any non-zero scale); data, loss: the NCF's data and the loss that fixes ``ytilde``.
        kink_tol: a pre-activation is at a kink when ``|z| <= kink_tol ||w|| ||h||`` (see :mod:`homflow.kkt._clarke`).
        max_patterns: most extreme slope patterns per sample (beyond: the inner approximation, ``exact=False``).
        rtol: ``certified`` when ``relative_residual <= rtol`` (default 1e-10).
        weight: relative weight of the simplex rows in the NNLS (default 1e6, times the columns' largest norm).

    Returns:
        An :class:`NCFClarke`. For networks without kinks (:func:`homflow.kkt.clarke_supported` False) it is the usual
        tangential gradient of :func:`homflow.kkt.ncf_kkt_residual`.

    Raises:
        ValueError: if every parameter is zero, the data do not fit, or a tolerance is out of range.
    """
    for name, v in (("kink_tol", kink_tol), ("rtol", rtol), ("weight", weight)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"`{name}` must be a finite number >= 0; got {v!r}.")
    obj, theta = make_ncf(model, data, loss)
    nrm = float(safe_norm(theta))
    if not nrm > 0:
        raise ValueError("`model` has all parameters zero; the NCF direction u = theta/||theta|| is undefined.")
    u = np.asarray(theta / nrm, dtype=np.float64)
    val, g = obj.value_and_grad(jnp.asarray(u, dtype=theta.dtype))
    g = np.asarray(g, dtype=np.float64)
    smooth = float(np.linalg.norm(np.asarray(tangent_gradient(jnp.asarray(u), jnp.asarray(g)))))
    if not clarke_supported(model):
        h = g
        kinks = slopes = None
        exact = True
    else:
        unflatten = flatten(model)[1]
        X, yt = np.asarray(obj.X), np.asarray(obj.ytilde)
        ks = kink_structure(unflatten, u, X, kink_tol=kink_tol)
        counts = ks.counts()
        kinked = np.flatnonzero(counts > 0)
        if kinked.size == 0:
            h, exact = g, True
            slopes = tuple(b.copy() for b in ks.base)
        else:
            # gradients at every extreme pattern (y = 1: the columns are grad Phi_s), weighted by ytilde
            Gc, owner, pats, exact = clarke_columns(unflatten, u, X, np.ones_like(yt), kinked, ks,
                                                    max_patterns=int(max_patterns))
            Gc = Gc * yt[owner][:, None]
            # the samples without kinks, with autodiff's gradient (no kink: it is the gradient)
            smooth_ks = dataclasses.replace(ks, kinks=tuple(np.zeros_like(K) for K in ks.kinks),
                                            base=tuple(np.where(z > 0, 1.0, ks.alpha) for z in ks.z))
            base_cols, _, _, _ = clarke_columns(unflatten, u, X, np.ones_like(yt), kinked, smooth_ks)
            h0 = g - (yt[kinked][:, None] * base_cols).sum(axis=0)
            Pu = lambda v: v - (v @ u) * u  # noqa: E731
            C = np.apply_along_axis(Pu, 1, Gc).T  # (P, N)
            c0 = Pu(h0)
            w = weight * max(float(np.linalg.norm(C, axis=0).max()), 1.0)
            E = np.zeros((kinked.size, C.shape[1]))
            for r, i in enumerate(kinked):
                E[r, owner == i] = w
            A = np.vstack([C, E])
            b = np.concatenate([-c0, w * np.ones(kinked.size)])
            beta, _ = nnls(A, b, maxiter=50 * max(A.shape[1], 10))
            for i in kinked:  # exact convex weights
                sel = owner == i
                tot = beta[sel].sum()
                beta[sel] = beta[sel] / tot if tot > 0 else np.full(sel.sum(), 1.0 / sel.sum())
            h = h0 + Gc.T @ beta
            lamvec = np.zeros(X.shape[0])
            np.add.at(lamvec, owner, beta)
            slopes = chosen_slopes(ks, owner, pats, beta, lamvec)
        kinks = ks.kinks
    lam = float(h @ u)
    res = float(np.linalg.norm(h - lam * u))
    hn = float(np.linalg.norm(h))
    rel = res / hn if hn > 0 else math.inf
    return NCFClarke(residual=res, relative_residual=rel, smooth_residual=smooth, lam=lam, value=float(val),
                     kinks=kinks, slopes=slopes, exact=bool(exact), certified=bool(rel <= rtol), rtol=float(rtol),
                     kink_tol=float(kink_tol))
