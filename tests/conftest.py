"""Test entry point: float64 on (the library never flips it at import), tolerances keyed by dtype."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


def rounding_tol(dtype=None, factor=100.0):
    """A tolerance for identities that hold up to rounding: ``factor * eps(dtype)``."""
    return factor * float(jnp.finfo(dtype or jnp.result_type(float)).eps)
