"""KKT points of the max-margin problem ``min 1/2 ||theta||^2`` s.t. ``y_i Phi(theta; x_i) >= 1`` (docs/math.md §5).

KKT (arXiv 1906.05890, App. C): feasible, and ``lambda >= 0`` with ``theta = sum_i lambda_i y_i grad Phi(theta; x_i)``
and ``lambda_i (q_i - 1) = 0``. A direction with ``q_min > 0`` is rescaled to ``theta = theta_hat / q_min^(1/L)``;
it is ``(eps, delta)``-KKT when ``||theta - sum lambda_i grad q_i|| <= eps`` and ``sum lambda_i (q_i - 1) <= delta``.

Multipliers: non-negative least squares on the stationarity equation over the *near-active* constraints only
(``q_i <= 1 + active_tol``), so that slack constraints cannot absorb the stationarity error. To make them well defined
when the gradients ``grad q_i`` of the near-active set are linearly dependent (then the NNLS minimisers form a
polytope), homflow returns the unique minimiser of ``||theta - G_A^T lambda||^2 + mu ||lambda||^2`` over
``lambda >= 0`` with ``mu = ridge * ||G_A G_A^T||_2`` (default ``ridge = 1e-13``): the minimum-norm NNLS multiplier up
to ``O(ridge)``. It depends on the data only through the Gram matrix ``G_A G_A^T`` and ``G_A theta``, so an isometry
that preserves outputs and maps gradients (neuron splitting, 2505.12419) gives the same multipliers.

ReLU-type networks (docs/math.md §6): where a pre-activation sits at a kink the gradient is not defined and the KKT
conditions use Clarke subgradients, ``theta = sum_i lambda_i h_i`` with ``h_i`` in the Clarke subdifferential of
``q_i``. For supported networks (:func:`homflow.kkt.clarke_supported`) the certificate allows every slope in
``[alpha, 1]`` at each pre-activation within ``kink_tol`` of zero, jointly with the multipliers: the NNLS columns are the
gradients at every extreme slope pattern of a sample's kinks and ``lambda_i`` is the sum of its columns' weights
(exact at any depth; see :mod:`homflow.kkt._clarke`). The ridge then acts on the column weights. Where no unit of a
near-active sample is at a kink this is the gradient certificate above, to the last bit.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float
from scipy.optimize import nnls

from ..flow import Problem, make_problem
from ..models import AbstractHomogeneousModel, flatten
from ._clarke import DEFAULT_KINK_TOL, DEFAULT_MAX_PATTERNS, chosen_slopes, clarke_columns, clarke_supported, kink_structure

__all__ = ["MarginProblem", "make_margin_problem", "MarginKKT", "max_margin_kkt", "margin_multipliers", "REASONS"]


class MarginProblem(Problem):
    """The flow core's :class:`homflow.flow.Problem` with the exponential loss (only its margins matter here), plus the
    names the max-margin code used before the one problem object (``jacobian``, ``weighted_hessian``)."""

    def jacobian(self, theta):
        """``G`` (n, P) with rows ``grad q_i(theta)`` (:meth:`Problem.margin_jacobian`)."""
        return self.margin_jacobian(theta)

    def weighted_hessian(self, theta, lam):
        """``sum_i lam_i Hess q_i(theta)`` (P x P; :meth:`Problem.weighted_margin_hessian`)."""
        return self.weighted_margin_hessian(theta, lam)


def make_margin_problem(model: AbstractHomogeneousModel, data) -> tuple[MarginProblem, Float[Array, " P"]]:
    """The :class:`MarginProblem` of ``model``'s architecture on ``data`` (labels must be +-1), and ``model``'s vector.

    Built by :func:`homflow.flow.make_problem` with the exponential loss (which checks the labels).

    Raises:
        ValueError: if the data's dimension does not match or a label is not -1 or +1.
    """
    prob, theta = make_problem(model, data, "exponential")
    return MarginProblem(prob.X, prob.y, prob.loss, prob.unflatten, prob.degree), theta


_margins_jac = eqx.filter_jit(lambda prob, theta: (prob.margins(theta), prob.jacobian(theta)))


def margin_multipliers(G, theta, *, ridge: float = 1e-13) -> np.ndarray:
    """Multipliers ``lambda >= 0`` minimising ``||theta - G^T lambda||^2 + mu ||lambda||^2``, ``mu = ridge ||G G^T||``.

    Solved by ``scipy.optimize.nnls`` on the square-root form of the Gram matrix ``K = G G^T = V diag(s) V^T``:
    ``min || [diag(sqrt s) V^T; sqrt(mu) I] lambda - [diag(1/sqrt s) V^T G theta; 0] ||`` (rows with ``s`` below
    ``1e-15 max s`` are dropped). ``G`` (m, P) holds the near-active rows ``grad q_i``.
    """
    G = np.asarray(G, dtype=np.float64)
    theta = np.asarray(theta, dtype=np.float64)
    m = G.shape[0]
    if m == 0:
        return np.zeros(0)
    K = G @ G.T
    b = G @ theta
    s, V = np.linalg.eigh(0.5 * (K + K.T))
    smax = max(float(s.max()), 0.0)
    if smax <= 0.0:
        return np.zeros(m)
    keep = s > 1e-15 * smax
    R = np.sqrt(s[keep])[:, None] * V[:, keep].T
    c = (V[:, keep].T @ b) / np.sqrt(s[keep])
    mu = ridge * smax
    A = np.vstack([R, math.sqrt(mu) * np.eye(m)]) if mu > 0 else R
    rhs = np.concatenate([c, np.zeros(m)]) if mu > 0 else c
    lam, _ = nnls(A, rhs, maxiter=50 * max(m, 10))
    return lam


# Result codes of a certificate (``MarginKKT.reason``).
CERTIFIED = "certified"
NOT_STATIONARY = "not_stationary"
INFEASIBLE = "infeasible"
NOT_SLACK = "slackness"
TOO_FAR = "too_far"
MARGIN_COLLAPSED = "margin_collapsed"
REASONS = (CERTIFIED, NOT_STATIONARY, INFEASIBLE, NOT_SLACK, TOO_FAR, MARGIN_COLLAPSED)

DEFAULT_TOL = 1e-8
"""Default relative stationarity (and relative slackness) of a certified max-margin KKT point (float64)."""
RIDGE_SLACK = 0.01
"""Largest accuracy (in units of ``tol * ||theta||``) the ridge may cost a Clarke certificate (see ``_kkt_from_theta``)."""
DEFAULT_FEAS_TOL = 1e-9
"""Default feasibility tolerance ``max_i (1 - q_i)`` of a certified point (after the rescale it is rounding only)."""


@dataclasses.dataclass(frozen=True)
class MarginKKT:
    """How far a network is from a KKT point of the max-margin problem (arXiv 1906.05890).

    Attributes:
        model: the rescaled point ``theta = theta_hat / q_min^(1/L)`` (so ``q_min = 1``).
        theta: its flat vector (numpy).
        multipliers: ``lambda`` (n,), zero outside the near-active set (see the module docstring for uniqueness).
        margins: ``q_i`` at ``theta``.
        eps: ``||theta - sum_i lambda_i h_i||`` with ``h_i`` the (Clarke) subgradients chosen; stationarity:
            ``eps / ||theta||``.
        feasibility: ``max(0, max_i (1 - q_i))`` (0 up to rounding after the rescale).
        delta: ``sum_i lambda_i (q_i - 1)``; slackness: ``delta / sum_i lambda_i`` (0 when all lambda vanish).
        normalized_margin: ``q_min(theta_hat) / ||theta_hat||^L = ||theta||^-L``.
        active: indices with ``q_i <= 1 + active_tol``; support: indices with ``lambda_i > 0``.
        rank: rank of the near-active Jacobian (Clarke: of the certificate's columns).
        converged, message, iterations: set by :func:`solve_max_margin` (``None``, ``''``, 0 otherwise).
        distance: set by :func:`solve_max_margin`: ``||theta/||theta|| - theta_0/||theta_0||||``, how far the polished
            direction lies from the start's direction (NaN otherwise).
        start_normalized_margin: set by :func:`solve_max_margin`: the start's normalized margin (NaN otherwise).
        clarke: whether the Clarke certificate was used (``False``: gradients, autodiff's slope at kinks).
        kinks: per hidden layer, boolean ``(n, h_k)``: pre-activations within ``kink_tol`` of zero (``None`` if not
            ``clarke``); n_kinks: their total number.
        slopes: per hidden layer ``(n, h_k)``: the slope the certificate uses at every unit (1 or ``alpha`` off the
            kinks, the chosen one in ``[alpha, 1]`` at kinks of samples with ``lambda_i > 0``, NaN at the other kinks);
            ``None`` if not ``clarke``.
        kink_tol: the kink tolerance; exact: whether every slope pattern was enumerated (False: the inner
            approximation of :mod:`homflow.kkt._clarke` for a sample with too many kinks); n_columns: NNLS columns.
        smooth_stationarity: the relative stationarity with one subgradient (autodiff's, ``sigma'(0) = alpha``) and
            the same near-active set: the score without Clarke subgradients, for comparison.
        certified: stationarity ``<= tol``, feasibility ``<= feas_tol`` and ``|slackness| <= slack_tol`` (and, from
            :func:`solve_max_margin`, the distance and margin guards); tol, feas_tol, slack_tol: those tolerances.
        reason: one of ``REASONS``: ``'certified'`` or the first failed condition (``'not_stationary'``,
            ``'infeasible'``, ``'slackness'``; :func:`solve_max_margin` adds ``'too_far'``, ``'margin_collapsed'``).
    """

    model: AbstractHomogeneousModel
    theta: np.ndarray
    multipliers: np.ndarray
    margins: np.ndarray
    eps: float
    stationarity: float
    feasibility: float
    delta: float
    slackness: float
    normalized_margin: float
    active: np.ndarray
    support: np.ndarray
    rank: int
    active_tol: float
    converged: bool | None = None
    message: str = ""
    iterations: int = 0
    distance: float = math.nan
    start_normalized_margin: float = math.nan
    clarke: bool = False
    kinks: tuple | None = None
    slopes: tuple | None = None
    kink_tol: float = math.nan
    exact: bool = True
    n_columns: int = 0
    smooth_stationarity: float = math.nan
    certified: bool = False
    tol: float = DEFAULT_TOL
    feas_tol: float = DEFAULT_FEAS_TOL
    slack_tol: float = DEFAULT_TOL
    reason: str = NOT_STATIONARY

    @property
    def n_kinks(self) -> int:
        return 0 if self.kinks is None else int(sum(int(np.sum(K)) for K in self.kinks))

    def kinked_units(self, i: int) -> list[tuple[int, int]]:
        """The kinked units ``(layer, unit)`` of sample ``i`` (layers from 0; empty if not ``clarke``)."""
        if self.kinks is None:
            return []
        return [(k, int(j)) for k, K in enumerate(self.kinks) for j in np.flatnonzero(K[i])]

    def replace(self, **kw) -> "MarginKKT":
        return dataclasses.replace(self, **kw)


def _verdict(stationarity, feasibility, slackness, tol, feas_tol, slack_tol) -> str:
    if not stationarity <= tol:
        return NOT_STATIONARY
    if not feasibility <= feas_tol:
        return INFEASIBLE
    if not abs(slackness) <= slack_tol:
        return NOT_SLACK
    return CERTIFIED


def _kkt_from_theta(prob: MarginProblem, theta, unflatten, *, active_tol, ridge, rescale=True, kink_tol=None,
                    max_patterns=DEFAULT_MAX_PATTERNS, tol=DEFAULT_TOL, feas_tol=DEFAULT_FEAS_TOL,
                    slack_tol=None, ridge_slack=RIDGE_SLACK) -> MarginKKT:
    """The certificate at ``theta`` (rescaled to ``q_min = 1`` if ``rescale``); Clarke columns if ``kink_tol`` is set.

    Clarke columns (``2^m`` per sample) are highly dependent, and a ridge on their weights can cost accuracy
    (measured: relative stationarity 1.4e-8 with ``ridge = 1e-13``, 7e-12 without, on the same polished point). So the
    ridged weights are kept only if their residual is within ``ridge_slack * tol * ||theta||`` of the ridge-free NNLS
    residual; otherwise the ridge-free ones (the residual is then the exact minimum over ``conv D``).
    """
    theta = jnp.asarray(theta)
    q, _ = _margins_jac(prob, theta)
    qmin = float(jnp.min(q))
    if not qmin > 0:
        raise ValueError(
            f"the minimum margin q_min = min_i y_i Phi(theta; x_i) must be > 0 for the max-margin problem; got {qmin:.3g}. "
            "Train further (the late phase starts once every sample is classified correctly)."
        )
    L = prob.degree
    if rescale:
        theta = theta / qmin ** (1.0 / L)
    q, G = _margins_jac(prob, theta)
    q, G, th = np.asarray(q), np.asarray(G), np.asarray(theta)
    active = np.flatnonzero(q <= 1.0 + active_tol)
    nrm = float(np.linalg.norm(th))
    lam = np.zeros(q.size)
    lam[active] = margin_multipliers(G[active], th, ridge=ridge)
    smooth_eps = float(np.linalg.norm(th - G.T @ lam))
    extra = {}
    rank_rows = G[active]
    if kink_tol is not None:
        ks = kink_structure(unflatten, th, prob.X, kink_tol=kink_tol)
        counts = ks.counts()
        kinked = [int(i) for i in active if counts[i] > 0]
        if kinked:
            Gc, owner, pats, exact = clarke_columns(unflatten, th, prob.X, prob.y, active, ks,
                                                    max_patterns=max_patterns)
            beta = margin_multipliers(Gc, th, ridge=ridge)
            if ridge > 0:  # the vertex columns are highly dependent: keep the ridge only where it costs no accuracy
                free = margin_multipliers(Gc, th, ridge=0.0)
                e_r, e_f = np.linalg.norm(th - Gc.T @ beta), np.linalg.norm(th - Gc.T @ free)
                if e_r > e_f + ridge_slack * tol * nrm:
                    beta = free
            lam = np.zeros(q.size)
            np.add.at(lam, owner, beta)
            r = th - Gc.T @ beta
            slopes = chosen_slopes(ks, owner, pats, beta, lam)
            rank_rows = Gc
            extra = dict(exact=bool(exact), n_columns=int(Gc.shape[0]))
        else:
            r = th - G.T @ lam
            slopes = tuple(np.where(K, np.nan, b) for b, K in zip(ks.base, ks.kinks))
            extra = dict(exact=True, n_columns=int(active.size))
        extra.update(clarke=True, kinks=ks.kinks, slopes=slopes, kink_tol=float(kink_tol))
    else:
        r = th - G.T @ lam
        extra = dict(n_columns=int(active.size))
    eps = float(np.linalg.norm(r))
    delta = float(lam @ (q - 1.0))
    slack = delta / float(lam.sum()) if lam.sum() > 0 else 0.0
    rank = int(np.linalg.matrix_rank(rank_rows)) if rank_rows.shape[0] else 0
    feas = float(max(0.0, np.max(1.0 - q)))
    slack_tol = tol if slack_tol is None else slack_tol
    reason = _verdict(eps / nrm, feas, slack, tol, feas_tol, slack_tol)
    return MarginKKT(
        model=unflatten(jnp.asarray(th)),
        theta=th,
        multipliers=lam,
        margins=q,
        eps=eps,
        stationarity=eps / nrm,
        feasibility=feas,
        delta=delta,
        slackness=slack,
        normalized_margin=float(np.min(q)) / nrm**L,
        active=active,
        support=np.flatnonzero(lam > 0),
        rank=rank,
        active_tol=float(active_tol),
        smooth_stationarity=smooth_eps / nrm,
        certified=reason == CERTIFIED,
        tol=float(tol),
        feas_tol=float(feas_tol),
        slack_tol=float(slack_tol),
        reason=reason,
        **extra,
    )


def _check_tol(name, value, *, positive=True):
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"`{name}` must be a finite number {'>' if positive else '>='} 0; got {value!r}.")
    return float(value)


def resolve_clarke(model, clarke, kink_tol, max_patterns):
    """The kink tolerance to use (``None``: gradient certificate) for ``clarke`` in ``(None, True, False)``."""
    if clarke not in (None, True, False):
        raise ValueError(f"`clarke` must be None (automatic), True or False; got {clarke!r}.")
    if isinstance(max_patterns, bool) or not isinstance(max_patterns, (int, np.integer)) or max_patterns < 2:
        raise ValueError(f"`max_patterns` must be an integer >= 2; got {max_patterns!r}.")
    kink_tol = _check_tol("kink_tol", kink_tol, positive=False)
    supported = clarke_supported(model)
    if clarke and not supported:
        raise ValueError(
            f"`clarke=True` needs a TwoLayer or MLP network with a ReLU / leaky-ReLU activation (degree 1, alpha != 1); "
            f"got {type(model).__name__} with activation {getattr(model, 'activation', None)!r}. Use clarke=None."
        )
    return kink_tol if (supported and clarke is not False) else None


def max_margin_kkt(model: AbstractHomogeneousModel, data, *, active_tol: float = 1e-2, ridge: float = 1e-13,
                   clarke: bool | None = None, kink_tol: float = DEFAULT_KINK_TOL,
                   max_patterns: int = DEFAULT_MAX_PATTERNS, tol: float = DEFAULT_TOL,
                   feas_tol: float = DEFAULT_FEAS_TOL, slack_tol: float | None = None) -> MarginKKT:
    """Rescale ``model`` to ``q_min = 1`` and measure its distance to a KKT point of the max-margin problem.

    Arguments:
        model: any network with positive minimum margin on ``data`` (only its direction matters).
        data: a ``Dataset`` with labels +-1.
        active_tol: constraints with ``q_i <= 1 + active_tol`` carry multipliers (near-active set; docs/math.md §5).
        ridge: relative ridge that makes the multipliers unique (module docstring).
        clarke: ``None`` (default): Clarke subgradients for ReLU / leaky-ReLU ``TwoLayer`` and ``MLP`` networks,
            gradients otherwise; ``True``: require them (error for other networks); ``False``: gradients only
            (autodiff's slope ``alpha`` at kinks, the certificate before Clarke support).
        kink_tol: a pre-activation is at a kink when ``|z| <= kink_tol ||w|| ||h||`` (default ``DEFAULT_KINK_TOL``,
            1e-6); there any slope in ``[alpha, 1]`` is allowed, jointly with the multipliers (docs/math.md section 6).
        max_patterns: most extreme slope patterns enumerated per sample (default 4096, i.e. 12 kinks); beyond, an
            inner approximation (``exact=False``) that can only under-certify.
        tol, feas_tol, slack_tol: ``certified`` needs relative stationarity ``<= tol`` (default 1e-8), feasibility
            ``<= feas_tol`` (1e-9) and ``|slackness| <= slack_tol`` (default ``tol``).

    Returns:
        A :class:`MarginKKT` with ``multipliers``, ``stationarity`` (relative), ``eps``, ``delta``, ``feasibility``,
        ``slackness``, ``normalized_margin``, ``support``, the kinks and slopes, ``smooth_stationarity`` (the
        one-subgradient score) and ``certified`` / ``reason``. Formulas: docs/math.md sections 5 and 6, arXiv 1906.05890
        App. C.

    Raises:
        ValueError: if the minimum margin is not positive, labels are not +-1, or an argument is out of range.

    >>> import jax.numpy as jnp
    >>> from homflow.models import MLP
    >>> from homflow.data import Dataset
    >>> r = max_margin_kkt(MLP.from_weights((jnp.array([[2.0, 2.0]]),), None), Dataset(jnp.eye(2), jnp.ones(2)))
    >>> r.theta.tolist(), r.multipliers.round(9).tolist(), r.stationarity < 1e-12, round(r.normalized_margin, 4)
    ([1.0, 1.0], [1.0, 1.0], True, 0.7071)
    >>> r.certified, r.reason, r.clarke
    (True, 'certified', False)
    """
    if not (active_tol >= 0 and math.isfinite(active_tol)):
        raise ValueError(f"`active_tol` must be a finite number >= 0; got {active_tol!r}.")
    tol, feas_tol = _check_tol("tol", tol), _check_tol("feas_tol", feas_tol, positive=False)
    slack_tol = tol if slack_tol is None else _check_tol("slack_tol", slack_tol, positive=False)
    kt = resolve_clarke(model, clarke, kink_tol, max_patterns)
    prob, theta = make_margin_problem(model, data)
    return _kkt_from_theta(prob, theta, flatten(model)[1], active_tol=active_tol, ridge=ridge, kink_tol=kt,
                           max_patterns=int(max_patterns), tol=tol, feas_tol=feas_tol, slack_tol=slack_tol)
