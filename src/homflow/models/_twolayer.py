"""Two-layer network ``f(x) = a . sigma(W x)`` and the multi-layer perceptron ``W_K sigma(... sigma(W_1 x))``."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..activations import Activation, get_activation
from ._base import AbstractHomogeneousModel, _check_dim, _init_scale

__all__ = ["TwoLayer", "MLP", "mlp_degree"]


def mlp_degree(p: int, n_layers: int) -> int:
    """Order ``L = 1 + p + ... + p^(K-1)`` of a bias-free net with ``K`` weight layers (docs/math.md section 1)."""
    return sum(p**k for k in range(n_layers))


class TwoLayer(AbstractHomogeneousModel):
    """Bias-free two-layer network ``f(x) = sum_j a_j sigma(w_j . x)`` of order ``L = 1 + p``.

    Fields: ``a`` (width,), ``W`` (width, d_in); the parameter vector is ``(a, W.ravel())``.

    Arguments:
        d_in: input dimension; width: number of hidden neurons; activation: a homogeneous activation.
        key: PRNG key (entries i.i.d. standard normal, ``W / sqrt(d_in)``, ``a / sqrt(width)``).
        scale: if given, rescale so that ``||theta|| = scale`` (``theta(0) = delta * theta_hat`` in one call).
    """

    a: Float[Array, " width"]
    W: Float[Array, "width d_in"]
    activation: Activation = eqx.field(static=True)

    def __init__(self, d_in: int, width: int, activation, *, key: PRNGKeyArray, scale=None, dtype=None):
        d_in = _check_dim("d_in", d_in)
        width = _check_dim("width", width)
        self.activation = get_activation(activation)
        ka, kw = jax.random.split(key)
        dtype = dtype or jnp.result_type(float)
        self.a = jax.random.normal(ka, (width,), dtype) / jnp.sqrt(width)
        self.W = jax.random.normal(kw, (width, d_in), dtype) / jnp.sqrt(d_in)
        if scale is not None:
            s = _init_scale(self, scale)
            self.a, self.W = s.a, s.W

    @classmethod
    def from_weights(cls, a, W, activation) -> "TwoLayer":
        """Build from explicit weights ``a`` (width,) and ``W`` (width, d_in)."""
        a, W = jnp.asarray(a), jnp.asarray(W)
        if W.ndim != 2 or a.shape != (W.shape[0],):
            raise ValueError(f"`a` must have shape (width,) and `W` (width, d_in); got {a.shape} and {W.shape}.")
        obj = cls(W.shape[1], W.shape[0], activation, key=jax.random.PRNGKey(0), dtype=W.dtype)
        return eqx.tree_at(lambda m: (m.a, m.W), obj, (a, W))

    @property
    def degree(self) -> int:
        return 1 + self.activation.degree

    @property
    def d_in(self) -> int:
        return self.W.shape[-1]

    @property
    def width(self) -> int:
        return self.W.shape[-2]

    def __call__(self, x):
        return jnp.dot(self.a, self.activation(self.W @ x))


class MLP(AbstractHomogeneousModel):
    """Bias-free MLP ``f(x) = W_K sigma(... sigma(W_1 x))`` of order ``L = sum_{k<K} p^k``.

    Fields: ``weights = (W_1, ..., W_K)``, ``W_k`` of shape (h_k, h_{k-1}), the last one (1, h_{K-1}).
    ``widths=()`` gives the linear model ``f(x) = W_1 x`` (order 1).

    Arguments:
        d_in: input dimension; widths: hidden widths; activation: a homogeneous activation (ignored if no hidden layer).
        key: PRNG key (``W_k`` i.i.d. normal / sqrt(fan_in)); scale: if given, ``||theta|| = scale``.
    """

    weights: tuple[Float[Array, "out inp"], ...]
    activation: Activation = eqx.field(static=True)

    def __init__(self, d_in: int, widths, activation, *, key: PRNGKeyArray, scale=None, dtype=None):
        d_in = _check_dim("d_in", d_in)
        try:
            widths = tuple(_check_dim("widths[i]", w) for w in widths)
        except TypeError:
            raise ValueError(f"`widths` must be a sequence of positive integers; got {widths!r}.") from None
        self.activation = get_activation("linear" if activation is None else activation)
        dims = (d_in, *widths, 1)
        keys = jax.random.split(key, len(dims) - 1)
        dtype = dtype or jnp.result_type(float)
        self.weights = tuple(
            jax.random.normal(k, (dims[i + 1], dims[i]), dtype) / jnp.sqrt(dims[i]) for i, k in enumerate(keys)
        )
        if scale is not None:
            self.weights = _init_scale(self, scale).weights

    @classmethod
    def from_weights(cls, weights, activation) -> "MLP":
        """Build from explicit matrices ``(W_1, ..., W_K)``; shapes must chain and the last must have one row."""
        weights = tuple(jnp.asarray(w) for w in weights)
        if not weights or any(w.ndim != 2 for w in weights) or weights[-1].shape[0] != 1:
            raise ValueError("`weights` must be a non-empty tuple of matrices, the last with one row (1, h).")
        for k in range(1, len(weights)):
            if weights[k].shape[1] != weights[k - 1].shape[0]:
                raise ValueError(
                    f"`weights[{k}]` has {weights[k].shape[1]} columns but `weights[{k-1}]` has "
                    f"{weights[k - 1].shape[0]} rows; consecutive shapes must chain."
                )
        widths = tuple(w.shape[0] for w in weights[:-1])
        obj = cls(weights[0].shape[1], widths, activation, key=jax.random.PRNGKey(0), dtype=weights[0].dtype)
        return eqx.tree_at(lambda m: m.weights, obj, weights)

    @property
    def degree(self) -> int:
        return mlp_degree(self.activation.degree, len(self.weights))

    @property
    def d_in(self) -> int:
        return self.weights[0].shape[-1]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(w.shape[-2] for w in self.weights[:-1])

    def hidden(self, x):
        """Post-activation vectors of every hidden layer for one input."""
        hs = []
        h = x
        for W in self.weights[:-1]:
            h = self.activation(W @ h)
            hs.append(h)
        return hs

    def __call__(self, x):
        h = x
        for W in self.weights[:-1]:
            h = self.activation(W @ h)
        return (self.weights[-1] @ h)[0]
