"""Events that stop a gradient flow: the loss falls below a target, the norm crosses a level."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from ..models import safe_norm

__all__ = ["FlowEvent", "LossBelow", "NormAbove", "NormBelow"]


class FlowEvent:
    """A terminating event ``g(theta) = 0`` located by root finding; subclasses define ``condition`` (negative before
    the event, positive after) and ``name``."""

    name: str = "event"

    def condition(self, theta, objective):  # pragma: no cover - abstract
        raise NotImplementedError


def _positive(name, value):
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"`{name}` must be a finite number > 0; got {value!r}.")
    return v


@dataclasses.dataclass(frozen=True)
class LossBelow(FlowEvent):
    """Stop when ``L(theta) <= target`` (compared in log space, so targets like 1e-300 work)."""

    target: float

    def __post_init__(self):
        _positive("target", self.target)

    @property
    def name(self):
        return f"loss_below_{self.target:g}"

    def condition(self, theta, objective):
        return math.log(self.target) - objective.log_loss(theta)


@dataclasses.dataclass(frozen=True)
class NormAbove(FlowEvent):
    """Stop when ``||theta|| >= level`` (e.g. the escape from a small initialisation)."""

    level: float

    def __post_init__(self):
        _positive("level", self.level)

    @property
    def name(self):
        return f"norm_above_{self.level:g}"

    def condition(self, theta, objective):
        return safe_norm(theta) - self.level


@dataclasses.dataclass(frozen=True)
class NormBelow(FlowEvent):
    """Stop when ``||theta|| <= level``."""

    level: float

    def __post_init__(self):
        _positive("level", self.level)

    @property
    def name(self):
        return f"norm_below_{self.level:g}"

    def condition(self, theta, objective):
        return self.level - safe_norm(theta)


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


_ = jnp  # jnp is used by subclasses written elsewhere
