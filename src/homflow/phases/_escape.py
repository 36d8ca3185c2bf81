"""The escape-time law: from ``delta * theta_hat`` the weights escape after a time ``~ s* / delta^(L-2)`` for ``L > 2``
and ``~ log(1/delta) / lambda`` for ``L = 2`` (``lambda = L N(u*)``, the growth rate along the KKT direction);
arXiv 2403.08121, docs/math.md section 3."""

from __future__ import annotations

import math

import equinox as eqx
import numpy as np

from ..models import AbstractHomogeneousModel
from ._early import _escape_level, _unit, ncf_flow
from ._solve import integrate, make_problem

__all__ = ["EscapeLaw", "escape_law", "fit_line"]


def fit_line(x, y):
    """Least squares ``y = intercept + slope x``; returns ``(slope, slope_stderr, intercept)``.

    The standard error is ``sqrt(SSR / (n - 2) / sum (x - mean x)^2)`` (0 when the fit is exact; nan for n = 2).

    >>> s, se, c = fit_line([0.0, 1.0, 2.0], [1.0, 3.0, 5.0]); round(s, 12), round(c, 12)
    (2.0, 1.0)
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"`x` and `y` must be 1-D of the same length >= 2; got {x.shape} and {y.shape}.")
    xm = x - x.mean()
    sxx = float(xm @ xm)
    if sxx == 0:
        raise ValueError("`x` must hold at least two distinct values.")
    slope = float(xm @ (y - y.mean()) / sxx)
    intercept = float(y.mean() - slope * x.mean())
    ssr = float(np.sum((y - intercept - slope * x) ** 2))
    se = math.sqrt(ssr / (x.size - 2) / sxx) if x.size > 2 else float("nan")
    return slope, se, intercept


class EscapeLaw(eqx.Module):
    """A measured escape-time law.

    Attributes:
        deltas, times: initial scales and escape times (``inf`` where the level was not reached).
        law: ``'power'`` (``L > 2``: ``log t = c - exponent * log delta``) or ``'log'`` (``L = 2``:
            ``t = c + slope * log(1/delta)``).
        exponent, exponent_stderr: for ``'power'`` the fitted ``-d log t / d log delta``; for ``'log'`` the fitted
            slope ``d t / d log(1/delta)``, each with its least-squares standard error.
        predicted: ``L - 2`` (power) or ``1 / (L N(u*))`` from the NCF flow's direction (log).
        deviation: ``|exponent - predicted|`` (log law: relative to ``predicted``).
        intercept: the fitted intercept; level: the escape level (absolute, or ``factor * delta``); relative: which.
    """

    deltas: np.ndarray
    times: np.ndarray
    law: str
    exponent: float
    exponent_stderr: float
    predicted: float
    deviation: float
    intercept: float
    degree: int
    level: float
    relative: bool


def escape_law(model: AbstractHomogeneousModel, data, *, loss="square", deltas=None, factor: float | None = None,
               level: float | None = None, rtol: float = 1e-9, max_steps: int = 200_000) -> EscapeLaw:
    """Measure escape times from ``delta * theta_hat`` (``theta_hat`` the direction of ``model``) over ``deltas`` and fit
    the law.

    Arguments:
        deltas: initial norms (at least 3; default 6 values over 3 decades, 1e-6 .. 1e-3).
        factor: relative escape level (the norm reaches ``factor * delta``; default 100 for ``L > 2``, where it removes
            the ``O(1)`` offset of an absolute level).
        level: absolute escape level (default 0.1 for ``L = 2``, whose ``log(1/delta)`` law needs one).
        rtol: solver tolerance (atol = rtol * delta).

    Returns:
        An :class:`EscapeLaw`.

    Raises:
        ValueError: on fewer than 3 deltas, a delta <= 0, or a level below a delta.
    """
    deltas = np.geomspace(1e-6, 1e-3, 6) if deltas is None else np.asarray(deltas, dtype=float)
    if deltas.ndim != 1 or deltas.size < 3 or not np.all(np.isfinite(deltas)) or np.any(deltas <= 0):
        raise ValueError(f"`deltas` must hold at least 3 finite values > 0; got {deltas!r}.")
    problem, theta = make_problem(model, data, loss)
    th_hat, _ = _unit(theta)
    L = problem.degree
    if factor is None and level is None:
        if L > 2:
            factor = 1e2
        else:
            level = 0.1
    relative = level is None
    nf = ncf_flow(model, data, loss=loss, level=1e4 if L > 2 else 1e3)
    times = []
    for d in deltas:
        lev = _escape_level(float(d), factor, level)
        t1 = 1e4 / d ** max(L - 2, 0) if L > 2 else 1e4
        if L > 2 and nf.escaped:
            t1 = 10 * nf.s_star / d ** (L - 2)
        sol = integrate(problem, d * th_hat, field="loss", t1=t1, level=lev, rtol=rtol, max_steps=max_steps)
        times.append(sol.t_end if sol.reached else float("inf"))
    times = np.asarray(times)
    ok = np.isfinite(times)
    if ok.sum() < 3:
        raise ValueError(f"the flow escaped for only {int(ok.sum())} of the deltas {deltas.tolist()} (need 3).")
    if L > 2:
        slope, se, c = fit_line(np.log(deltas[ok]), np.log(times[ok]))
        exponent, predicted, law = -slope, float(L - 2), "power"
        deviation = abs(exponent - predicted)
    else:
        slope, se, c = fit_line(np.log(1 / deltas[ok]), times[ok])
        lam = L * float(nf.ncf_values[-1])
        exponent, predicted, law = slope, (1.0 / lam if lam > 0 else float("inf")), "log"
        deviation = abs(exponent - predicted) / abs(predicted)
    lev_out = float(factor) if relative else float(level)
    return EscapeLaw(deltas, times, law, float(exponent), float(se), predicted, float(deviation), float(c), L, lev_out,
                     relative)


