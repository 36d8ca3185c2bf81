"""homflow: gradient-flow laboratory for homogeneous neural networks.

The library never enables float64 at import; call :func:`enable_x64` (the CLI, tests and benchmarks do) before
checking the papers' claims.
"""

from __future__ import annotations

__version__ = "0.1.0"


def enable_x64(enabled: bool = True) -> None:
    """Switch JAX to float64 (``jax_enable_x64``); call before creating arrays."""
    import jax

    jax.config.update("jax_enable_x64", bool(enabled))


def float64_enabled() -> bool:
    """Whether JAX's default floating dtype is float64."""
    import jax.numpy as jnp

    return jnp.result_type(float) == jnp.float64


from . import activations, data, flow, losses, models  # noqa: E402

__all__ = ["activations", "data", "flow", "losses", "models", "enable_x64", "float64_enabled", "__version__"]
