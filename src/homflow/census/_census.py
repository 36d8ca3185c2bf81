"""A census of gradient flows from many small random initialisations: where they escape, which KKT point of the NCF
they align with, which saddle they reach and which sparsity they keep, where they end (docs/math.md sections 3-4;
arXiv 2403.08121, 2502.15952).

Members are ``theta_i(0) = delta * u_k`` for unit directions ``u_k`` (random Gaussian or given) and each ``delta`` of a
grid. All members are integrated through the batched stiff-aware engine with refill (:mod:`._driver`); then, per
member:

- **escape**: the first time ``||theta|| = factor * delta`` (or an absolute ``level``), located by the engine's event
  root finding; the direction there;
- **KKT point**: escape directions are clustered (in a neuron-permutation-canonical form), each cluster is polished once
  into a certified KKT point of ``max N(u)`` s.t. ``||u|| = 1``, and each member is matched to the closest point by
  cosine (:mod:`._cluster`);
- **first saddle**: the first plateau of the saved loss curve after the escape (:func:`homflow.phases.segment_plateaus`:
  ``|dL/d log t| <= slope_tol L`` over ``min_points`` saved points; a cheap stand-in for
  :func:`homflow.phases.first_saddle`, which polishes the saddle and measures its Hessian), its loss and the neurons
  active there (group norm above ``sqrt(delta * largest)``, the geometric middle between the ``O(delta)`` neurons
  that stayed behind and the ``O(1)`` ones that escaped);
- **sparsity kept**: the largest norm, up to the saddle, of the neurons that are exactly zero at the member's KKT point,
  in units of ``delta`` (2502.15952: they stay ``O(delta)`` until the saddle);
- **end**: loss, norm and normalised margin ``min_i y_i Phi(x_i) / ||theta||^L`` (labels +-1) at the member's end.
"""

from __future__ import annotations

import dataclasses
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..flow import make_objective
from ..flow._clarke import is_kinked
from ..kkt import make_ncf
from ..models import AbstractHomogeneousModel
from ..phases import segment_plateaus
from ._cluster import Canonicaliser, CertifiedPoints, certify_and_match
from ._driver import DriverOptions, DriverResult, run_members
from ._law import CensusLaw, fit_escape_law
from ._shard import run_members_sharded
from ._table import CensusTable

__all__ = ["CensusOptions", "Census", "census", "random_directions"]


