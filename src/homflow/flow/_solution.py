"""The result of a flow or of a discrete method: saved states, diagnostics, statistics and a readable outcome."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

__all__ = ["Trajectory", "FlowResult"]


@dataclasses.dataclass(frozen=True)
class FlowResult:
    """Outcome of an integration: ``success`` (reached ``t1`` or stopped at a requested event), which ``event`` fired
    (or ``None``), and a readable ``reason``."""

    success: bool
    reason: str
    event: str | None = None

    def __str__(self) -> str:
        return self.reason


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """States saved along a gradient flow (or GD/SGD run), with diagnostics computed while saving.

    Attributes:
        ts: times ``t`` (flow time; for discrete methods the cumulative step size ``sum lr``), shape (T,).
        thetas: flat parameter vectors, shape (T, P).
        loss, log_loss, norm: ``L``, ``log L`` and ``||theta||`` at the saved times.
        stats: dict with ``num_steps``, ``num_accepted_steps``, ``num_rejected_steps``, ``grad_evals`` (and more).
        result: a :class:`FlowResult`.
        unflatten: ``theta -> model``.
        steps: step index of each saved state for discrete methods (``None`` for the flow).
        extras: method-specific arrays (e.g. SGD batches).
    """

    ts: np.ndarray
    thetas: np.ndarray
    loss: np.ndarray
    log_loss: np.ndarray
    norm: np.ndarray
    stats: dict
    result: FlowResult
    unflatten: Callable
    degree: int
    steps: np.ndarray | None = None
    extras: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def final(self):
        """The model at the last saved time."""
        return self.unflatten(jnp.asarray(self.thetas[-1]))

    @property
    def initial(self):
        return self.unflatten(jnp.asarray(self.thetas[0]))

    def model_at(self, i: int):
        """The model at saved index ``i``."""
        return self.unflatten(jnp.asarray(self.thetas[i]))

    def directions(self) -> np.ndarray:
        """Unit directions ``theta / ||theta||`` at the saved times."""
        n = np.linalg.norm(self.thetas, axis=-1, keepdims=True)
        return self.thetas / np.where(n > 0, n, 1.0)

    def time_where(self, mask) -> float | None:
        idx = np.flatnonzero(np.asarray(mask))
        return float(self.ts[idx[0]]) if idx.size else None

    def summary(self) -> dict[str, Any]:
        """Plain-Python figures for printing or JSON."""
        return {
            "t_final": float(self.ts[-1]),
            "loss_final": float(self.loss[-1]),
            "log_loss_final": float(self.log_loss[-1]),
            "norm_initial": float(self.norm[0]),
            "norm_final": float(self.norm[-1]),
            "saved": int(len(self.ts)),
            **{k: (int(v) if isinstance(v, (int, np.integer)) else v) for k, v in self.stats.items()},
            "success": self.result.success,
            "reason": self.result.reason,
        }
