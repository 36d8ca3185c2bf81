"""Test entry point: float64 on (the library never flips it at import), tolerances keyed by dtype."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _bounded_compiled_programs():
    """A test session compiles thousands of XLA programs per process; each holds memory mappings, and at the kernel's
    per-process limit (vm.max_map_count) a compile dies with a segmentation fault. Programs are dropped after a test
    once a process holds half the limit (the library's own guard, used between shards)."""
    yield
    from homflow.shards import release_compiled_programs

    release_compiled_programs()


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


def rounding_tol(dtype=None, factor=100.0):
    """A tolerance for identities that hold up to rounding: ``factor * eps(dtype)``."""
    return factor * float(jnp.finfo(dtype or jnp.result_type(float)).eps)
