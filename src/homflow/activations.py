"""Positively homogeneous activations with an exact degree (docs/math.md section 1).

Every activation here is ``sigma(z) = s(z)^p`` with ``s(z) = z`` for ``z > 0`` and ``s(z) = alpha * z`` otherwise, so
``sigma(c z) = c^p sigma(z)`` for ``c > 0``. For ``z < 0`` and ``alpha != 0``, ``sigma(z) = (alpha z)^p`` whose sign follows
the parity of ``p`` (odd ``p``: negative; even ``p``: positive). This is the convention of docs/math.md, and tested.

Subgradient convention at the kink ``z = 0`` (``p = 1`` only; for ``p >= 2`` the derivative is 0 there): autodiff
returns ``alpha`` (so ``0`` for ReLU), i.e. the left derivative.
"""

from __future__ import annotations

import math
from typing import Callable

import equinox as eqx
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Activation",
    "relu",
    "leaky_relu",
    "relu_power",
    "leaky_relu_power",
    "linear",
    "get_activation",
    "ACTIVATION_NAMES",
]


class Activation(eqx.Module):
    """A positively ``p``-homogeneous activation ``max-like(z, alpha z)^p``.

    Arguments:
        p: integer degree ``>= 1``.
        alpha: slope on the negative side (0 for ReLU; any finite real).

    >>> import jax.numpy as jnp
    >>> float(relu_power(2)(jnp.asarray(3.0)))
    9.0
    """

    p: int = eqx.field(static=True)
    alpha: float = eqx.field(static=True)

    def __check_init__(self):
        if isinstance(self.p, bool) or not isinstance(self.p, (int, np.integer)) or self.p < 1:
            raise ValueError(
                f"`p` (the activation's degree) must be an integer >= 1; got {self.p!r}. "
                "Only integer degrees give an exactly homogeneous network of integer order."
            )
        if not isinstance(self.alpha, (int, float, np.floating)) or not math.isfinite(float(self.alpha)):
            raise ValueError(f"`alpha` (the negative-side slope) must be a finite real number; got {self.alpha!r}.")

    @property
    def degree(self) -> int:
        """The homogeneity degree ``p``."""
        return int(self.p)

    @property
    def name(self) -> str:
        if self.alpha == 0:
            return "relu" if self.p == 1 else f"relu_power({self.p})"
        if self.alpha == 1:
            return "linear" if self.p == 1 else f"power({self.p})"
        return f"leaky_relu({self.alpha})" if self.p == 1 else f"leaky_relu_power({self.p}, {self.alpha})"

    def __call__(self, z):
        s = jnp.where(z > 0, z, self.alpha * z)
        return s if self.p == 1 else s**self.p

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return self.name


relu = Activation(1, 0.0)
linear = Activation(1, 1.0)


def leaky_relu(alpha: float = 0.01) -> Activation:
    """Leaky ReLU with negative slope ``alpha`` (degree 1)."""
    return Activation(1, float(alpha))


def relu_power(p: int) -> Activation:
    """``max(z, 0)^p`` (degree ``p``)."""
    return Activation(p, 0.0)


def leaky_relu_power(p: int, alpha: float = 0.01) -> Activation:
    """``max(z, alpha z)^p`` in the convention of the module docstring (degree ``p``)."""
    return Activation(p, float(alpha))


ACTIVATION_NAMES = ("relu", "leaky_relu", "relu_power", "leaky_relu_power", "linear")


def get_activation(spec: "Activation | str | Callable | None", *, p: int | None = None, alpha: float | None = None) -> Activation:
    """Turn an activation, or its name with ``p``/``alpha``, into an :class:`Activation`; refuse anything else.

    Raises:
        ValueError: for a name that is not one of ``ACTIVATION_NAMES`` or for a callable that is not one of ours
            (``tanh``, ``sigmoid``, ``gelu`` ... are not positively homogeneous).
    """
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        name = spec.strip().lower().replace("-", "_")
        if name == "relu":
            return relu if p in (None, 1) else relu_power(p)
        if name == "linear":
            return linear
        if name == "leaky_relu":
            return leaky_relu(0.01 if alpha is None else alpha) if p in (None, 1) else leaky_relu_power(p, alpha or 0.01)
        if name in ("relu_power", "relu_pow"):
            return relu_power(2 if p is None else p)
        if name == "leaky_relu_power":
            return leaky_relu_power(2 if p is None else p, 0.01 if alpha is None else alpha)
        import difflib

        close = difflib.get_close_matches(name, ACTIVATION_NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"`activation` must be one of {ACTIVATION_NAMES} (positively homogeneous); got {spec!r}.{hint}"
        )
    raise ValueError(
        f"`activation` must be a homflow Activation (relu, leaky_relu(alpha), relu_power(p), leaky_relu_power(p, alpha)) "
        f"or one of the names {ACTIVATION_NAMES}; got {spec!r}, which is not known to be positively homogeneous."
    )
