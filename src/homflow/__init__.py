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


# Submodules and the run helpers are imported on first use (``homflow.flow``, ``homflow.load_run``), so that
# ``import homflow`` and ``homflow --help`` do not start JAX.
_SUBMODULES = ("activations", "data", "flow", "losses", "models")
_RUN_HELPERS = ("load_run", "runs")


def __getattr__(name: str):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _RUN_HELPERS:
        return getattr(importlib.import_module("._runs", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_RUN_HELPERS))


__all__ = ["activations", "data", "flow", "losses", "models", "load_run", "runs", "enable_x64", "float64_enabled",
           "__version__"]
