"""One problem object: a network architecture, a data set and a loss, as functions of the flat parameter vector.

Every computation on ``(architecture, data, loss)`` in homflow goes through :class:`Problem`: the loss and its
gradient (in log space where it matters), the gradient-flow velocity (also in log time), the network outputs and
margins with their Jacobian, Hessian-vector products, and the neural correlation function (NCF) with its gradient,
Hessian and constrained-KKT residual (docs/math.md sections 2, 3 and 5; arXiv 2402.09226, 2403.08121, 1906.05890).

Its static parts are the architecture (a hashable ``theta -> model`` map, equal for equal architectures) and the loss:
a jitted function that takes a :class:`Problem` compiles once per architecture, loss and data shape, not once per call.
"""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..losses import Loss, get_loss
from ..models import AbstractHomogeneousModel, flatten, safe_norm

__all__ = ["Problem", "make_problem", "tangent_gradient"]


def tangent_gradient(u: Float[Array, " P"], g: Float[Array, " P"]) -> Float[Array, " P"]:
    """Projection ``g - <u, g> u`` of ``g`` onto the tangent space of the unit sphere at the unit vector ``u``."""
    return g - jnp.dot(u, g) * u


class Problem(eqx.Module):
    """``(architecture, data, loss)`` on flat parameter vectors ``theta``; every method is pure and jit/vmap friendly.

    Build one with :func:`make_problem`. Attributes: ``X`` (n, d) inputs, ``y`` (n,) labels, ``loss`` (static),
    ``unflatten`` (static ``theta -> model``, hashed by architecture), ``degree`` (static homogeneity order ``L``).

    The loss is summed over samples: ``L(theta) = sum_i l(Phi(theta; x_i), y_i)``. The NCF is
    ``N(u) = sum_i ytilde_i Phi(u; x_i)`` with ``ytilde_i = -dl/dPhi(0, y_i)`` (``loss.ncf_labels``: ``y`` for the
    square and exponential losses, ``y / 2`` for the logistic loss; docs/math.md section 3, arXiv 2403.08121 eq. (5)).
    """

    X: Float[Array, "n d"]
    y: Float[Array, " n"]
    loss: Loss = eqx.field(static=True)
    unflatten: Callable = eqx.field(static=True)
    degree: int = eqx.field(static=True)

    def __check_init__(self):
        if self.X.ndim != 2 or self.y.ndim != 1 or self.X.shape[0] != self.y.shape[0]:
            raise ValueError(f"`X` must be (n, d) and `y` (n,); got {self.X.shape} and {self.y.shape}.")

    # -- the network -------------------------------------------------------------------------------------------------
    def model(self, theta) -> AbstractHomogeneousModel:
        """The network with parameter vector ``theta``."""
        return self.unflatten(theta)

    def outputs(self, theta, X=None) -> Float[Array, " n"]:
        """Network outputs ``Phi(theta; x_i)`` on the data (or on the rows of ``X``)."""
        return jax.vmap(self.unflatten(theta))(self.X if X is None else X)

    def margins(self, theta) -> Float[Array, " n"]:
        """Margins ``q_i(theta) = y_i Phi(theta; x_i)`` (docs/math.md section 5)."""
        return self.y * self.outputs(theta)

    def margin_jacobian(self, theta) -> Float[Array, "n P"]:
        """``G`` (n, P) with rows ``grad q_i(theta)``."""
        return jax.jacrev(self.margins)(theta)

    def weighted_margin_hessian(self, theta, lam) -> Float[Array, "P P"]:
        """``sum_i lam_i Hess q_i(theta)`` (P x P, dense)."""
        return jax.hessian(lambda t: jnp.dot(lam, self.margins(t)))(theta)

    # -- the loss ----------------------------------------------------------------------------------------------------
    def log_loss(self, theta, X=None, y=None) -> Float[Array, ""]:
        """``log L(theta)`` (finite where ``L`` underflows); ``X``, ``y`` replace the data (e.g. a mini-batch)."""
        return self.loss.log_value(self.outputs(theta, X), self.y if y is None else y)

    def value(self, theta, X=None, y=None) -> Float[Array, ""]:
        """``L(theta)``."""
        return self.loss.value(self.outputs(theta, X), self.y if y is None else y)

    def grad(self, theta, X=None, y=None) -> Float[Array, " P"]:
        """``grad L(theta)``."""
        return -self.velocity(theta, X=X, y=y)

    def log_grad(self, theta, X=None, y=None):
        """``(log L, grad log L)``: the gradient direction survives where ``L`` underflows."""
        return jax.value_and_grad(self.log_loss)(theta, X, y)

    def velocity(self, theta, log_scale=0.0, X=None, y=None) -> Float[Array, " P"]:
        """The gradient-flow velocity ``-exp(log_scale) grad L(theta)``.

        For classification losses it is computed as ``-exp(log_scale + log L) grad log L``, so the product stays finite
        when ``L`` underflows and ``exp(log_scale)`` overflows (the late phase in log time ``u = log(1 + t)``, where
        ``d theta/du = -(1 + t) grad L``).
        """
        if self.loss.classification:
            lv, g = jax.value_and_grad(self.log_loss)(theta, X, y)
            return -jnp.exp(log_scale + lv) * g
        g = jax.grad(self.value)(theta, X, y)
        return -jnp.exp(log_scale) * g

    def hvp(self, theta, v) -> Float[Array, " P"]:
        """Hessian-vector product ``Hess L(theta) v`` (forward over reverse)."""
        return jax.jvp(self.grad, (theta,), (v,))[1]

    # -- the neural correlation function -----------------------------------------------------------------------------
    @property
    def ytilde(self) -> Float[Array, " n"]:
        """Effective NCF labels ``ytilde_i = -dl/dPhi(0, y_i)``."""
        return self.loss.ncf_labels(self.y)

    def ncf(self, u) -> Float[Array, ""]:
        """``N(u) = sum_i ytilde_i Phi(u; x_i)`` (homogeneous of order ``degree`` in ``u``)."""
        return jnp.dot(self.ytilde, self.outputs(u))

    def ncf_grad(self, u) -> Float[Array, " P"]:
        """``grad N(u)``: the NCF flow's velocity ``du/ds``."""
        return jax.grad(self.ncf)(u)

    def ncf_value_and_grad(self, u):
        """``(N(u), grad N(u))``."""
        return jax.value_and_grad(self.ncf)(u)

    def ncf_hessian(self, u) -> Float[Array, "P P"]:
        """Dense ``Hess N(u)`` (P x P; forward over reverse). For ReLU-type activations (``p = 1``) it is the Hessian of
        the polynomial piece selected by the current activation pattern."""
        return jax.jacfwd(self.ncf_grad)(u)

    def ncf_hvp(self, u, v) -> Float[Array, " P"]:
        """``Hess N(u) v``."""
        return jax.jvp(self.ncf_grad, (u,), (v,))[1]

    def ncf_residual(self, theta):
        """``(residual, lam, value)`` at ``u = theta / ||theta||``: the tangential gradient norm
        ``||grad N(u) - <u, grad N(u)> u||`` (0 exactly at a KKT point of ``max N(u)`` s.t. ``||u|| = 1``),
        ``lam = <u, grad N(u)>`` (which equals ``L N(u)`` by Euler's identity) and ``N(u)``."""
        u = theta / safe_norm(theta)
        val, g = self.ncf_value_and_grad(u)
        return safe_norm(tangent_gradient(u, g)), jnp.dot(u, g), val


