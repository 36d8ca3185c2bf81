"""The escape-time law over a census (docs/math.md §3, arXiv 2403.08121): from ``delta * u`` the flow escapes after
a time ``~ s(u) / delta^(L-2)`` for ``L > 2`` (``t delta^(L-2)`` constant across deltas for each direction), and after
``~ log(1/delta) / lambda + c(u)`` for ``L = 2`` with an absolute level (``lambda = L N(u*)``, the growth rate along the
KKT point ``u*``)."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["CensusLaw", "fit_escape_law", "within_slope"]


@dataclasses.dataclass(frozen=True)
class CensusLaw:
    """The law fitted within directions (each direction's own intercept; only directions escaping at >= 2 deltas).

    Attributes:
        law: ``'power'`` (``L > 2``) or ``'log'`` (``L = 2``).
        exponent, stderr: power: the fitted ``-d log t / d log delta``; log: the fitted ``d t / d log(1/delta)``.
        predicted: ``L - 2`` (power) or the mean over the members of ``1 / lambda`` of their KKT point (log).
        deviation: ``|exponent - predicted|`` (log: relative to ``predicted``).
        rescaled_spread: power: the largest ``|r / median_u(r) - 1|`` of ``r = t delta^(L-2)`` over the deltas of a
            direction ``u``, over all directions (0 when the law holds exactly); log: nan.
        n_directions: directions used.
    """

    law: str
    exponent: float
    stderr: float
    predicted: float
    deviation: float
    rescaled_spread: float
    n_directions: int


def fit_escape_law(direction, delta, t_escape, degree: int, *, growth=None) -> CensusLaw:
    """Fit the escape-time law to a census.

    Arguments:
        direction: (N,) id of each member's initial direction; delta: (N,) its initial norm; t_escape: (N,) its escape
            time (``inf``/``nan``: no escape, left out).
        degree: the order ``L`` of the network.
        growth: (N,) ``lambda = L N(u*)`` of each member's KKT point (needed for ``L = 2``).

    Returns:
        :class:`CensusLaw`.

    Raises:
        ValueError: if fewer than 2 directions escape at 2 or more distinct deltas, or ``L = 2`` without ``growth``.

    >>> d = np.repeat([0, 1], 3); de = np.tile([1e-2, 1e-3, 1e-4], 2); s = np.repeat([2.0, 5.0], 3)
    >>> law = fit_escape_law(d, de, s / de, 3); round(law.exponent, 12), law.rescaled_spread
    (1.0, 0.0)
    """
    direction, delta, t = (np.asarray(a).ravel() for a in (direction, delta, t_escape))
    if not (direction.shape == delta.shape == t.shape):
        raise ValueError(f"`direction`, `delta` and `t_escape` must have one length; got {direction.shape}, "
                         f"{delta.shape}, {t.shape}.")
    if degree < 2:
        raise ValueError(f"`degree` must be >= 2 for an escape law; got {degree!r}.")
    ok = np.isfinite(t) & (t > 0) & (delta > 0)
    xs, ys, spreads, used, idx = [], [], [], 0, []
    for u in np.unique(direction[ok]):
        m = ok & (direction == u)
        if np.unique(delta[m]).size < 2:
            continue
        used += 1
        x = np.log(delta[m]) if degree > 2 else np.log(1.0 / delta[m])
        y = np.log(t[m]) if degree > 2 else t[m]
        xs.append(x - x.mean())
        ys.append(y - y.mean())
        idx.append(np.flatnonzero(m))
        if degree > 2:
            r = t[m] * delta[m] ** (degree - 2)
            spreads.append(float(np.max(np.abs(r / np.median(r) - 1.0))))
    if used < 2:
        raise ValueError(f"the escape law needs >= 2 directions that escape at >= 2 distinct deltas; got {used}.")
    x, y = np.concatenate(xs), np.concatenate(ys)
    sxx = float(x @ x)
    slope = float(x @ y / sxx)
    dof = max(x.size - used - 1, 1)
    stderr = float(np.sqrt(np.sum((y - slope * x) ** 2) / dof / sxx))
    if degree > 2:
        exponent, predicted = -slope, float(degree - 2)
        return CensusLaw("power", exponent, stderr, predicted, abs(exponent - predicted), max(spreads), used)
    if growth is None:
        raise ValueError("`growth` (lambda = L N(u*) per member) is needed for the L = 2 law.")
    g = np.asarray(growth, float).ravel()[np.concatenate(idx)]
    predicted = float(np.mean(1.0 / g[np.isfinite(g) & (g > 0)])) if np.any(g > 0) else float("inf")
    return CensusLaw("log", slope, stderr, predicted, abs(slope - predicted) / abs(predicted), float("nan"), used)


def within_slope(group, x, y) -> tuple[float, float, int]:
    """Least-squares slope of ``y`` on ``x`` with one intercept per ``group`` (groups with >= 2 distinct finite
    ``x``); returns ``(slope, stderr, groups used)`` (nan slope if fewer than one group qualifies).

    >>> within_slope([0, 0, 1, 1], [0.0, 1.0, 0.0, 1.0], [1.0, 3.0, 5.0, 7.0])[:2]
    (2.0, 0.0)
    """
    group, x, y = (np.asarray(a).ravel() for a in (group, x, y))
    ok = np.isfinite(x) & np.isfinite(y)
    xs, ys = [], []
    for g in np.unique(group[ok]):
        m = ok & (group == g)
        if np.unique(x[m]).size < 2:
            continue
        xs.append(x[m] - x[m].mean())
        ys.append(y[m] - y[m].mean())
    if not xs:
        return float("nan"), float("nan"), 0
    xc, yc = np.concatenate(xs), np.concatenate(ys)
    sxx = float(xc @ xc)
    slope = float(xc @ yc / sxx)
    dof = max(xc.size - len(xs) - 1, 1)
    return slope, float(np.sqrt(np.sum((yc - slope * xc) ** 2) / dof / sxx)), len(xs)