@dataclasses.dataclass(frozen=True)
class CensusOptions:
    """What a census measures, and its tolerances.

    Attributes:
        n_directions: random unit directions (ignored when ``directions`` are given to :func:`census`).
        deltas: initial norms; every direction runs at every delta.
        escape_factor: the escape is at ``||theta|| = escape_factor * delta`` (``None``: use ``escape_level``).
        escape_level: an absolute escape level (the ``L = 2`` log law needs one).
        t1: absolute end time of every member; t_after: or, a duration after each member's escape (one of the two).
        t_escape_max: give up waiting for an escape at this time (default ``t1``, else ``1e4 / delta^(L-2)``).
        rtol: engine tolerance (``atol = 0.1 rtol delta``).
        seed: of the random directions.
        n_save: saved points per ``t1`` (or per ``t_after``): the loss curve's resolution.
        cluster_cos: cosine within which canonical escape directions share a cluster (each cluster is certified once).
        align_cos: the stated cosine: every escaped member must be within it of a certified point.
        slope_tol, min_points: plateau detection (:func:`homflow.phases.segment_plateaus`).
        sparse_factor: sparsity kept: the neurons zero at the KKT point stay below ``sparse_factor * delta`` up to the
            saddle (default half the escape factor: they stay well below the escaping neurons). Their size is
            ``O(delta)`` with a constant that grows as a second neuron's NCF blow-up time approaches the first's, so
            with several deltas the sharper statement is the scaling: :func:`within_slope` of ``log`` of their
            largest norm on ``log delta`` is 1 (``sparse_slope_atol``).
        sparse_slope_atol: tolerance of that slope.
        law_rtol: the rescaled escape times ``t delta^(L-2)`` of a direction agree to this (L > 2).
        law_atol: the fitted exponent is within this of ``L - 2`` (L = 2: relative deviation of the log-law slope).
        driver: :class:`DriverOptions` (batch size, refill, chunk length).
    """

    n_directions: int = 64
    deltas: tuple[float, ...] = (1e-3,)
    escape_factor: float | None = 100.0
    escape_level: float | None = None
    t1: float | None = None
    t_after: float | None = 100.0
    t_escape_max: float | None = None
    rtol: float = 1e-8
    seed: int = 0
    n_save: int = 200
    cluster_cos: float = 0.99
    align_cos: float = 0.99
    slope_tol: float = 1e-3
    min_points: int = 3
    sparse_factor: float = 50.0
    sparse_slope_atol: float = 0.25
    law_rtol: float = 0.05
    law_atol: float = 0.1
    driver: DriverOptions = DriverOptions()

    def __post_init__(self):
        if isinstance(self.n_directions, bool) or not isinstance(self.n_directions, int) or self.n_directions < 1:
            raise ValueError(f"`n_directions` must be a positive integer; got {self.n_directions!r}.")
        deltas = tuple(float(d) for d in np.atleast_1d(self.deltas))
        if not deltas or not all(d > 0 and math.isfinite(d) for d in deltas):
            raise ValueError(f"`deltas` must be finite numbers > 0; got {self.deltas!r}.")
        object.__setattr__(self, "deltas", deltas)
        if (self.escape_factor is None) == (self.escape_level is None):
            raise ValueError("give exactly one of `escape_factor` (relative) and `escape_level` (absolute); got "
                             f"{self.escape_factor!r} and {self.escape_level!r}.")
        if self.escape_factor is not None and not (self.escape_factor > 1 and math.isfinite(self.escape_factor)):
            raise ValueError(f"`escape_factor` must be a finite number > 1; got {self.escape_factor!r}.")
        if self.escape_level is not None and not (self.escape_level > max(deltas) and
                                                  math.isfinite(self.escape_level)):
            raise ValueError(f"`escape_level` must be a finite norm above every delta (max {max(deltas):g}); got "
                             f"{self.escape_level!r}.")
        if self.t1 is not None and self.t_after is not None:
            object.__setattr__(self, "t_after", None)  # t1 given: it wins over the default t_after
        if self.t1 is None and self.t_after is None:
            raise ValueError("give `t1` (absolute end time) or `t_after` (duration after the escape).")
        for name in ("t1", "t_after", "t_escape_max", "rtol", "sparse_factor", "sparse_slope_atol", "law_rtol",
                     "law_atol", "slope_tol"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"`{name}` must be a finite number > 0; got {v!r}.")
        for name in ("cluster_cos", "align_cos"):
            v = getattr(self, name)
            if not (-1.0 <= v <= 1.0):
                raise ValueError(f"`{name}` must be a cosine in [-1, 1]; got {v!r}.")
        if isinstance(self.n_save, bool) or not isinstance(self.n_save, int) or self.n_save < 4:
            raise ValueError(f"`n_save` must be an integer >= 4; got {self.n_save!r}.")


@dataclasses.dataclass
class Census:
    """The result of :func:`census`.

    Attributes:
        table: :class:`CensusTable`, one row per member (columns listed in docs/census.md).
        points: :class:`CertifiedPoints` (the certified KKT points and every member's match).
        law: :class:`CensusLaw` (``None`` with a single delta or too few escapes).
        driver: :class:`DriverResult` (curves, costs, utilisation).
        degree: the network's order ``L``; wall_s: wall time of the integration and of the analysis.
    """

    table: CensusTable
    points: CertifiedPoints
    law: CensusLaw | None
    driver: DriverResult
    degree: int
    wall_s: dict

    def summary(self) -> dict:
        t = self.table
        esc = t["escaped"]
        return {
            "members": len(t), "escaped": int(esc.sum()), "kkt_points": len(self.points.points),
            "shares": self.points.shares().tolist(),
            "min_cos": float(np.nanmin(t["cos"][esc])) if esc.any() else float("nan"),
            "max_point_residual": max((p.relative_residual for p in self.points.points), default=float("nan")),
            "saddle_found": int(np.isfinite(t["saddle_loss"]).sum()),
            "grad_evals": int(self.driver.grad_evals.sum()), "slot_evals": int(self.driver.slot_evals),
            "utilisation": self.driver.utilisation, "busy_utilisation": self.driver.busy_utilisation,
            "engine_calls": self.driver.calls,
            "law": dataclasses.asdict(self.law) if self.law is not None else None, "wall_s": self.wall_s,
        }


