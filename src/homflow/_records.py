"""The records shared by the experiments, the runner and the report: checks with verdicts, figure specs, outcomes.

A neutral module (standard library and NumPy only) so that the presentation layers import it without importing each
other: ``experiments`` builds :class:`Outcome` objects, the runner stores them, ``report`` draws their
:class:`Figure` specs. ``homflow.experiments`` re-exports all three.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["Check", "Figure", "Outcome", "check", "figure_from_dict"]


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
    y; ``logx``/``logy`` log axes (``None``, the default: log when the positive data span decades, see
    :func:`homflow.report.wants_log`); ``kind`` 'line', 'scatter' or 'bar'; ``hlines`` horizontal reference lines;
    ``display`` optionally names a dedicated Display of the report (``'loss_norm'``, ``'alignment'``, ``'margins'``,
    ``'errors'``, ``'saddle'``, ``'sparsity'``, ``'kkt'``) drawn from the same arrays instead of the generic one."""

    name: str
    title: str
    x: str
    ys: tuple[str, ...]
    labels: tuple[str, ...] = ()
    xlabel: str = ""
    ylabel: str = ""
    logx: bool | None = None
    logy: bool | None = None
    kind: str = "line"
    hlines: tuple[float, ...] = ()
    display: str = ""


def figure_from_dict(d: dict) -> Figure:
    """The :class:`Figure` a stored ``dataclasses.asdict`` dict describes (unknown keys ignored, lists as tuples)."""
    d = dict(d)
    for k in ("ys", "labels", "hlines"):
        d[k] = tuple(d.get(k, ()))
    known = set(Figure.__dataclass_fields__)
    return Figure(**{k: v for k, v in d.items() if k in known})


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
