"""Rank-one structure of NCF KKT points of deep feed-forward nets (arXiv 2403.08121, MATH.md sections 3 and 5)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..kkt import ncf_grad, ncf_kkt_residual, polish_ncf
from ..models import MLP, unflatten_like
from ._early import ncf_flow

__all__ = ["RankCensus", "rank_one_census", "width_one_network"]


def width_one_network(model: MLP, *, tol: float = 1e-8) -> MLP | None:
    """The width-one MLP equal to a rank-one ``model`` whose hidden vectors are entrywise non-negative, or ``None``.

    With ``W_k = s_k u_k v_k^T`` and ``u_k >= 0`` (up to the sign shared with ``v_k``), ``sigma(c u) = u^p sigma(c)``
    gives ``w_1 = s_1 v_1^T`` and ``w_k = s_k <v_k, u_{k-1}^p>`` (``k >= 2``); the outputs agree exactly. For ``p = 1``
    this is the split of MATH.md section 5 (coefficients ``u_k``), an isometry that maps NCF KKT points to NCF KKT points.
    """
    p = model.activation.degree
    Ws = [np.asarray(w) for w in model.weights]
    out, u_prev = [], None
    for k, W in enumerate(Ws):
        U, S, Vt = np.linalg.svd(W)
        if S.size > 1 and S[1] > tol * S[0]:
            return None
        u, v = U[:, 0], Vt[0]
        if k < len(Ws) - 1:
            if np.all(u <= tol):
                u, v = -u, -v
            if np.any(u < -tol):
                return None
            u = np.maximum(u, 0.0)
        else:
            u = u * 1.0
        w = S[0] * (v[None, :] if k == 0 else np.array([[v @ (u_prev ** p)]]))
        if k == len(Ws) - 1:
            w = w * u[0]
        out.append(w)
        u_prev = u
    return MLP.from_weights(tuple(jnp.asarray(w) for w in out), model.activation)


@dataclasses.dataclass(frozen=True)
class RankCensus:
    """Census of certified NCF KKT points: ``points`` (the certified ones), ``rank_one`` (bool per point),
    ``nonneg`` (rank one with non-negative hidden vectors), ``width_one_residuals`` (relative NCF KKT residual of the
    width-one network of each such point, ``nan`` otherwise), ``output_errors`` (max |Phi_1 - Phi| on the data)."""

    n_starts: int
    points: list
    rank_one: np.ndarray
    nonneg: np.ndarray
    width_one_residuals: np.ndarray
    output_errors: np.ndarray

    @property
    def rank_one_fraction(self) -> float:
        return float(self.rank_one.mean()) if self.rank_one.size else float("nan")

    @property
    def width_one_residual(self) -> float:
        r = self.width_one_residuals[np.isfinite(self.width_one_residuals)]
        return float(r.max()) if r.size else float("nan")

    def summary(self) -> dict:
        return {"starts": self.n_starts, "certified": len(self.points), "rank_one": int(self.rank_one.sum()),
                "nonneg_rank_one": int(self.nonneg.sum()), "max_width_one_residual": self.width_one_residual,
                "max_output_error": float(np.nanmax(self.output_errors)) if self.output_errors.size else None}


def rank_one_census(model: MLP, data, *, loss="square", n_starts: int = 20, seed: int = 0,
                    rank_rtol: float = 1e-6) -> RankCensus:
    """Carry ``n_starts`` random directions by the NCF flow and polish them into NCF KKT points (:func:`homflow.kkt.polish_ncf`), keep the certified
    positive ones, and test each for rank one (``s_2 <= rank_rtol s_1`` in every weight matrix) and for non-negative
    hidden vectors; those are rebuilt as width-one networks (:func:`width_one_network`) and re-certified by the NCF KKT
    residual of the width-one network."""
    if not isinstance(model, MLP):
        raise ValueError(f"`model` must be an MLP; got {type(model).__name__}.")
    keys = jax.random.split(jax.random.PRNGKey(seed), n_starts)
    theta0 = jnp.concatenate([w.ravel() for w in model.weights])
    points, r1, nn, res, err = [], [], [], [], []
    for k in keys:
        start = unflatten_like(model, jax.random.normal(k, theta0.shape, theta0.dtype))
        # The NCF flow carries a random direction to (near) a positive KKT point; the polish certifies it.
        nf = ncf_flow(start, data, loss=loss, level=1e3, n_save=8)
        if not nf.escaped:
            continue
        pt = polish_ncf(unflatten_like(model, jnp.asarray(nf.direction)), data, loss=loss)
        if not (pt.certified and pt.value > 0):
            continue
        points.append(pt)
        sv = pt.singular_values
        is_r1 = all(s.size < 2 or s[1] <= rank_rtol * s[0] for s in sv)
        r1.append(is_r1)
        one = width_one_network(pt.model, tol=rank_rtol) if is_r1 else None
        nn.append(one is not None)
        if one is None:
            res.append(np.nan)
            err.append(np.nan)
            continue
        r, _ = ncf_kkt_residual(one, data, loss=loss)
        g = np.linalg.norm(np.asarray(ncf_grad(one, data, loss=loss, normalize=True)))
        res.append(float(r) / max(g, 1e-300))
        X = jnp.asarray(data.X)
        err.append(float(jnp.max(jnp.abs(jax.vmap(one)(X) - jax.vmap(pt.model)(X)))))
    return RankCensus(n_starts, points, np.asarray(r1, bool), np.asarray(nn, bool), np.asarray(res, float),
                      np.asarray(err, float))