def random_directions(n: int, P: int, seed: int = 0) -> np.ndarray:
    """``n`` independent uniformly distributed unit vectors in ``R^P`` (normalised Gaussians)."""
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((n, P))
    return U / np.linalg.norm(U, axis=1, keepdims=True)


def census(model: AbstractHomogeneousModel, data, options: CensusOptions = CensusOptions(), *, loss="square",
           directions=None, progress=None, runner=None, n_shards: int | None = None) -> Census:
    """Run a census of gradient flows of ``model``'s architecture on ``data``.

    Arguments:
        model: the architecture (its parameters are not used; only its shape and activation).
        data: a :class:`homflow.data.Dataset`; loss: the loss (``'square'``, ``'logistic'``, ``'exponential'``).
        options: :class:`CensusOptions`.
        directions: (K, P) initial directions (normalised here); default ``options.n_directions`` random ones.
        progress: optional ``progress(fraction, message)``.
        runner, n_shards: distribute the flows as ``n_shards`` shards of members through ``runner`` (e.g.
            ``functools.partial(homflow.shards.run_shards, backend='ray', workers=2)``; see
            :func:`run_members_sharded`); default: in this process.

    Returns:
        A :class:`Census`.

    Raises:
        ValueError: bad options, directions of the wrong shape or zero, data that do not fit the model, or a kinked
            degree-1 network (ReLU, leaky ReLU): the census's batched engine and its NCF analysis need a locally
            Lipschitz gradient (2403.08121), which such a network lacks (its flow is a differential inclusion).
    """
    if is_kinked(model):
        act = getattr(model.activation, "name", model.activation)
        raise ValueError(
            f"`model` has the kinked degree-1 activation {act}: a census needs a locally Lipschitz gradient (an "
            "activation of degree p >= 2, e.g. relu_power(2); 2403.08121), since the flow of a ReLU-type network is a "
            "differential inclusion that the batched engine does not integrate (docs/census.md). Integrate such flows "
            "one by one with homflow.flow.gradient_flow (the non-smooth solver).")
    objective, theta = make_objective(model, data, loss)
    ncf, _ = make_ncf(model, data, loss)
    P = int(theta.size)
    L = int(model.degree)
    U = random_directions(options.n_directions, P, options.seed) if directions is None else np.asarray(directions,
                                                                                                          float)
    if U.ndim != 2 or U.shape[1] != P:
        raise ValueError(f"`directions` must have shape (K, {P}); got {U.shape}.")
    nrm = np.linalg.norm(U, axis=1)
    if not np.all(np.isfinite(nrm) & (nrm > 0)):
        raise ValueError("`directions` must be finite and non-zero.")
    U = U / nrm[:, None]
    K, deltas = U.shape[0], np.asarray(options.deltas)
    dir_id = np.tile(np.arange(K), deltas.size)
    delta = np.repeat(deltas, K)
    thetas0 = delta[:, None] * U[dir_id]
    levels = options.escape_factor * delta if options.escape_factor is not None else np.full(delta.size,
                                                                                             options.escape_level)
    if options.t_escape_max is not None:
        horizons = np.full(delta.size, options.t_escape_max)
    elif options.t1 is not None:
        horizons = np.full(delta.size, options.t1)
    else:
        horizons = 1e4 / delta ** max(L - 2, 0)
    span = options.t1 if options.t1 is not None else options.t_after
    canon = Canonicaliser(model)
    t0 = time.perf_counter()
    kw = dict(levels=levels, horizons=horizons, ends=None if options.t1 is None else np.full(delta.size, options.t1),
              t_after=options.t_after, rtol=options.rtol, groups=canon.groups, save_dt=span / options.n_save,
              options=options.driver)
    if runner is None:
        res = run_members(objective, thetas0, progress=(lambda f, m: progress(0.85 * f, m)) if progress else None,
                          **kw)
    else:
        res = run_members_sharded(model, data, loss, thetas0, n_shards=n_shards or 1, runner=runner, **kw)
    t_flow = time.perf_counter() - t0
    if progress:
        progress(0.86, "clustering and certifying the escape directions")
    escaped = np.isfinite(res.t_escape)
    pts = certify_and_match(ncf, model, np.where(escaped[:, None], res.theta_escape, np.nan),
                            cluster_cos=options.cluster_cos)
    if progress:
        progress(0.95, "saddles, sparsity, the escape law")
    table = _table(objective, options, res, pts, canon, dir_id, delta, L)
    law = None
    if deltas.size >= 2:
        growth = np.array([L * pts.points[m].value if m >= 0 else np.nan for m in pts.match])
        try:
            law = fit_escape_law(dir_id, delta, res.t_escape, L, growth=growth)
        except ValueError:
            law = None
    return Census(table, pts, law, res, L, {"flows": t_flow, "analysis": time.perf_counter() - t0 - t_flow})


