"""The contract between computations and the main job: checks with verdicts, figure specs, outcomes, the registry.

A built-in experiment is a function ``fn(params: dict, ctx: Context) -> Outcome`` registered with
:func:`register` under a name (``embedding-toy``, ``escape-law``, ...), with its default parameters and the overrides of
its ``--quick`` form. It computes (calling the computational layers), and returns arrays, checks and figure specs; the
runner stores them, and the report draws the figures. Experiments never import matplotlib. The records (:class:`Check`,
:class:`Figure`, :class:`Outcome`) live in the neutral module ``homflow._records`` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .._records import Check, Figure, Outcome, check

__all__ = ["Check", "Figure", "Outcome", "Context", "Experiment", "register", "REGISTRY", "get_experiment", "check"]


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
    # ``write_text(name, text)``: a file of the run's directory written atomically (e.g. a census table as CSV)
    write_text: Callable[[str, str], Any] = lambda name, text: None


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
