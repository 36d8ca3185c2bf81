"""The training objective as a function of the flat parameter vector, in log space where it matters."""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..losses import Loss, get_loss
from ..models import AbstractHomogeneousModel, flatten, predict

__all__ = ["Objective", "make_objective"]


class Objective(eqx.Module):
    """``theta -> Loss(theta)`` for one model architecture, data set and loss, on flat parameter vectors.

    Use :func:`make_objective` to build one. All methods are pure and jit/vmap friendly.
    """

    X: Float[Array, "n d"]
    y: Float[Array, " n"]
    loss: Loss = eqx.field(static=True)
    unflatten: Callable = eqx.field(static=True)
    degree: int = eqx.field(static=True)

    def model(self, theta) -> AbstractHomogeneousModel:
        return self.unflatten(theta)

    def outputs(self, theta, X=None):
        return predict(self.unflatten(theta), self.X if X is None else X)

    def log_loss(self, theta, X=None, y=None):
        """``log L(theta)`` (finite where ``L`` underflows)."""
        return self.loss.log_value(self.outputs(theta, X), self.y if y is None else y)

    def value(self, theta, X=None, y=None):
        """``L(theta)``."""
        return self.loss.value(self.outputs(theta, X), self.y if y is None else y)

    def grad(self, theta, X=None, y=None):
        """``grad L(theta)``."""
        return self.velocity(theta, X=X, y=y) * -1.0

    def log_grad(self, theta, X=None, y=None):
        """``(log L, grad log L)``: the gradient direction survives where ``L`` underflows."""
        return jax.value_and_grad(self.log_loss)(theta, X, y)

    def velocity(self, theta, log_scale=0.0, X=None, y=None):
        """``-exp(log_scale) grad L(theta)``, computed as ``-exp(log_scale + log L) grad log L`` for classification losses
        so that the product stays finite when ``L`` underflows and ``exp(log_scale)`` overflows (late-phase log time)."""
        if self.loss.classification:
            lv, g = jax.value_and_grad(self.log_loss)(theta, X, y)
            return -jnp.exp(log_scale + lv) * g
        g = jax.grad(self.value)(theta, X, y)
        return -jnp.exp(log_scale) * g

    def hvp(self, theta, v):
        """Hessian-vector product ``Hess L(theta) v`` (forward over reverse)."""
        return jax.jvp(lambda th: self.grad(th), (theta,), (v,))[1]


def make_objective(model: AbstractHomogeneousModel, data, loss="square") -> tuple[Objective, Float[Array, " P"]]:
    """Return the objective of ``model``'s architecture on ``data`` under ``loss``, and ``model``'s parameter vector.

    Raises:
        ValueError: if the data's dimension does not match the model or a classification loss meets labels not +-1.
    """
    loss = get_loss(loss)
    data.check_model(model)
    data.check_for(loss)
    theta, unflatten = flatten(model)
    X = jnp.asarray(data.X, dtype=theta.dtype)
    y = jnp.asarray(data.y, dtype=theta.dtype)
    return Objective(X, y, loss, unflatten, model.degree), theta
