"""Events that stop a flow: the loss falls below a target, the norm crosses a level.

Each event is an ``eqx.Module`` whose threshold is a pytree leaf: :func:`homflow.flow.integrate` passes it to the
compiled solve as a traced array, so flows with other thresholds (a sweep over initial scales stopping at
``||theta|| = level``) reuse one compilation.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp

from ..models import safe_norm

__all__ = ["FlowEvent", "LossBelow", "NormAbove", "NormBelow"]


class FlowEvent(eqx.Module):
    """A terminating event ``g(theta) = 0``; subclasses define ``condition(theta, problem)`` (negative before the
    event, positive after) and ``name``."""

    @property
    def name(self) -> str:  # pragma: no cover - abstract
        return "event"

    def condition(self, theta, problem):  # pragma: no cover - abstract
        raise NotImplementedError


def _positive(name, value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a finite number > 0; got {value!r}.") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"`{name}` must be a finite number > 0; got {value!r}.")
    return v


class LossBelow(FlowEvent):
    """Stop when ``L(theta) <= target`` (compared in log space, so targets like 1e-300 work)."""

    target: float

    def __check_init__(self):
        if not hasattr(self.target, "aval"):  # a concrete value (not the traced copy inside a compiled solve)
            _positive("target", self.target)

    @property
    def name(self):
        return f"loss_below_{float(self.target):g}"

    def condition(self, theta, problem):
        return jnp.log(self.target) - problem.log_loss(theta)


class NormAbove(FlowEvent):
    """Stop when ``||theta|| >= level`` (e.g. the escape from a small initialisation). The condition
    ``log(||theta|| / level)`` is scale-free, so the event is located to a relative accuracy at any level."""

    level: float

    def __check_init__(self):
        if not hasattr(self.level, "aval"):
            _positive("level", self.level)

    @property
    def name(self):
        return f"norm_above_{float(self.level):g}"

    def condition(self, theta, problem):
        tiny = jnp.finfo(theta.dtype).tiny
        return jnp.log(jnp.maximum(safe_norm(theta), tiny) / self.level)


class NormBelow(FlowEvent):
    """Stop when ``||theta|| <= level``."""

    level: float

    def __check_init__(self):
        if not hasattr(self.level, "aval"):
            _positive("level", self.level)

    @property
    def name(self):
        return f"norm_below_{float(self.level):g}"

    def condition(self, theta, problem):
        tiny = jnp.finfo(theta.dtype).tiny
        return jnp.log(self.level / jnp.maximum(safe_norm(theta), tiny))


def _check_events(events):
    if events is None:
        return ()
    if isinstance(events, FlowEvent):
        return (events,)
    events = tuple(events)
    for e in events:
        if not isinstance(e, FlowEvent):
            raise ValueError(f"`events` must hold LossBelow / NormAbove / NormBelow objects; got {e!r}.")
    return events