def _saddle(ts, loss, t_esc, options):
    """Index of the first plateau after the escape on a saved curve (``None`` if none)."""
    if not np.isfinite(t_esc):
        return None
    order = np.argsort(ts, kind="stable")
    ts, loss = ts[order], loss[order]
    keep = np.concatenate([[True], np.diff(ts) > 0])
    ts, loss, order = ts[keep], loss[keep], order[keep]
    for a, b in segment_plateaus(ts, loss, slope_tol=options.slope_tol, min_points=options.min_points):
        if ts[a] > t_esc:
            return int(order[(a + b) // 2])
    return None


def _table(objective, options, res: DriverResult, pts: CertifiedPoints, canon: Canonicaliser,
           dir_id, delta, L) -> CensusTable:
    N = delta.size
    escaped = np.isfinite(res.t_escape)
    F = np.asarray(_outputs(objective, jnp.asarray(res.theta_end)))  # (N, n)
    y = np.asarray(objective.y)
    norm_end = np.linalg.norm(res.theta_end, axis=1)
    classification = bool(np.all(np.isin(y, (-1.0, 1.0))))
    margin = (np.min(y[None] * F, axis=1) / norm_end ** L) if classification else np.full(N, np.nan)
    loss_end = np.array([c[-1] for c in res.curve_loss])
    s_t, s_loss, s_active, s_pattern, sparse_max = (np.full(N, np.nan), np.full(N, np.nan), np.full(N, -1),
                                                    [""] * N, np.full(N, np.nan))
    vanishing = [np.asarray(p.vanishing, dtype=int) for p in pts.points]
    for i in range(N):
        ts, ls, gs = res.curve_t[i], res.curve_loss[i], res.curve_groups[i]
        j = _saddle(ts, ls, res.t_escape[i], options)
        upto = ts <= (ts[j] if j is not None else res.t_end[i])
        if j is not None:
            s_t[i], s_loss[i] = ts[j], ls[j]
            g = gs[j]
            act = np.flatnonzero(g > math.sqrt(delta[i] * g.max())) if g.size else np.zeros(0, int)
            s_active[i] = act.size
            s_pattern[i] = "-".join(str(int(a)) for a in act)
        m = pts.match[i]
        if m >= 0 and vanishing[m].size and escaped[i]:
            own = canon.original_groups(res.theta_escape[i], vanishing[m])
            sparse_max[i] = float(np.max(gs[upto][:, own])) / delta[i]
        elif m >= 0:
            sparse_max[i] = 0.0
    point = [pts.points[m] if m >= 0 else None for m in pts.match]
    cols = {
        "member": np.arange(N), "direction": dir_id, "delta": delta, "degree": np.full(N, L),
        "escaped": escaped, "t_escape": res.t_escape,
        "t_escape_rescaled": res.t_escape * delta ** max(L - 2, 0),
        "kkt_point": pts.match, "cos": pts.cos, "cluster": pts.cluster,
        "kkt_value": np.array([p.value if p else np.nan for p in point]),
        "kkt_lambda": np.array([p.lam if p else np.nan for p in point]),
        "kkt_residual": np.array([p.relative_residual if p else np.nan for p in point]),
        "kkt_certified": np.array([bool(p.certified) if p else False for p in point]),
        "kkt_vanishing": np.array([len(p.vanishing) if p else -1 for p in point]),
        "kkt_class": np.array([(p.second_order.kind if p and p.second_order is not None else "") for p in point],
                              dtype=object),
        "saddle_t": s_t, "saddle_loss": s_loss, "saddle_active": s_active,
        "saddle_pattern": np.array(s_pattern, dtype=object), "sparse_max_over_delta": sparse_max,
        "t_end": res.t_end, "loss_end": loss_end, "norm_end": norm_end, "margin_end": margin,
        "grad_evals": res.grad_evals, "steps": res.steps,
        "outcome": np.array(res.outcome, dtype=object), "reason": np.array(res.reason, dtype=object),
    }
    return CensusTable(cols)


@eqx.filter_jit
def _outputs(objective, thetas):
    return jax.vmap(objective.outputs)(thetas)
