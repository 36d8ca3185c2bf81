"""Bias-free convolutional network (1-D or 2-D) and the diagonal linear network."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..activations import Activation, get_activation
from ._base import AbstractHomogeneousModel, _check_dim, _init_scale
from ._twolayer import mlp_degree

__all__ = ["CNN", "DiagonalLinear"]


def _avg_pool(h, window: int):
    """Non-overlapping average pooling over every spatial axis of ``h`` (channels first); linear, so degree 1."""
    spatial = h.shape[1:]
    trimmed = tuple((s // window) * window for s in spatial)
    h = h[(slice(None), *(slice(0, t) for t in trimmed))]
    shape = [h.shape[0]]
    for t in trimmed:
        shape += [t // window, window]
    h = h.reshape(shape)
    return h.mean(axis=tuple(range(2, 2 + 2 * len(trimmed), 2)))


def _features(kernels, activation, pool, h):
    """Convolutions (stride 1, 'SAME'), activation and optional pooling, channels first, one input."""
    nd = h.ndim - 1
    dn = ("NCH", "OIH", "NCH") if nd == 1 else ("NCHW", "OIHW", "NCHW")
    for K in kernels:
        h = jax.lax.conv_general_dilated(h[None], K, (1,) * nd, "SAME", dimension_numbers=dn)[0]
        h = activation(h)
        if pool is not None and pool > 1:
            h = _avg_pool(h, pool)
    return h


class CNN(AbstractHomogeneousModel):
    """Bias-free CNN: ``K-1`` convolutions (``'SAME'`` padding, stride 1), each followed by the activation and an
    optional average pooling, then a linear read-out to a scalar. Order ``L = sum_{k<K} p^k`` like an MLP with ``K``
    layers (pooling is linear).

    Inputs are flat vectors of length ``prod(input_shape)``, reshaped to ``input_shape = (C, L)`` (1-D) or
    ``(C, H, W)`` (2-D).

    Fields: ``kernels`` (tuple of arrays (out, in, k) or (out, in, k, k)) and ``readout`` (C_last, *spatial).
    """

    kernels: tuple[Array, ...]
    readout: Array
    activation: Activation = eqx.field(static=True)
    input_shape: tuple[int, ...] = eqx.field(static=True)
    pool: int | None = eqx.field(static=True)

    def __init__(
        self,
        input_shape,
        channels,
        activation,
        *,
        kernel_size: int = 3,
        pool: int | None = None,
        key: PRNGKeyArray,
        scale=None,
        dtype=None,
    ):
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) not in (2, 3) or min(input_shape) < 1:
            raise ValueError(f"`input_shape` must be (C, L) or (C, H, W) with positive sizes; got {input_shape!r}.")
        channels = tuple(_check_dim("channels[i]", c) for c in channels)
        if not channels:
            raise ValueError("`channels` must name at least one convolution layer; got ().")
        kernel_size = _check_dim("kernel_size", kernel_size)
        if pool is not None:
            pool = _check_dim("pool", pool, 1)
        self.activation = get_activation(activation)
        self.input_shape = input_shape
        self.pool = pool
        nd = len(input_shape) - 1
        dtype = dtype or jnp.result_type(float)
        keys = jax.random.split(key, len(channels) + 1)
        ins = (input_shape[0], *channels[:-1])
        self.kernels = tuple(
            jax.random.normal(k, (c_out, c_in) + (kernel_size,) * nd, dtype) / math.sqrt(c_in * kernel_size**nd)
            for k, c_in, c_out in zip(keys[:-1], ins, channels)
        )
        feat = jax.eval_shape(
            lambda h: _features(self.kernels, self.activation, self.pool, h), jnp.zeros(input_shape, dtype)
        )
        self.readout = jax.random.normal(keys[-1], feat.shape, dtype) / math.sqrt(math.prod(feat.shape))
        if scale is not None:
            s = _init_scale(self, scale)
            self.kernels, self.readout = s.kernels, s.readout

    @property
    def degree(self) -> int:
        return mlp_degree(self.activation.degree, len(self.kernels) + 1)

    @property
    def d_in(self) -> int:
        return math.prod(self.input_shape)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(K.shape[0] for K in self.kernels)

    def __call__(self, x):
        h = _features(self.kernels, self.activation, self.pool, jnp.reshape(x, self.input_shape))
        return jnp.sum(self.readout * h)


class DiagonalLinear(AbstractHomogeneousModel):
    """Diagonal linear network ``f(x) = sum_i (u_i^D - v_i^D) x_i`` of order ``D = depth`` (docs/math.md section 1).

    The effective linear predictor is ``beta = u^D - v^D``; with ``depth = 2`` its max-margin KKT direction at the
    global optimum is the minimum-l1-norm margin predictor.
    """

    u: Float[Array, " d"]
    v: Float[Array, " d"]
    depth: int = eqx.field(static=True)

    def __init__(self, d: int, depth: int = 2, *, key: PRNGKeyArray, scale=None, dtype=None):
        d = _check_dim("d", d)
        self.depth = _check_dim("depth", depth, 1)
        dtype = dtype or jnp.result_type(float)
        ku, kv = jax.random.split(key)
        self.u = jax.random.normal(ku, (d,), dtype) / math.sqrt(d)
        self.v = jax.random.normal(kv, (d,), dtype) / math.sqrt(d)
        if scale is not None:
            s = _init_scale(self, scale)
            self.u, self.v = s.u, s.v

    @property
    def degree(self) -> int:
        return self.depth

    @property
    def d_in(self) -> int:
        return self.u.shape[-1]

    def beta(self):
        """The effective linear predictor ``u^D - v^D``."""
        return self.u**self.depth - self.v**self.depth

    def __call__(self, x):
        return jnp.dot(self.beta(), x)
