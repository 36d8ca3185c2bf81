"""The one solution type of a flow or of a discrete method: saved states, diagnostics, ``result`` (a :class:`RESULTS`
item), ``stats``, a one-line ``reason``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from ._results import RESULTS, is_success, result_name

__all__ = ["Trajectory", "FlowResult"]


@dataclasses.dataclass(frozen=True)
class FlowResult:
    """Transition form of an outcome (``success``, ``reason``, ``event``) accepted by :class:`Trajectory` for code not
    yet written against :class:`RESULTS`; a trajectory stores it as ``result`` / ``reason`` / ``event``."""

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
        stats: dict with ``solver``, ``num_steps``, ``num_accepted_steps``, ``num_rejected_steps``, ``grad_evals``
            (and solver-specific counts, e.g. ``num_stiff_steps``, ``t_switch``).
        result: a :class:`RESULTS` item (``successful``, ``event_occurred``, ``max_steps_reached``, ``stiff_limit``,
            ``sliding_mode``, ``nonfinite``, ...); ``success`` is True for the first two.
        reason: one line: where the flow stopped, why, and what to do about it.
        event: the name of the event that stopped the flow, or ``None``.
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
    result: Any
    unflatten: Callable
    degree: int
    steps: np.ndarray | None = None
    extras: dict = dataclasses.field(default_factory=dict)
    reason: str = ""
    event: str | None = None

    def __post_init__(self):
        if isinstance(self.result, FlowResult):  # transition form
            r = self.result
            object.__setattr__(self, "reason", self.reason or r.reason)
            object.__setattr__(self, "event", self.event or r.event)
            code = (RESULTS.event_occurred if r.event else RESULTS.successful) if r.success else RESULTS.internal_error
            object.__setattr__(self, "result", code)

    @property
    def success(self) -> bool:
        """Reached ``t1`` or stopped at a requested event."""
        return is_success(self.result)

    @property
    def result_name(self) -> str:
        """The name of :attr:`result`, e.g. ``'successful'`` or ``'stiff_limit'``."""
        return result_name(self.result)

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
            "success": self.success,
            "result": self.result_name,
            "reason": self.reason,
        }
