"""Riemannian gradient ascent of the NCF on the unit sphere, batched over many starts (vmap).

``u <- (u + eta P grad N(u)) / ||.||`` with ``P = I - u u^T`` and a per-start step ``eta`` that grows by 1.5 after an
accepted step (Armijo: ``N`` rises by at least ``1e-4 eta ||P grad N||^2``) and halves after a rejected one. Its fixed
points are the KKT points of ``max N(u)`` s.t. ``||u|| = 1``; it climbs to local maxima (positive KKT points) from
almost every start, the discrete counterpart of the normalised NCF flow (docs/math.md section 3, arXiv 2403.08121).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ..flow import Problem
from ._ncf import NCF

__all__ = ["sphere_ascent"]


def _normalise(v):
    return v / jnp.linalg.norm(v)


@eqx.filter_jit
def sphere_ascent(ncf: NCF, U, steps: int, eta0=None, armijo: float = 1e-4):
    """Run ``steps`` ascent steps from each row of ``U`` (B, P); returns ``(U, values, tangential residuals)``.

    Arguments:
        ncf: a :class:`homflow.flow.Problem` or its :class:`NCF` view (:func:`make_ncf`); U: starting directions (normalised here); steps: number of iterations (static).
        eta0: initial step (scalar or (B,)); default ``0.1 / ||grad N(u_0)||`` per start.
        armijo: sufficient-increase constant.
    """
    ncf = NCF(ncf) if isinstance(ncf, Problem) else ncf
    U = jax.vmap(_normalise)(U)

    def init(u):
        v, g = ncf.value_and_grad(u)
        return v, g

    vals, grads = jax.vmap(init)(U)
    if eta0 is None:
        eta = 0.1 / jnp.maximum(jnp.linalg.norm(grads, axis=-1), jnp.finfo(U.dtype).tiny)
    else:
        eta = jnp.broadcast_to(jnp.asarray(eta0, U.dtype), vals.shape)

    def one(u, v, g, e):
        gt = g - jnp.dot(u, g) * u
        c = _normalise(u + e * gt)
        vc, gc = ncf.value_and_grad(c)
        ok = vc >= v + armijo * e * jnp.dot(gt, gt)
        return (jnp.where(ok, c, u), jnp.where(ok, vc, v), jnp.where(ok, gc, g), jnp.where(ok, 1.5 * e, 0.5 * e))

    def body(carry, _):
        return jax.vmap(one)(*carry), None

    (U, vals, grads, eta), _ = jax.lax.scan(body, (U, vals, grads, eta), None, length=steps)
    res = jnp.linalg.norm(grads - jnp.sum(U * grads, -1, keepdims=True) * U, axis=-1)
    return U, vals, res
