"""Losses (sums over samples), evaluated in log space, and margins (docs/math.md section 2).

Every loss is a sum over the ``n`` samples (not a mean: a mean only rescales time by ``n``). Logistic and exponential
losses are evaluated as ``log L`` with ``logsumexp``, so ``log_loss`` stays finite where ``L`` underflows (margins of
1e4 give ``log L ~ -1e4``), and ``grad log L`` gives the gradient direction there.
"""

from __future__ import annotations

import difflib

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jaxtyping import Array, Float

from .models import AbstractHomogeneousModel, param_norm, predict

__all__ = [
    "Loss",
    "Square",
    "Logistic",
    "Exponential",
    "square",
    "logistic",
    "exponential",
    "get_loss",
    "LOSS_NAMES",
    "loss_value",
    "log_loss",
    "margins",
    "min_margin",
    "normalized_margin",
    "smoothed_margin",
]


class Loss(eqx.Module):
    """A per-sample loss ``l(Phi, y)`` summed over samples, with ``log_value`` computed in log space.

    Subclasses define ``log_value(out, y)`` (the logarithm of the summed loss), ``name``, ``classification`` (labels must
    be +-1) and ``ncf_scale`` (``ytilde = -dl/dPhi`` at ``Phi = 0`` equals ``ncf_scale * y``, docs/math.md section 3).
    """

    name: str = eqx.field(static=True)
    classification: bool = eqx.field(static=True)
    ncf_scale: float = eqx.field(static=True)

    def log_value(self, out: Float[Array, " n"], y: Float[Array, " n"]) -> Float[Array, ""]:
        raise NotImplementedError

    def value(self, out, y):
        """The summed loss ``sum_i l(out_i, y_i)`` (may underflow to 0; use ``log_value`` then)."""
        return jnp.exp(self.log_value(out, y))

    def ncf_labels(self, y):
        """Effective labels ``ytilde_i = -dl/dPhi(0, y_i)`` of the NCF."""
        return self.ncf_scale * y


class Square(Loss):
    """``1/2 sum (Phi - y)^2``; ``ytilde = y``."""

    def __init__(self):
        self.name, self.classification, self.ncf_scale = "square", False, 1.0

    def value(self, out, y):
        return 0.5 * jnp.sum((out - y) ** 2)

    def log_value(self, out, y):
        return jnp.log(self.value(out, y))


class Logistic(Loss):
    """``sum log(1 + exp(-y Phi))`` evaluated as ``log L = logsumexp(log softplus(-q))``; ``ytilde = y / 2``."""

    def __init__(self):
        self.name, self.classification, self.ncf_scale = "logistic", True, 0.5

    def log_value(self, out, y):
        z = -y * out
        # log(softplus(z)): for z << 0, softplus(z) = e^z (1 - e^z/2 + ...), so log = z + log1p(-e^z/2 + ...).
        small = z < -20.0
        zs = jnp.where(small, z, 0.0)
        zl = jnp.where(small, 0.0, z)
        log_sp = jnp.where(small, zs + jnp.log1p(-0.5 * jnp.exp(zs)), jnp.log(jax.nn.softplus(zl)))
        return logsumexp(log_sp)

    def value(self, out, y):
        return jnp.sum(jax.nn.softplus(-y * out))


class Exponential(Loss):
    """``sum exp(-y Phi)`` evaluated as ``log L = logsumexp(-y Phi)``; ``ytilde = y``."""

    def __init__(self):
        self.name, self.classification, self.ncf_scale = "exponential", True, 1.0

    def log_value(self, out, y):
        return logsumexp(-y * out)


square = Square()
logistic = Logistic()
exponential = Exponential()
LOSS_NAMES = ("square", "logistic", "exponential")
_LOSSES = {"square": square, "logistic": logistic, "exponential": exponential, "exp": exponential, "mse": square}


def get_loss(spec: "Loss | str") -> Loss:
    """A :class:`Loss` from an instance or one of the names ``square``, ``logistic``, ``exponential``."""
    if isinstance(spec, Loss):
        return spec
    if isinstance(spec, str) and spec.lower() in _LOSSES:
        return _LOSSES[spec.lower()]
    close = difflib.get_close_matches(str(spec), LOSS_NAMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"`loss` must be one of {LOSS_NAMES}; got {spec!r}.{hint}")


def _xy(data):
    return data.X, data.y


def loss_value(model: AbstractHomogeneousModel, data, loss="exponential"):
    """The summed loss of ``model`` on ``data`` (underflows to 0 at large margins: see :func:`log_loss`)."""
    X, y = _xy(data)
    return get_loss(loss).value(predict(model, X), y)


def log_loss(model: AbstractHomogeneousModel, data, loss="exponential"):
    """``log`` of the summed loss, finite where the loss itself underflows.

    >>> import jax, jax.numpy as jnp
    >>> from homflow.models import MLP
    >>> from homflow.data import Dataset
    >>> m = MLP.from_weights((jnp.array([[1e4]]),), None)
    >>> float(log_loss(m, Dataset(jnp.array([[1.0]]), jnp.array([1.0]))))
    -10000.0
    """
    X, y = _xy(data)
    return get_loss(loss).log_value(predict(model, X), y)


def margins(model: AbstractHomogeneousModel, data) -> Float[Array, " n"]:
    """Sample margins ``q_i = y_i Phi(theta; x_i)``."""
    X, y = _xy(data)
    return y * predict(model, X)


def min_margin(model, data):
    """``q_min = min_i y_i Phi(theta; x_i)``."""
    return jnp.min(margins(model, data))


def normalized_margin(model, data):
    """``q_min / ||theta||^L`` (scale invariant)."""
    return min_margin(model, data) / param_norm(model) ** model.degree


def smoothed_margin(model, data, loss="exponential"):
    """Smoothed margin of Lyu & Li (arXiv 1906.05890, eq. (4)): ``log(1/L) / ||theta||^L`` for the exponential loss,
    ``-log(exp(L) - 1) / ||theta||^L`` for the logistic loss; a lower bound on the normalized margin, non-decreasing
    along gradient flow once ``L < 1``."""
    loss = get_loss(loss)
    lv = log_loss(model, data, loss)
    rho_L = param_norm(model) ** model.degree
    if loss.name == "exponential":
        return -lv / rho_L
    if loss.name == "logistic":
        Lv = jnp.exp(lv)
        ratio = jnp.where(Lv < 1e-8, 1.0 + 0.5 * Lv, jnp.expm1(Lv) / jnp.where(Lv < 1e-8, 1.0, Lv))
        return -(lv + jnp.log(ratio)) / rho_L
    raise ValueError(f"`loss` for a smoothed margin must be 'exponential' or 'logistic'; got {loss.name!r}.")
