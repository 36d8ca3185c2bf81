"""KKT points of the max-margin problem ``min 1/2 ||theta||^2`` s.t. ``y_i Phi(theta; x_i) >= 1`` (MATH.md section 5).

KKT (arXiv 1906.05890, App. C): feasible, and ``lambda >= 0`` with ``theta = sum_i lambda_i y_i grad Phi(theta; x_i)``
and ``lambda_i (q_i - 1) = 0``. A direction with ``q_min > 0`` is rescaled to ``theta = theta_hat / q_min^(1/L)``;
it is ``(eps, delta)``-KKT when ``||theta - sum lambda_i grad q_i|| <= eps`` and ``sum lambda_i (q_i - 1) <= delta``.

Multipliers: non-negative least squares on the stationarity equation over the *near-active* constraints only
(``q_i <= 1 + active_tol``), so that slack constraints cannot absorb the stationarity error. To make them well defined
when the gradients ``grad q_i`` of the near-active set are linearly dependent (then the NNLS minimisers form a
polytope), homflow returns the unique minimiser of ``||theta - G_A^T lambda||^2 + mu ||lambda||^2`` over
``lambda >= 0`` with ``mu = ridge * ||G_A G_A^T||_2`` (default ``ridge = 1e-13``): the minimum-norm NNLS multiplier up
to ``O(ridge)``. It depends on the data only through the Gram matrix ``G_A G_A^T`` and ``G_A theta``, so an isometry
that preserves outputs and maps gradients (neuron splitting, 2505.12419) gives the same multipliers.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float
from scipy.optimize import nnls

from ..models import AbstractHomogeneousModel, flatten
from ._ncf import Unflatten, unflattener

__all__ = ["MarginProblem", "make_margin_problem", "MarginKKT", "max_margin_kkt", "margin_multipliers"]


class MarginProblem(eqx.Module):
    """Margins ``q_i(theta) = y_i Phi(theta; x_i)`` of one architecture on flat vectors, with Jacobian and Hessians."""

    X: Float[Array, "n d"]
    y: Float[Array, " n"]
    unflatten: Unflatten = eqx.field(static=True)
    degree: int = eqx.field(static=True)

    def margins(self, theta):
        return self.y * jax.vmap(self.unflatten(theta))(self.X)

    def jacobian(self, theta):
        """``G`` (n, P) with rows ``grad q_i(theta)``."""
        return jax.jacrev(self.margins)(theta)

    def weighted_hessian(self, theta, lam):
        """``sum_i lam_i Hess q_i(theta)`` (P x P)."""
        return jax.hessian(lambda t: jnp.dot(lam, self.margins(t)))(theta)


def make_margin_problem(model: AbstractHomogeneousModel, data) -> tuple[MarginProblem, Float[Array, " P"]]:
    """The :class:`MarginProblem` of ``model``'s architecture on ``data`` (labels must be +-1), and ``model``'s vector.

    Raises:
        ValueError: if the data's dimension does not match or a label is not -1 or +1.
    """
    data.check_model(model)
    data.check_for("exponential")
    theta = flatten(model)[0]
    X = jnp.asarray(data.X, dtype=theta.dtype)
    y = jnp.asarray(data.y, dtype=theta.dtype)
    return MarginProblem(X, y, unflattener(model), model.degree), theta


_margins_jac = eqx.filter_jit(lambda prob, theta: (prob.margins(theta), prob.jacobian(theta)))


def margin_multipliers(G, theta, *, ridge: float = 1e-13) -> np.ndarray:
    """Multipliers ``lambda >= 0`` minimising ``||theta - G^T lambda||^2 + mu ||lambda||^2``, ``mu = ridge ||G G^T||``.

    Solved by ``scipy.optimize.nnls`` on the square-root form of the Gram matrix ``K = G G^T = V diag(s) V^T``:
    ``min || [diag(sqrt s) V^T; sqrt(mu) I] lambda - [diag(1/sqrt s) V^T G theta; 0] ||`` (rows with ``s`` below
    ``1e-15 max s`` are dropped). ``G`` (m, P) holds the near-active rows ``grad q_i``.
    """
    G = np.asarray(G, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    m = G.shape[0]
    if m == 0:
        return np.zeros(0)
    K = G @ G.T
    b = G @ theta
    s, V = np.linalg.eigh(0.5 * (K + K.T))
    smax = max(float(s.max()), 0.0)
    if smax <= 0.0:
        return np.zeros(m)
    keep = s > 1e-15 * smax
    R = np.sqrt(s[keep])[:, None] * V[:, keep].T
    c = (V[:, keep].T @ b) / np.sqrt(s[keep])
    mu = ridge * smax
    A = np.vstack([R, math.sqrt(mu) * np.eye(m)]) if mu > 0 else R
    rhs = np.concatenate([c, np.zeros(m)]) if mu > 0 else c
    lam, _ = nnls(A, rhs, maxiter=50 * max(m, 10))
    return lam


@dataclasses.dataclass(frozen=True)
class MarginKKT:
    """How far a network is from a KKT point of the max-margin problem (arXiv 1906.05890).

    Attributes:
        model: the rescaled point ``theta = theta_hat / q_min^(1/L)`` (so ``q_min = 1``).
        theta: its flat vector (numpy).
        multipliers: ``lambda`` (n,), zero outside the near-active set (see the module docstring for uniqueness).
        margins: ``q_i`` at ``theta``.
        eps: ``||theta - sum_i lambda_i grad q_i||``; stationarity: ``eps / ||theta||``.
        feasibility: ``max(0, max_i (1 - q_i))`` (0 up to rounding after the rescale).
        delta: ``sum_i lambda_i (q_i - 1)``; slackness: ``delta / sum_i lambda_i`` (0 when all lambda vanish).
        normalized_margin: ``q_min(theta_hat) / ||theta_hat||^L = ||theta||^-L``.
        active: indices with ``q_i <= 1 + active_tol``; support: indices with ``lambda_i > 0``.
        rank: rank of the near-active Jacobian (multipliers unique among exact NNLS minimisers iff full row rank on
            the support).
        converged, message, iterations: set by :func:`solve_max_margin` (``None``, ``''``, 0 otherwise).
        distance: set by :func:`solve_max_margin`: ``||theta/||theta|| - theta_0/||theta_0||||``, how far the polished
            direction lies from the start's direction (NaN otherwise).
        start_normalized_margin: set by :func:`solve_max_margin`: the start's normalized margin (NaN otherwise).
    """

    model: AbstractHomogeneousModel
    theta: np.ndarray
    multipliers: np.ndarray
    margins: np.ndarray
    eps: float
    stationarity: float
    feasibility: float
    delta: float
    slackness: float
    normalized_margin: float
    active: np.ndarray
    support: np.ndarray
    rank: int
    active_tol: float
    converged: bool | None = None
    message: str = ""
    iterations: int = 0
    distance: float = math.nan
    start_normalized_margin: float = math.nan

    def replace(self, **kw) -> "MarginKKT":
        return dataclasses.replace(self, **kw)


def _kkt_from_theta(prob: MarginProblem, theta, unflatten, *, active_tol, ridge, rescale=True) -> MarginKKT:
    theta = jnp.asarray(theta)
    q, _ = _margins_jac(prob, theta)
    qmin = float(jnp.min(q))
    if not qmin > 0:
        raise ValueError(
            f"the minimum margin q_min = min_i y_i Phi(theta; x_i) must be > 0 for the max-margin problem; got {qmin:.3g}. "
            "Train further (the late phase starts once every sample is classified correctly)."
        )
    L = prob.degree
    if rescale:
        theta = theta / qmin ** (1.0 / L)
    q, G = _margins_jac(prob, theta)
    q, G, th = np.asarray(q), np.asarray(G), np.asarray(theta)
    active = np.flatnonzero(q <= 1.0 + active_tol)
    lam = np.zeros(q.size)
    lam[active] = margin_multipliers(G[active], th, ridge=ridge)
    r = th - G.T @ lam
    eps = float(np.linalg.norm(r))
    nrm = float(np.linalg.norm(th))
    delta = float(lam @ (q - 1.0))
    slack = delta / float(lam.sum()) if lam.sum() > 0 else 0.0
    rank = int(np.linalg.matrix_rank(G[active])) if active.size else 0
    return MarginKKT(
        model=unflatten(jnp.asarray(th)),
        theta=th,
        multipliers=lam,
        margins=q,
        eps=eps,
        stationarity=eps / nrm,
        feasibility=float(max(0.0, np.max(1.0 - q))),
        delta=delta,
        slackness=slack,
        normalized_margin=float(np.min(q)) / nrm**L,
        active=active,
        support=np.flatnonzero(lam > 0),
        rank=rank,
        active_tol=float(active_tol),
    )


def max_margin_kkt(model: AbstractHomogeneousModel, data, *, active_tol: float = 1e-2, ridge: float = 1e-13) -> MarginKKT:
    """Rescale ``model`` to ``q_min = 1`` and measure its distance to a KKT point of the max-margin problem.

    Arguments:
        model: any network with positive minimum margin on ``data`` (only its direction matters).
        data: a ``Dataset`` with labels +-1.
        active_tol: constraints with ``q_i <= 1 + active_tol`` carry multipliers (near-active set; MATH.md section 5).
        ridge: relative ridge that makes the multipliers unique (module docstring).

    Returns:
        A :class:`MarginKKT` with ``multipliers``, ``stationarity`` (relative), ``eps``, ``delta``, ``feasibility``,
        ``slackness``, ``normalized_margin``, ``support``. Formulas: MATH.md section 5, arXiv 1906.05890 App. C.

    Raises:
        ValueError: if the minimum margin is not positive, labels are not +-1, or ``active_tol < 0``.

    >>> import jax.numpy as jnp
    >>> from homflow.models import MLP
    >>> from homflow.data import Dataset
    >>> r = max_margin_kkt(MLP.from_weights((jnp.array([[2.0, 2.0]]),), None), Dataset(jnp.eye(2), jnp.ones(2)))
    >>> r.theta.tolist(), r.multipliers.round(9).tolist(), r.stationarity < 1e-12, round(r.normalized_margin, 4)
    ([1.0, 1.0], [1.0, 1.0], True, 0.7071)
    """
    if not (active_tol >= 0 and math.isfinite(active_tol)):
        raise ValueError(f"`active_tol` must be a finite number >= 0; got {active_tol!r}.")
    prob, theta = make_margin_problem(model, data)
    return _kkt_from_theta(prob, theta, flatten(model)[1], active_tol=active_tol, ridge=ridge)
