"""The late phase along a solution: smoothed and normalized margins and the (eps, delta)-KKT pair over time.

Under exponential or logistic loss, once the loss is below 1 the smoothed margin is non-decreasing (arXiv 1906.05890,
Thm 4.1) and the normalised direction becomes ``(eps, delta)``-KKT for the max-margin problem with both going to 0
(docs/math.md sections 2 and 5). :func:`margin_along` computes these at the saved times of a trajectory.

Which constraints carry multipliers matters a lot late in a flow. Along the flow the margins of the eventual support
approach the minimum only like ``1/log t`` (the direction converges that slowly), so at ``t = 1e8`` the support margins
of the rescaled direction may still be spread over ``[1, 1.05]``: with ``active_tol = 1e-2`` part of the support is
excluded and the stationarity stays large (a demo run: 0.60) although the direction is much closer to KKT with the
whole cluster active (0.17, with relative slackness 0.011). A larger ``active_tol`` helps late but hides nothing only
if the slackness ``delta`` is read with it: NNLS over *all* constraints fits stationarity almost exactly by loading slack
constraints and turns a bad point into a small ``eps`` and a large ``delta``. Hence two reports:

- fixed: ``eps``, ``delta``, ``stationarity``, ``slackness`` with the near-active set ``q_i <= 1 + active_tol``;
- adaptive (``*_adaptive``): the best of a few thresholds ``tau`` in ``adaptive_tols`` (default ``active_tol`` times
  ``1, sqrt 10, 10, 10 sqrt 10, 100``, capped at 1), *best* meaning the smallest ``kkt_gap = max(stationarity,
  |slackness|)``, both relative (``||theta||^2 = L sum lambda`` at a KKT point, so the two scales agree); the chosen
  threshold is ``adaptive_tol``, and its ``delta`` is always reported with its ``eps``. A point is close to KKT only
  when both are small.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ..losses import get_loss, smoothed_margin
from ._clarke import DEFAULT_KINK_TOL, DEFAULT_MAX_PATTERNS
from ._margin import _kkt_from_theta, _margins_jac, make_margin_problem, margin_multipliers, resolve_clarke

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
        adaptive_tol: the threshold chosen by the adaptive report (module docstring);
        eps_adaptive, delta_adaptive, stationarity_adaptive, slackness_adaptive, n_support_adaptive: the
            ``(eps, delta)`` pair and its relative forms with that near-active set; kkt_gap:
            ``max(stationarity_adaptive, |slackness_adaptive|)`` (small only if both are).
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
    adaptive_tol: np.ndarray | None = None
    eps_adaptive: np.ndarray | None = None
    delta_adaptive: np.ndarray | None = None
    stationarity_adaptive: np.ndarray | None = None
    slackness_adaptive: np.ndarray | None = None
    n_support_adaptive: np.ndarray | None = None
    kkt_gap: np.ndarray | None = None

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """All fields as a dict of arrays (for an experiment's ``Outcome.arrays``)."""
        return {prefix + f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}


_ADAPTIVE = tuple(10.0 ** (k / 2) for k in range(5))


def _adaptive(q, G, theta, tols, ridge):
    """Best ``(eps, delta)`` over near-active sets ``q_i <= 1 + tau``: smallest ``max(stationarity, |slackness|)``."""
    nrm = float(np.linalg.norm(theta))
    best = None
    for tau in tols:
        A = np.flatnonzero(q <= 1.0 + tau)
        lam = np.zeros(q.size)
        lam[A] = margin_multipliers(G[A], theta, ridge=ridge)
        eps = float(np.linalg.norm(theta - G.T @ lam))
        delta = float(lam @ (q - 1.0))
        slack = delta / float(lam.sum()) if lam.sum() > 0 else 0.0
        gap = max(eps / nrm, abs(slack))
        if best is None or gap < best[-1]:
            best = (float(tau), eps, delta, eps / nrm, slack, int(np.sum(lam > 0)), gap)
    return best


def margin_along(trajectory, data, *, loss, every: int = 1, active_tol: float = 1e-2, ridge: float = 1e-13,
                 adaptive_tols=None, clarke: bool | None = None, kink_tol: float = DEFAULT_KINK_TOL) -> MarginPath:
    """Smoothed margin, normalized margin and the ``(eps, delta)``-KKT pair at the saved times of ``trajectory``.

    What to read: the smoothed margin must be non-decreasing once ``L < 1`` (a theorem, so a decrease is a numerical
    problem); the normalized margin rises to the limit's; the ``(eps, delta)`` pair measures how far the direction is
    from a KKT point. Late in a flow read the adaptive report (``stationarity_adaptive`` with ``slackness_adaptive``,
    or their maximum ``kkt_gap``): the fixed one with a small ``active_tol`` stays large for a long time because the
    support margins reach the minimum only like ``1/log t`` (module docstring). Neither hides a bad point: each
    ``eps`` comes with the ``delta`` of the same multipliers.

    Arguments:
        trajectory: a :class:`homflow.flow.Trajectory` (flow, GD or SGD).
        data: the data it was trained on (labels +-1); loss: ``'exponential'`` or ``'logistic'``.
        every: use every ``every``-th saved state (the last one is always included).
        active_tol, ridge: passed to :func:`max_margin_kkt` (the fixed report).
        adaptive_tols: thresholds of the adaptive report (default ``active_tol * (1, 10^0.5, 10, 10^1.5, 100)``, each
            capped at ``max(active_tol, 1)``).
        clarke, kink_tol: the fixed report's Clarke options (see :func:`max_margin_kkt`: automatic for ReLU /
            leaky-ReLU ``TwoLayer`` and ``MLP``, any slope in ``[alpha, 1]`` at pre-activations within ``kink_tol``).
            The adaptive report uses gradients.

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
    tols = (tuple(min(active_tol * c, max(active_tol, 1.0)) for c in _ADAPTIVE) if adaptive_tols is None
            else tuple(float(t) for t in adaptive_tols))
    if not tols or not all(t >= 0 and np.isfinite(t) for t in tols):
        raise ValueError(f"`adaptive_tols` must be a non-empty sequence of finite numbers >= 0; got {adaptive_tols!r}.")
    tols = tuple(sorted(set(tols)))
    model0 = trajectory.model_at(0)
    kt = resolve_clarke(model0, clarke, kink_tol, DEFAULT_MAX_PATTERNS)
    prob, _ = make_margin_problem(model0, data)
    nan = np.full(idx.size, np.nan)
    out = {k: nan.copy() for k in ("smoothed", "normalized", "eps", "delta", "stationarity", "slackness",
                                   "feasibility", "n_support", "adaptive_tol", "eps_adaptive", "delta_adaptive",
                                   "stationarity_adaptive", "slackness_adaptive", "n_support_adaptive", "kkt_gap")}
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
        r = _kkt_from_theta(prob, theta, trajectory.unflatten, active_tol=active_tol, ridge=ridge, kink_tol=kt)
        out["smoothed"][j] = float(smoothed_margin(model, data, loss))
        out["normalized"][j] = r.normalized_margin
        out["eps"][j], out["delta"][j], out["stationarity"][j] = r.eps, r.delta, r.stationarity
        out["slackness"][j], out["feasibility"][j] = r.slackness, r.feasibility
        out["n_support"][j] = r.support.size
        qr, G = (np.asarray(a) for a in _margins_jac(prob, jnp.asarray(r.theta)))
        (out["adaptive_tol"][j], out["eps_adaptive"][j], out["delta_adaptive"][j], out["stationarity_adaptive"][j],
         out["slackness_adaptive"][j], out["n_support_adaptive"][j], out["kkt_gap"][j]) = _adaptive(
            qr, G, r.theta, tols, ridge)
    return MarginPath(ts=np.asarray(trajectory.ts)[idx], index=idx, log_loss=log_losses, valid=valid, **out)