def make_problem(model: AbstractHomogeneousModel, data, loss="square") -> tuple[Problem, Float[Array, " P"]]:
    """The :class:`Problem` of ``model``'s architecture on ``data`` under ``loss``, and ``model``'s parameter vector.

    Arguments:
        model: a homogeneous network (its architecture; its parameters are returned as ``theta``).
        data: a :class:`homflow.data.Dataset`.
        loss: ``'square'``, ``'logistic'``, ``'exponential'`` or a :class:`homflow.losses.Loss`.

    Returns:
        ``(problem, theta)``; ``X`` and ``y`` are cast to ``theta``'s dtype.

    Raises:
        ValueError: if the data's dimension does not match the model, or a classification loss meets labels not +-1.

    >>> import jax.numpy as jnp
    >>> from homflow.models import MLP
    >>> from homflow.data import Dataset
    >>> m = MLP.from_weights((jnp.array([[3.0, 4.0]]),), None)
    >>> problem, theta = make_problem(m, Dataset(jnp.eye(2), jnp.array([1.0, 1.0])), "square")
    >>> round(float(problem.ncf(theta / jnp.linalg.norm(theta))), 6)
    1.4
    """
    loss = get_loss(loss)
    data.check_model(model)
    data.check_for(loss)
    theta, unflatten = flatten(model)
    X = jnp.asarray(data.X, dtype=theta.dtype)
    y = jnp.asarray(data.y, dtype=theta.dtype)
    return Problem(X, y, loss, unflatten, model.degree), theta
