"""Second-order class of a constrained-NCF KKT point from the Riemannian Hessian on the unit sphere.

At a unit vector ``u`` with ``lam = <u, grad N(u)>`` the Riemannian Hessian of ``N`` restricted to the sphere is
``P (Hess N(u) - lam I) P`` with ``P = I - u u^T`` (docs/math.md §3); it is negative semidefinite on the tangent space
``u^perp`` at a local maximum ("second-order positive KKT point", arXiv 2403.08121).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SecondOrder", "tangent_basis", "riemannian_hessian_eigenvalues", "classify"]


@dataclasses.dataclass(frozen=True)
class SecondOrder:
    """Second-order class of a KKT point of ``max N(u)`` on the unit sphere.

    Attributes:
        kind: ``'local max'`` (all tangent eigenvalues ``<= tol``), ``'local min'`` (all ``>= -tol``), ``'saddle'``
            (both signs beyond ``tol``) or ``'degenerate'`` (all within ``tol``).
        max_eig, min_eig: extreme eigenvalues of the Riemannian Hessian on the tangent space.
        n_positive, n_negative, n_zero: eigenvalue counts beyond / within ``tol``.
        tol: the threshold used.
    """

    kind: str
    max_eig: float
    min_eig: float
    n_positive: int
    n_negative: int
    n_zero: int
    tol: float


def tangent_basis(u):
    """Orthonormal basis ``Q`` (P x (P-1)) of ``u^perp`` for a unit vector ``u``, from the Householder reflection that
    maps ``u`` to ``+-e_1`` (its columns 2..P)."""
    P = u.shape[0]
    s = jnp.where(u[0] >= 0, 1.0, -1.0)
    v = u.at[0].add(s)
    H = jnp.eye(P, dtype=u.dtype) - 2.0 * jnp.outer(v, v) / jnp.dot(v, v)
    return H[:, 1:]


def riemannian_hessian_eigenvalues(hess, u, lam):
    """Eigenvalues (ascending) of ``Q^T (Hess - lam I) Q`` on the tangent space of the sphere at ``u``."""
    Q = tangent_basis(u)
    M = Q.T @ (hess - lam * jnp.eye(u.shape[0], dtype=u.dtype)) @ Q
    return jnp.linalg.eigvalsh(0.5 * (M + M.T))


def classify(eigs, tol: float | None = None, *, rtol: float = 1e-8) -> SecondOrder:
    """Classify from the tangent eigenvalues; ``tol`` defaults to ``rtol * max(|eig|)`` (at least ``100 eps``)."""
    e = np.asarray(eigs)
    if e.size == 0:
        return SecondOrder("degenerate", 0.0, 0.0, 0, 0, 0, 0.0)
    scale = float(np.max(np.abs(e)))
    if tol is None:
        tol = max(rtol * scale, 100 * float(np.finfo(e.dtype).eps) * max(scale, 1.0))
    npos, nneg = int(np.sum(e > tol)), int(np.sum(e < -tol))
    nzero = int(e.size - npos - nneg)
    if npos == 0 and nneg == 0:
        kind = "degenerate"
    elif npos == 0:
        kind = "local max"
    elif nneg == 0:
        kind = "local min"
    else:
        kind = "saddle"
    return SecondOrder(kind, float(e[-1]), float(e[0]), npos, nneg, nzero, float(tol))


riemannian_hessian_eigenvalues_jit = jax.jit(riemannian_hessian_eigenvalues)
