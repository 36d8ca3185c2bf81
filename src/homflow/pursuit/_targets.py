"""Targets of the neuron-pursuit experiments: the hypercube, the worked example of arXiv 2509.12154, a ReLU teacher.

The worked example (arXiv 2509.12154, as quoted in homflow issue 15) is, with ``s = ReLU``,

    ``f(x) = 2 s(s(2 x_1 + x_3) - s(x_3 - x_2)) - s(s(2 x_2 + x_4) + s(x_4 + x_3))``   on ``{-1, +1}^20``,

which is exactly a bias-free three-layer ReLU MLP of widths (4, 2) (:func:`paper_target`): ``W_1`` has the rows
``2e_1 + e_3``, ``e_3 - e_2``, ``2e_2 + e_4``, ``e_4 + e_3``; ``W_2 = [[1, -1, 0, 0], [0, 0, 1, 1]]``;
``W_3 = [2, -1]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..activations import relu
from ..data import Dataset
from ..models import MLP, predict

__all__ = ["hypercube", "paper_target", "relu_teacher", "labelled"]


def hypercube(n: int, d: int, *, seed=0, dtype=None) -> np.ndarray:
    """``n`` points drawn uniformly (with replacement) from ``{-1, +1}^d``.

    >>> hypercube(3, 4, seed=0).shape
    (3, 4)
    """
    for name, v in (("n", n), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; got {v!r}.")
    rng = np.random.default_rng(seed)
    return (2.0 * rng.integers(0, 2, size=(int(n), int(d))) - 1.0).astype(dtype or np.float64)


def paper_target(d: int = 20, dtype=None) -> MLP:
    """The worked example of arXiv 2509.12154 as an MLP of widths (4, 2) on ``R^d`` (``d >= 4``; only ``x_1..x_4``
    are used)."""
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 4:
        raise ValueError(f"`d` must be an integer >= 4 (the target reads x_1 .. x_4); got {d!r}.")
    dt = dtype or jnp.result_type(float)
    W1 = np.zeros((4, int(d)))
    W1[0, [0, 2]] = (2.0, 1.0)  # 2 x1 + x3
    W1[1, [1, 2]] = (-1.0, 1.0)  # x3 - x2
    W1[2, [1, 3]] = (2.0, 1.0)  # 2 x2 + x4
    W1[3, [2, 3]] = (1.0, 1.0)  # x4 + x3
    W2 = np.array([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    W3 = np.array([[2.0, -1.0]])
    return MLP.from_weights(tuple(jnp.asarray(w, dtype=dt) for w in (W1, W2, W3)), relu)


def relu_teacher(d: int, width: int, *, seed=0, dtype=None) -> MLP:
    """A two-layer ReLU teacher ``sum_j a_j relu(w_j . x)`` with ``width`` neurons: unit ``w_j`` (Gaussian, normalised)
    and ``|a_j|`` in [1, 2] with alternating signs, so no neuron is negligible and both signs occur."""
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise ValueError(f"`width` must be an integer >= 1; got {width!r}.")
    dt = dtype or jnp.result_type(float)
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((int(width), int(d)))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    a = (1.0 + rng.random(int(width))) * np.where(np.arange(int(width)) % 2 == 0, 1.0, -1.0)
    return MLP.from_weights((jnp.asarray(W, dt), jnp.asarray(a[None, :], dt)), relu)


def labelled(target: MLP, X) -> Dataset:
    """The data set ``(X, target(X))``."""
    X = jnp.asarray(X, dtype=target.weights[0].dtype)
    return Dataset(X, np.asarray(jax.device_get(predict(target, X))), dtype=X.dtype)
