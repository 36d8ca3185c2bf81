"""The late phase along a solution: smoothed and normalized margins and the (eps, delta)-KKT pair over time.

Under exponential or logistic loss, once the loss is below 1 the smoothed margin is non-decreasing (arXiv 1906.05890,
Thm 4.1) and the normalised direction becomes ``(eps, delta)``-KKT for the max-margin problem with both going to 0
(MATH.md sections 2 and 5). :func:`margin_along` computes these at the saved times of a trajectory.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ..losses import get_loss, smoothed_margin
from ._margin import _kkt_from_theta, _margins_jac, make_margin_problem

__all__ = ["MarginPath", "margin_along"]


@dataclasses.dataclass(frozen=True)
class MarginPath:
    """Late-phase quantities at saved times (arrays of equal length; NaN where ``valid`` is False).

    Attributes:
        ts, index: saved times and their indices in the trajectory.
        log_loss: ``log L``; valid: ``L < 1`` and ``q_min > 0`` (where the late-phase quantities are defined).
        smoothed, normalized: smoothed margin and normalized margin ``q_min / ||theta||^L``.
        eps, delta, stationarity, slackness, feasibility: from :func:`max_margin_kkt` of the direction.
        n_support: number of positive multipliers.
    """

    ts: np.ndarray
    index: np.ndarray
    log_loss: np.ndarray
    valid: np.ndarray
    smoothed: np.ndarray
    normalized: np.ndarray
    eps: np.ndarray
    delta: np.ndarray
    stationarity: np.ndarray
    slackness: np.ndarray
    feasibility: np.ndarray
    n_support: np.ndarray

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """All fields as a dict of arrays (for an experiment's ``Outcome.arrays``)."""
        return {prefix + f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}


def margin_along(trajectory, data, *, loss, every: int = 1, active_tol: float = 1e-2, ridge: float = 1e-13) -> MarginPath:
    """Smoothed margin, normalized margin and the ``(eps, delta)``-KKT pair at the saved times of ``trajectory``.

    Arguments:
        trajectory: a :class:`homflow.flow.Trajectory` (flow, GD or SGD).
        data: the data it was trained on (labels +-1); loss: ``'exponential'`` or ``'logistic'``.
        every: use every ``every``-th saved state (the last one is always included).
        active_tol, ridge: passed to :func:`max_margin_kkt`.

    Returns:
        A :class:`MarginPath`; entries where the loss is ``>= 1`` or the minimum margin is ``<= 0`` are NaN.

    Raises:
        ValueError: for a loss other than exponential / logistic or ``every < 1``.
    """
    loss = get_loss(loss)
    if loss.name not in ("exponential", "logistic"):
        raise ValueError(f"`loss` must be 'exponential' or 'logistic' for the late phase; got {loss.name!r}.")
    if isinstance(every, bool) or int(every) < 1:
        raise ValueError(f"`every` must be an integer >= 1; got {every!r}.")
    T = len(trajectory.ts)
    idx = np.unique(np.concatenate([np.arange(0, T, int(every)), [T - 1]])).astype(np.int64)
    model0 = trajectory.model_at(0)
    prob, _ = make_margin_problem(model0, data)
    nan = np.full(idx.size, np.nan)
    out = {k: nan.copy() for k in ("smoothed", "normalized", "eps", "delta", "stationarity", "slackness",
                                   "feasibility", "n_support")}
    valid = np.zeros(idx.size, dtype=bool)
    log_losses = np.empty(idx.size)
    for j, i in enumerate(idx):
        theta = jnp.asarray(trajectory.thetas[i])
        q = np.asarray(_margins_jac(prob, theta)[0])
        model = trajectory.unflatten(theta)
        lv = float(loss.log_value(prob.y * jnp.asarray(q), prob.y))  # outputs = y q since y = +-1
        log_losses[j] = lv
        if not (lv < 0.0 and q.min() > 0):
            continue
        valid[j] = True
        r = _kkt_from_theta(prob, theta, trajectory.unflatten, active_tol=active_tol, ridge=ridge)
        out["smoothed"][j] = float(smoothed_margin(model, data, loss))
        out["normalized"][j] = r.normalized_margin
        out["eps"][j], out["delta"][j], out["stationarity"][j] = r.eps, r.delta, r.stationarity
        out["slackness"][j], out["feasibility"][j] = r.slackness, r.feasibility
        out["n_support"][j] = r.support.size
    return MarginPath(ts=np.asarray(trajectory.ts)[idx], index=idx, log_loss=log_losses, valid=valid, **out)
