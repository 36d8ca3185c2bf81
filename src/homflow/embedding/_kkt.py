"""Max-margin and NCF KKT quantities used to check that a split carries KKT points (MATH.md sections 3 and 5).

These are small, independent computations: residuals for *given* multipliers (the transfer claim is that the narrow
multipliers work unchanged for the wide point), multipliers by NNLS over the near-active constraints, and a small
SLSQP polish of the max-margin problem for the narrow networks of the reproductions. The full KKT machinery
(``homflow.kkt``) is preferred when it is available; :func:`verify` says which one it used.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..models import AbstractHomogeneousModel, flatten

__all__ = ["MarginKKT", "margin_kkt_residuals", "nnls_multipliers", "polish_max_margin", "ncf_residual",
           "ncf_ascent"]


@eqx.filter_jit
def _per_sample(model, X):
    """Outputs ``Phi_i`` (n,) and per-sample gradients ``grad Phi_i`` (n, P) at the model's parameters."""
    theta, unflatten = flatten(model)

    def phi(th, x):
        return unflatten(th)(x)

    X = jnp.asarray(X, theta.dtype)
    out = jax.vmap(phi, in_axes=(None, 0))(theta, X)
    grads = jax.vmap(jax.grad(phi), in_axes=(None, 0))(theta, X)
    return theta, out, grads


@dataclasses.dataclass(frozen=True)
class MarginKKT:
    """KKT residuals of ``min 1/2 ||theta||^2 s.t. y_i Phi(theta; x_i) >= 1`` at a point, for multipliers ``lam``.

    ``stationarity = ||theta - sum_i lam_i y_i grad Phi_i||``, ``feasibility = min_i q_i - 1`` (>= 0 when feasible),
    ``slackness = sum_i lam_i |q_i - 1|``; all relative quantities are left to the caller.
    """

    multipliers: np.ndarray
    stationarity: float
    feasibility: float
    slackness: float
    norm: float

    def to_dict(self):
        return {"stationarity": self.stationarity, "feasibility": self.feasibility, "slackness": self.slackness,
                "norm": self.norm, "multipliers_sum": float(np.sum(self.multipliers))}


def margin_kkt_residuals(model: AbstractHomogeneousModel, data, lam) -> MarginKKT:
    """Residuals of the max-margin KKT conditions (MATH.md section 5) at ``model`` for the multipliers ``lam`` (n,)."""
    theta, out, grads = _per_sample(model, data.X)
    y = jnp.asarray(data.y, theta.dtype)
    lam = jnp.asarray(lam, theta.dtype)
    q = y * out
    stat = jnp.linalg.norm(theta - (lam * y) @ grads)
    return MarginKKT(np.asarray(lam), float(stat), float(jnp.min(q) - 1.0), float(jnp.sum(lam * jnp.abs(q - 1.0))),
                     float(jnp.linalg.norm(theta)))


def nnls_multipliers(model: AbstractHomogeneousModel, data, *, active_tol: float = 1e-6) -> np.ndarray:
    """Multipliers by non-negative least squares on ``theta = sum_i lam_i y_i grad Phi_i`` over the near-active
    constraints ``q_i - 1 <= active_tol * max(1, ...)`` only (MATH.md section 5: slack constraints get 0)."""
    from scipy.optimize import nnls

    theta, out, grads = _per_sample(model, data.X)
    y = np.asarray(data.y, dtype=float)
    q = y * np.asarray(out)
    active = np.flatnonzero(q - 1.0 <= active_tol)
    lam = np.zeros(len(y))
    if active.size:
        A = (np.asarray(grads)[active] * y[active, None]).T
        lam[active] = nnls(A, np.asarray(theta), maxiter=50 * A.shape[1])[0]
    return lam


def polish_max_margin(model: AbstractHomogeneousModel, data, *, tol: float = 1e-13, maxiter: int = 500):
    """A max-margin KKT point near ``model`` (which must classify every sample correctly) by SLSQP on
    ``min 1/2 ||theta||^2 s.t. q_i(theta) >= 1``, started at ``theta / q_min^(1/L)``. For small networks only.

    Raises:
        ValueError: if ``model`` does not separate the data (``q_min <= 0``).
    """
    from scipy.optimize import minimize

    theta, out, _ = _per_sample(model, data.X)
    y = jnp.asarray(data.y, theta.dtype)
    qmin = float(jnp.min(y * out))
    if not qmin > 0:
        raise ValueError(f"the narrow model must separate the data to start the max-margin solve; q_min = {qmin:.3g}.")
    unflatten = flatten(model)[1]
    X = jnp.asarray(data.X, theta.dtype)
    x0 = np.asarray(theta / qmin ** (1.0 / model.degree))
    margins = jax.jit(lambda th: y * jax.vmap(unflatten(th))(X) - 1.0)
    jac = jax.jit(jax.jacfwd(lambda th: y * jax.vmap(unflatten(th))(X)))
    res = minimize(lambda th: 0.5 * float(np.dot(th, th)), x0, jac=lambda th: th, method="SLSQP",
                   constraints=[{"type": "ineq", "fun": lambda th: np.asarray(margins(jnp.asarray(th))),
                                 "jac": lambda th: np.asarray(jac(jnp.asarray(th)))}],
                   options={"ftol": tol, "maxiter": maxiter})
    return unflatten(jnp.asarray(res.x, theta.dtype))


def _ncf_value(model, data, scale):
    theta, unflatten = flatten(model)
    X = jnp.asarray(data.X, theta.dtype)
    yt = scale * jnp.asarray(data.y, theta.dtype)
    return theta, (lambda th: jnp.dot(yt, jax.vmap(unflatten(th))(X)))


def ncf_residual(model: AbstractHomogeneousModel, data, *, ncf_scale: float = 1.0):
    """``(residual, lam, N(u))`` of the constrained NCF at ``u = theta/||theta||`` (MATH.md section 3):
    ``residual = ||grad N(u) - <u, grad N(u)> u||``, ``lam = <u, grad N(u)>``; ``ytilde = ncf_scale * y``."""
    theta, N = _ncf_value(model, data, ncf_scale)
    u = theta / jnp.linalg.norm(theta)
    val, g = jax.value_and_grad(N)(u)
    lam = jnp.dot(u, g)
    return float(jnp.linalg.norm(g - lam * u)), float(lam), float(val)


def ncf_ascent(model: AbstractHomogeneousModel, data, *, ncf_scale: float = 1.0, steps: int = 5000, lr: float = 0.1):
    """An approximate NCF KKT point from ``model``'s direction by projected gradient ascent on the sphere,
    ``u <- (u + lr grad N(u)) / ||.||`` (a fallback when ``homflow.kkt`` is not available)."""
    theta, N = _ncf_value(model, data, ncf_scale)
    grad = jax.grad(N)

    def body(u, _):
        v = u + lr * grad(u)
        return v / jnp.linalg.norm(v), None

    u, _ = jax.lax.scan(body, theta / jnp.linalg.norm(theta), None, length=int(steps))
    return flatten(model)[1](u)
