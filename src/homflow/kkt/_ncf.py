"""The neural correlation function (NCF) ``N(u) = sum_i ytilde_i Phi(u; x_i)`` and its constrained KKT residual.

MATH.md section 3 (arXiv 2402.09226, 2403.08121): near the origin gradient flow follows ``du/ds = grad N(u)``; the
directions it reaches are KKT points of ``max N(u)`` subject to ``||u|| = 1``: ``grad N(u) = lambda u`` with
``lambda = L N(u)`` (Euler). The residual of a point is the tangential gradient ``||grad N(u) - <u, grad N(u)> u||`` at
the normalised point ``u = theta / ||theta||``.
"""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..losses import get_loss
from ..models import AbstractHomogeneousModel, flatten, safe_norm

__all__ = ["NCF", "Unflatten", "unflattener", "make_ncf", "ncf", "ncf_grad", "ncf_kkt_residual", "tangent_gradient"]


def tangent_gradient(u: Float[Array, " P"], g: Float[Array, " P"]) -> Float[Array, " P"]:
    """Projection ``g - <u, g> u`` of ``g`` onto the tangent space of the unit sphere at the unit vector ``u``."""
    return g - jnp.dot(u, g) * u


class NCF(eqx.Module):
    """``theta -> N(theta) = sum_i ytilde_i Phi(theta; x_i)`` on flat parameter vectors (jit and vmap friendly).

    Build one with :func:`make_ncf`. ``N`` is positively homogeneous of order ``degree`` like the network.
    """

    X: Float[Array, "n d"]
    ytilde: Float[Array, " n"]
    unflatten: Callable = eqx.field(static=True)
    degree: int = eqx.field(static=True)

    def outputs(self, theta, X=None):
        """Network outputs ``Phi(theta; x_i)`` on the data (or on ``X``)."""
        model = self.unflatten(theta)
        return jax.vmap(model)(self.X if X is None else X)

    def value(self, theta):
        """``N(theta)``."""
        return jnp.dot(self.ytilde, self.outputs(theta))

    def grad(self, theta):
        """``grad N(theta)``."""
        return jax.grad(self.value)(theta)

    def value_and_grad(self, theta):
        return jax.value_and_grad(self.value)(theta)

    def hessian(self, theta):
        """Dense Hessian ``Hess N(theta)`` (P x P; forward over reverse). For ReLU-type activations (``p = 1``) it is
        the Hessian of the polynomial piece selected by the current activation pattern."""
        return jax.jacfwd(jax.grad(self.value))(theta)

    def hvp(self, theta, v):
        """``Hess N(theta) v``."""
        return jax.jvp(jax.grad(self.value), (theta,), (v,))[1]

    def residual(self, theta):
        """``(residual, lam, value)`` at ``u = theta / ||theta||``: the tangential gradient norm, ``lam = <u, grad N(u)>``
        (which equals ``L N(u)`` by Euler's identity) and ``N(u)``."""
        u = theta / safe_norm(theta)
        val, g = self.value_and_grad(u)
        return safe_norm(tangent_gradient(u, g)), jnp.dot(u, g), val


class Unflatten(eqx.Module):
    """Hashable ``theta -> model`` map for one architecture (equal for equal architectures, so jitted functions taking
    an :class:`NCF` compile once per architecture, not once per call)."""

    skeleton: object = eqx.field(static=True)
    treedef: object = eqx.field(static=True)
    shapes: tuple = eqx.field(static=True)

    def __call__(self, theta):
        leaves, start = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape, dtype=np.int64))
            leaves.append(jnp.reshape(theta[start : start + size], shape))
            start += size
        return eqx.combine(jax.tree_util.tree_unflatten(self.treedef, leaves), self.skeleton)


def unflattener(model: AbstractHomogeneousModel) -> Unflatten:
    """The :class:`Unflatten` of ``model``'s architecture (same order as :func:`homflow.models.flatten`)."""
    params, skeleton = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return Unflatten(skeleton, treedef, tuple(tuple(x.shape) for x in leaves))


def make_ncf(model: AbstractHomogeneousModel, data, loss) -> tuple[NCF, Float[Array, " P"]]:
    """The NCF of ``model``'s architecture on ``data`` with the effective labels of ``loss``, and ``model``'s vector.

    ``ytilde_i = -dl/dPhi(0, y_i)``: ``y`` for the square and exponential losses, ``y / 2`` for the logistic loss.

    Raises:
        ValueError: if the data's dimension does not match the model or a classification loss meets labels not +-1.
    """
    loss = get_loss(loss)
    data.check_model(model)
    data.check_for(loss)
    theta, _ = flatten(model)
    unflatten = unflattener(model)
    X = jnp.asarray(data.X, dtype=theta.dtype)
    ytilde = jnp.asarray(loss.ncf_labels(jnp.asarray(data.y, dtype=theta.dtype)), dtype=theta.dtype)
    return NCF(X, ytilde, unflatten, model.degree), theta


def _unit(theta, name="model"):
    nrm = float(safe_norm(theta))
    if not nrm > 0:
        raise ValueError(f"`{name}` has all parameters zero; the NCF direction u = theta/||theta|| is undefined.")
    return theta / nrm


def ncf(model: AbstractHomogeneousModel, data, *, loss, normalize: bool = False) -> Float[Array, ""]:
    """The NCF value ``N(theta) = sum_i ytilde_i Phi(theta; x_i)`` (MATH.md section 3, arXiv 2403.08121 eq. (5)).

    Arguments:
        model: the network (its parameters are ``theta``); data: a ``Dataset``; loss: gives ``ytilde`` (square and
            exponential: ``y``; logistic: ``y / 2``).
        normalize: evaluate at ``u = theta / ||theta||`` instead of ``theta`` (``N(u) = N(theta) / ||theta||^L``).

    Returns:
        The scalar ``N``.

    >>> import jax.numpy as jnp
    >>> from homflow.models import MLP
    >>> from homflow.data import Dataset
    >>> m = MLP.from_weights((jnp.array([[3.0, 4.0]]),), None)
    >>> round(float(ncf(m, Dataset(jnp.eye(2), jnp.array([1.0, 1.0])), loss="square", normalize=True)), 6)
    1.4
    """
    obj, theta = make_ncf(model, data, loss)
    if normalize:
        theta = _unit(theta)
    return obj.value(theta)


def ncf_grad(model: AbstractHomogeneousModel, data, *, loss, normalize: bool = False) -> Float[Array, " P"]:
    """The flat gradient ``grad N(theta)`` (parameter order of :func:`homflow.models.flatten`), or at ``u`` if
    ``normalize``. Use ``unflatten_like(model, g)`` for the pytree form."""
    obj, theta = make_ncf(model, data, loss)
    if normalize:
        theta = _unit(theta)
    return obj.grad(theta)


def ncf_kkt_residual(model: AbstractHomogeneousModel, data, *, loss) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """KKT residual of the constrained NCF at the normalised point ``u = theta / ||theta||``.

    Returns ``(residual, lam)``: ``residual = ||grad N(u) - <u, grad N(u)> u||`` (0 exactly at a KKT point of
    ``max N(u)`` s.t. ``||u|| = 1``) and ``lam = <u, grad N(u)> = L N(u)``. MATH.md section 3, arXiv 2403.08121.

    Raises:
        ValueError: if every parameter is zero (no direction), or the data do not fit the model / loss.
    """
    obj, theta = make_ncf(model, data, loss)
    res, lam, _ = obj.residual(_unit(theta))
    return res, lam
