"""The flows of the phase measurements, as thin callers of :func:`homflow.flow.integrate` (the one integrate path,
with homflow's stiff-aware engine :class:`homflow.flow.Auto` by default).

Two vector fields are integrated: the loss gradient flow ``d theta/dt = -grad L(theta)`` (docs/math.md §2) and the
NCF flow ``du/ds = grad N(u)`` with ``N(u) = sum_i ytilde_i Phi(u; x_i)`` (docs/math.md section 3, arXiv 2403.08121).
Both stop at the first time the norm reaches ``level`` (:class:`homflow.flow.NormAbove`, located on the step's dense
output). The stopping level, the final time and the tolerances are traced and the save grids padded to a few lengths,
so a sweep over initial scales ``delta`` compiles once per architecture instead of once per ``delta``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np

from ..flow import NormAbove, Problem, as_solver, integrate as flow_integrate, make_problem

__all__ = ["Problem", "make_problem", "Solve", "integrate", "record_stats"]

_RECORDERS: list[list] = []


@contextlib.contextmanager
def record_stats():
    """Collect the ``stats`` dict (``solver``, ``grad_evals``, ...) of every solve of :func:`integrate` run inside the
    block, in call order, so that a caller of the phase functions can report which solver ran and what it cost.

    >>> with record_stats() as rec:
    ...     pass
    >>> rec
    []
    """
    rec: list[dict] = []
    _RECORDERS.append(rec)
    try:
        yield rec
    finally:
        _RECORDERS.remove(rec)


def _bucket(n: int) -> int:
    """Padded length of a save grid (few distinct lengths, so few compilations)."""
    return max(64, 1 << (int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Solve:
    """Result of :func:`integrate`: saved states (``ts``, ``thetas``, ``values`` = log loss or NCF value, ``norms``),
    the end time ``t_end`` and state ``theta_end``, whether the norm ``level`` was reached (``reached``), the number of
    steps, the :class:`homflow.flow.RESULTS` item ``result``, the one-line ``reason`` and the solver's ``stats``."""

    ts: np.ndarray
    thetas: np.ndarray
    values: np.ndarray
    norms: np.ndarray
    t_end: float
    theta_end: np.ndarray
    reached: bool
    num_steps: int
    result: object
    reason: str
    stats: dict


def integrate(problem: Problem, theta0, *, field: str = "loss", t1: float, level: float, ts=None,
              rtol: float = 1e-9, atol: float | None = None, max_steps: int = 200_000, solver="auto") -> Solve:
    """Integrate the loss flow (``field='loss'``) or the NCF flow (``field='ncf'``) from ``theta0`` until
    ``||theta|| = level`` or ``t1``.

    Arguments:
        problem: from :func:`homflow.flow.make_problem`.
        theta0: flat initial vector.
        t1: final time; level: stopping norm (> 0).
        ts: save times in ``[0, t1]`` (default: 0 only); states after the stop are dropped.
        rtol: relative tolerance; atol: absolute tolerance, default :func:`homflow.flow.default_atol`.
        max_steps: the solver's step budget (static: changing it recompiles).
        solver: a solver name or object (default ``'auto'``).

    Returns:
        A :class:`Solve` (a failed flow is returned with its ``result`` and ``reason``, not raised).

    Raises:
        ValueError: for a non-positive ``t1``, ``level`` or tolerance, or an unknown ``field``.
    """
    if field not in ("loss", "ncf"):
        raise ValueError(f"`field` must be 'loss' or 'ncf'; got {field!r}.")
    for name, v in (("t1", t1), ("level", level), ("rtol", rtol)):
        if not (float(v) > 0 and math.isfinite(float(v))):
            raise ValueError(f"`{name}` must be a finite number > 0; got {v!r}.")
    ts_np = np.zeros(1) if ts is None else np.asarray(ts, dtype=float)
    if ts_np.ndim != 1 or ts_np[0] < 0 or np.any(np.diff(ts_np) <= 0) or ts_np[-1] > t1:
        raise ValueError("`ts` must be increasing times in [0, t1].")
    n_real = ts_np.size
    # pad the grid with times in (ts[-1], t1] (a few distinct lengths: few compilations); the padding is dropped
    n_pad = _bucket(n_real + 1) - n_real
    last = ts_np[-1]
    pad = last + (float(t1) - last) * np.arange(1, n_pad + 1) / (n_pad + 1) if t1 > last else np.array([])
    grid = np.concatenate([ts_np, pad])
    if not (np.all(np.diff(grid) > 0) and grid[-1] <= t1):  # a horizon too close to the last time: no padding
        grid = ts_np
    tr = flow_integrate(problem, as_solver(solver, rtol=rtol, atol=atol), theta0, t1=float(t1), ts=grid,
                        field=field, time="linear", events=NormAbove(float(level)), max_steps=max_steps, throw=False)
    # the trajectory's rows: the grid times reached, then the end point (unless it is a grid time): keep the asked ones
    t_end = float(tr.ts[-1])
    keep = np.flatnonzero(np.isin(tr.ts, ts_np))
    values = tr.extras["ncf"] if field == "ncf" else tr.log_loss
    reached = tr.event is not None
    for rec in _RECORDERS:
        rec.append(dict(tr.stats))
    return Solve(tr.ts[keep], tr.thetas[keep], np.asarray(values)[keep], tr.norm[keep], t_end,
                 np.asarray(tr.thetas[-1]), bool(reached), int(tr.stats["num_steps"]), tr.result, tr.reason,
                 dict(tr.stats))
