"""Base class and parameter-vector utilities shared by every homogeneous network."""

from __future__ import annotations

import abc
from typing import Callable, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

__all__ = [
    "AbstractHomogeneousModel",
    "predict",
    "flatten",
    "unflatten_like",
    "param_norm",
    "rescale",
    "with_norm",
    "num_params",
    "safe_norm",
]

M = TypeVar("M", bound="AbstractHomogeneousModel")


class AbstractHomogeneousModel(eqx.Module):
    """A bias-free network ``Phi(theta; x)``, positively homogeneous of exact integer order ``degree`` in its weights.

    Subclasses implement ``__call__(x) -> scalar`` for one input (a flat vector of length ``d_in``) and ``degree``.
    The parameters are the inexact-array leaves, in field order; :func:`flatten` turns them into one vector.
    """

    @property
    @abc.abstractmethod
    def degree(self) -> int:
        """The order ``L`` with ``Phi(c theta) = c^L Phi(theta)`` for ``c > 0`` (docs/math.md section 1)."""

    @property
    @abc.abstractmethod
    def d_in(self) -> int:
        """Input dimension (inputs are flat vectors)."""

    @abc.abstractmethod
    def __call__(self, x: Float[Array, " d"]) -> Float[Array, ""]:
        ...


def predict(model: AbstractHomogeneousModel, X: Float[Array, "n d"]) -> Float[Array, " n"]:
    """Evaluate ``model`` on a batch of inputs ``X`` (one row per sample).

    >>> import jax, jax.numpy as jnp
    >>> from homflow.models import TwoLayer
    >>> from homflow.activations import relu
    >>> m = TwoLayer(3, 4, relu, key=jax.random.PRNGKey(0))
    >>> predict(m, jnp.ones((5, 3))).shape
    (5,)
    """
    X = jnp.asarray(X)
    if X.ndim != 2 or X.shape[1] != model.d_in:
        raise ValueError(f"`X` must have shape (n, {model.d_in}); got {X.shape}.")
    return jax.vmap(model)(X)


def flatten(model: M) -> tuple[Float[Array, " P"], Callable[[Float[Array, " P"]], M]]:
    """Return the parameter vector ``theta`` of ``model`` and the inverse map ``theta -> model``.

    The order is the field order of the model's array leaves (``TwoLayer``: ``a`` then ``W.ravel()``).
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)
    theta, unravel = ravel_pytree(params)
    return theta, _Unflatten(unravel, params, static)


class _Unflatten:
    """``theta -> model`` for one architecture; equal (and equally hashed) for equal architectures, so that compiled
    functions taking it as a static argument (the flow's objective) are reused across calls instead of recompiled."""

    __slots__ = ("_unravel", "_static", "_key")

    def __init__(self, unravel, params, static):
        self._unravel = unravel
        self._static = static
        p_leaves, p_def = jax.tree_util.tree_flatten(params)
        s_leaves, s_def = jax.tree_util.tree_flatten(static)
        try:
            hash(tuple(s_leaves))
            s_key = tuple(s_leaves)
        except TypeError:  # an unhashable static leaf: fall back to identity
            s_key = (id(static),)
        self._key = (p_def, tuple((tuple(x.shape), str(x.dtype)) for x in p_leaves), s_def, s_key)

    def __call__(self, vec):
        return eqx.combine(self._unravel(vec), self._static)

    def __eq__(self, other):
        return isinstance(other, _Unflatten) and self._key == other._key

    def __hash__(self):
        return hash(self._key)


def unflatten_like(model: M, theta: Float[Array, " P"]) -> M:
    """The model of the same architecture as ``model`` with parameter vector ``theta``."""
    return flatten(model)[1](theta)


def num_params(model: AbstractHomogeneousModel) -> int:
    """Number of scalar parameters."""
    return int(flatten(model)[0].size)


def safe_norm(v, axis=None, keepdims=False):
    """Euclidean norm with a finite (zero) gradient at ``v = 0``."""
    sq = jnp.sum(v * v, axis=axis, keepdims=keepdims)
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def param_norm(model: AbstractHomogeneousModel) -> Float[Array, ""]:
    """Euclidean norm ``||theta||`` of all parameters."""
    return safe_norm(flatten(model)[0])


def rescale(model: M, c) -> M:
    """Multiply every parameter by ``c`` (so ``Phi`` is multiplied by ``c^L`` for ``c > 0``)."""
    return jax.tree_util.tree_map(lambda w: c * w, model)


def with_norm(model: M, scale) -> M:
    """The model with the same direction and ``||theta|| = scale``: ``theta = scale * theta_hat``, ``||theta_hat|| = 1``.

    Raises:
        ValueError: if ``scale`` is not a finite positive number, or the model has zero parameters.
    """
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"`scale` must be a finite number > 0; got {scale!r}.") from None
    if not (s > 0 and jnp.isfinite(s)):
        raise ValueError(f"`scale` (the initial norm delta) must be a finite number > 0; got {scale!r}.")
    nrm = float(param_norm(model))
    if nrm == 0.0:
        raise ValueError("cannot rescale a model whose parameters are all zero to a given norm.")
    return rescale(model, s / nrm)


def _check_dim(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def _init_scale(model, scale):
    return model if scale is None else with_norm(model, scale)
