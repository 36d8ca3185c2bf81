"""The contract between computations and the main job: checks with verdicts, figure specs, outcomes, the registry.

A built-in experiment is a function ``fn(params: dict, ctx: Context) -> Outcome`` registered with
:func:`register` under a name (``embedding-toy``, ``escape-law``, ...), with its default parameters and the overrides of
its ``--quick`` form. It computes (calling the computational layers), and returns arrays, checks and figure specs; the
runner stores them, and the report draws the figures. Experiments never import matplotlib.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

__all__ = ["Check", "Figure", "Outcome", "Context", "Experiment", "register", "REGISTRY", "get_experiment", "check"]


@dataclasses.dataclass(frozen=True)
class Check:
    """One measured claim: ``value`` compared with ``tolerance`` by ``relation`` ('<=' or '>='), and its verdict."""

    name: str
    value: float
    tolerance: float
    passed: bool
    relation: str = "<="
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        v = float(self.value)
        return {
            "name": self.name,
            "value": v if math.isfinite(v) else str(v),
            "tolerance": float(self.tolerance),
            "passed": bool(self.passed),
            "relation": self.relation,
            "description": self.description,
        }


def check(name: str, value, tolerance, relation: str = "<=", description: str = "") -> Check:
    """Build a :class:`Check`; a non-finite value fails.

    >>> check("max error", 1e-13, 1e-11).passed
    True
    """
    if relation not in ("<=", ">="):
        raise ValueError(f"`relation` must be '<=' or '>='; got {relation!r}.")
    v = float(value)
    ok = math.isfinite(v) and (v <= tolerance if relation == "<=" else v >= tolerance)
    return Check(name, v, float(tolerance), bool(ok), relation, description)


@dataclasses.dataclass(frozen=True)
class Figure:
    """A figure spec drawn by the report: lines (or points, bars) of arrays named in the outcome's ``arrays``.

    ``x`` names the x array; ``ys`` the y arrays (same length as x, or 2-D with one column per line); ``labels`` one per
    y; ``logx``/``logy`` log axes; ``kind`` 'line', 'scatter' or 'bar'; ``hlines`` horizontal reference lines;
    ``display`` optionally names a dedicated Display of the report (``'loss_norm'``, ``'alignment'``, ``'margins'``,
    ``'errors'``, ``'saddle'``, ``'sparsity'``, ``'kkt'``) drawn from the same arrays instead of the generic one."""

    name: str
    title: str
    x: str
    ys: tuple[str, ...]
    labels: tuple[str, ...] = ()
    xlabel: str = ""
    ylabel: str = ""
    logx: bool = False
    logy: bool = False
    kind: str = "line"
    hlines: tuple[float, ...] = ()
    display: str = ""


@dataclasses.dataclass
class Outcome:
    """What an experiment returns: checks with verdicts, arrays to store (.npz), figure specs, and a JSON summary."""

    checks: list[Check]
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    figures: list[Figure] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


@dataclasses.dataclass
class Context:
    """Services the runner lends an experiment: progress reporting and a checkpoint store.

    ``progress(fraction, message)`` reports progress in [0, 1]. ``save_checkpoint(name, arrays)`` writes arrays
    atomically; ``load_checkpoint(name)`` returns them (or ``None``), so a long computation resumes where it stopped.
    """

    progress: Callable[[float, str], None] = lambda f, m: None
    save_checkpoint: Callable[[str, dict], None] = lambda name, arrays: None
    load_checkpoint: Callable[[str], dict | None] = lambda name: None
    quick: bool = False


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    fn: Callable[[dict, Context], Outcome]
    description: str
    defaults: dict
    quick: dict
    validate: Callable[[dict], Any] | None = None

    def params(self, overrides: dict | None = None, *, quick: bool = False) -> dict:
        """Default parameters, then the quick overrides, then ``overrides`` (unknown keys refused by the caller)."""
        p = dict(self.defaults)
        if quick:
            p.update(self.quick)
        p.update(overrides or {})
        return p


REGISTRY: dict[str, Experiment] = {}


def register(name: str, *, description: str, defaults: dict, quick: dict | None = None,
             validate: Callable[[dict], Any] | None = None):
    """Decorator registering ``fn(params, ctx) -> Outcome`` as the built-in experiment ``name``.

    ``validate(params)`` (optional) checks the merged parameters beyond their types (raise ``ValueError`` naming the
    key); the config loader calls it, so a bad value is refused before the run starts."""

    def deco(fn):
        unknown = set(quick or {}) - set(defaults)
        if unknown:
            raise ValueError(f"quick overrides of {name!r} name unknown parameters {sorted(unknown)}.")
        REGISTRY[name] = Experiment(name, fn, description, dict(defaults), dict(quick or {}), validate)
        return fn

    return deco


def get_experiment(name: str) -> Experiment:
    """The registered experiment ``name``; a clear error with a 'did you mean' otherwise."""
    from . import _builtins  # noqa: F401  (fills the registry)

    if name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown experiment {name!r}; known: {sorted(REGISTRY)}.{hint}")
    return REGISTRY[name]
