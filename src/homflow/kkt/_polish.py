"""Polish an approximate direction into a certified KKT point of the constrained NCF (docs/math.md section 3).

The ascent (or a flow) approaches sparse KKT points only slowly: the vanishing neurons fade like a power of time. The
polish therefore (1) proposes vanishing sets from gaps in the norms of the zero-preserving groups (neurons, channels),
(2) sets those groups exactly to zero and runs a Riemannian Newton method on the sphere restricted to the rest:
``du = -pinv(P_m (Hess N - lam I) P_m) P_m grad N`` with ``P_m = diag(mask) - u u^T`` (the pseudo-inverse handles the
flat directions of the network's continuous symmetries), ``u <- (u + alpha du) / ||u + alpha du||`` with a short
backtracking on the residual, and (3) keeps the candidate that is certified (full residual below tolerance) and closest
to the starting direction. The residual reported is recomputed on all parameters, independently of the mask.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..models import AbstractHomogeneousModel, flatten
from ._ascent import sphere_ascent
from ..flow import Problem
from ._ncf import NCF, make_ncf
from ._second_order import SecondOrder, classify, riemannian_hessian_eigenvalues
from ._structure import group_norms, singular_values, zero_preserving_groups

__all__ = ["NCFPoint", "polish_ncf", "polish_ncf_theta", "default_residual_rtol"]

_ALPHAS = (1.0, 0.5, 0.25, 0.125, 1.0 / 16, 1.0 / 64)


def default_residual_rtol(dtype=None) -> float:
    """Default relative residual of a certified NCF KKT point: ``1000 eps`` of the dtype (2.2e-13 in float64)."""
    return 1000.0 * float(jnp.finfo(dtype or jnp.result_type(float)).eps)


@dataclasses.dataclass(frozen=True)
class NCFPoint:
    """A KKT point of ``max N(u)`` s.t. ``||u|| = 1`` with its certificate.

    Attributes:
        model: the network at the unit-norm point ``u``.
        theta: ``u`` as a flat vector (numpy).
        value: ``N(u)``; lam: ``<u, grad N(u)>`` (``= L N(u)``); sign: ``'positive'``, ``'zero'`` or ``'negative'``.
        residual: ``||grad N(u) - lam u||`` on all parameters; relative_residual: divided by ``||grad N(u)||``.
        certified: ``relative_residual <= rtol`` (the tolerance used is ``rtol``).
        vanishing: indices (into :func:`zero_preserving_groups`) of the groups set exactly to zero.
        second_order: :class:`SecondOrder` from the Riemannian Hessian (``None`` if not computed).
        singular_values: per weight matrix (see :func:`singular_values`).
        count: how many starts reached this point (1 for a single polish).
        distance: ``||u - u_start||`` from the (normalised) starting direction.
        newton_steps: Newton iterations of the kept candidate.
    """

    model: AbstractHomogeneousModel
    theta: np.ndarray
    value: float
    lam: float
    residual: float
    relative_residual: float
    certified: bool
    rtol: float
    vanishing: tuple[int, ...]
    second_order: SecondOrder | None
    singular_values: tuple[np.ndarray, ...]
    count: int = 1
    distance: float = 0.0
    newton_steps: int = 0

    @property
    def sign(self) -> str:
        tol = 100 * float(np.finfo(np.asarray(self.theta).dtype).eps) * max(1.0, abs(self.lam))
        return "positive" if self.value > tol else ("negative" if self.value < -tol else "zero")

    def replace(self, **kw) -> "NCFPoint":
        return dataclasses.replace(self, **kw)


@eqx.filter_jit
def _newton(ncf: NCF, u0, mask, tol, max_iter, rcond):
    """Riemannian Newton on the sphere restricted to ``mask``; returns ``(u, restricted residual, iterations)``."""
    P = u0.shape[0]
    eye = jnp.eye(P, dtype=u0.dtype)
    alphas = jnp.asarray(_ALPHAS, dtype=u0.dtype)

    def restricted(u):
        g = ncf.grad(u)
        return jnp.linalg.norm(mask * (g - jnp.dot(u, g) * u))

    def normalise(v):
        return v / jnp.linalg.norm(v)

    def step(u):
        g = ncf.grad(u)
        lam = jnp.dot(u, g)
        Pm = jnp.diag(mask) - jnp.outer(u, u)
        A = Pm @ (ncf.hessian(u) - lam * eye) @ Pm
        e, V = jnp.linalg.eigh(0.5 * (A + A.T))
        cut = rcond * jnp.max(jnp.abs(e))
        inv = jnp.where(jnp.abs(e) > cut, 1.0 / jnp.where(jnp.abs(e) > cut, e, 1.0), 0.0)
        du = -mask * (V @ (inv * (V.T @ (Pm @ g))))  # exact zeros off the mask
        cands = jax.vmap(lambda a: normalise(u + a * du))(alphas)
        rs = jax.vmap(restricted)(cands)
        k = jnp.argmin(rs)
        return cands[k], rs[k]

    def cond(state):
        _, r, it, stalled = state
        return (it < max_iter) & (r > tol) & (~stalled)

    def body(state):
        u, r, it, _ = state
        un, rn = step(u)
        better = rn < r
        return jnp.where(better, un, u), jnp.where(better, rn, r), it + 1, ~better

    u0 = normalise(mask * u0)
    state = (u0, restricted(u0), jnp.asarray(0), jnp.asarray(False))
    u, r, it, _ = jax.lax.while_loop(cond, body, state)
    return u, r, it


@eqx.filter_jit
def _tangent_eigs(ncf: NCF, u):
    lam = jnp.dot(u, ncf.grad(u))
    return riemannian_hessian_eigenvalues(ncf.hessian(u), u, lam)


def _candidate_masks(theta, groups, *, gap, vanish_max, max_candidates):
    """Vanishing sets from gaps in the sorted relative group norms; always includes the empty set first."""
    P = theta.shape[0]
    masks = [(np.ones(P), ())]
    if not groups:
        return masks
    norms = group_norms(theta, groups)
    top = norms.max()
    if not top > 0:
        return masks
    rel = norms / top
    order = np.argsort(rel)
    r = rel[order]
    tiny = np.finfo(np.float64).tiny
    scored = []
    for k in range(1, len(r)):  # k groups vanish; at least one group survives
        if r[k - 1] <= vanish_max:
            ratio = r[k] / max(r[k - 1], tiny)
            if ratio >= gap:
                scored.append((ratio, k))
    scored.sort(reverse=True)
    for _, k in scored[:max_candidates]:
        vanish = tuple(sorted(int(i) for i in order[:k]))
        m = np.ones(P)
        for i in vanish:
            m[groups[i]] = 0.0
        masks.append((m, vanish))
    return masks


def polish_ncf_theta(
    ncf: NCF,
    theta,
    *,
    groups=(),
    unflatten=None,
    rtol: float | None = None,
    max_iter: int = 40,
    rcond: float = 1e-9,
    gap: float = 4.0,
    vanish_max: float = 0.5,
    max_candidates: int = 4,
    second_order: bool = True,
    refine_rounds: int = 3,
    refine_steps: int = 300,
) -> NCFPoint:
    """Flat-vector form of :func:`polish_ncf`: ``ncf`` a :class:`homflow.flow.Problem` or its :class:`NCF` view
    (:func:`make_ncf`), ``theta`` a non-zero parameter vector,
    ``groups`` from :func:`zero_preserving_groups`, ``unflatten`` to build ``.model`` (default ``ncf.unflatten``)."""
    ncf = NCF(ncf) if isinstance(ncf, Problem) else ncf
    theta = jnp.asarray(theta)
    nrm = float(jnp.linalg.norm(theta))
    if not (nrm > 0 and math.isfinite(nrm)):
        raise ValueError(f"`theta` must be a finite non-zero parameter vector; got norm {nrm!r}.")
    rtol = default_residual_rtol(theta.dtype) if rtol is None else float(rtol)
    if not rtol > 0:
        raise ValueError(f"`rtol` must be > 0; got {rtol!r}.")
    u0 = theta / nrm
    g0 = ncf.grad(u0)
    scale = max(float(jnp.linalg.norm(g0)), float(jnp.finfo(theta.dtype).tiny))
    tol_newton = 0.1 * rtol * scale
    def better(cand, best):
        if best is None or (cand["ok"] and not best["ok"]):
            return True
        if cand["ok"] != best["ok"]:
            return False
        if not cand["ok"]:
            return cand["rel"] < best["rel"]
        return cand["dist"] < best["dist"] - 1e-9 or (
            abs(cand["dist"] - best["dist"]) <= 1e-9 and len(cand["vanish"]) > len(best["vanish"])
        )

    best, start = None, u0
    for round_ in range(1 + int(refine_rounds)):
        if round_ > 0:  # Newton stalled (e.g. a ReLU pattern change): climb further, then retry
            start = sphere_ascent(ncf, start[None], int(refine_steps))[0][0]
        for mask, vanish in _candidate_masks(np.asarray(start), list(groups), gap=gap, vanish_max=vanish_max,
                                             max_candidates=max_candidates):
            u, _, it = _newton(ncf, start, jnp.asarray(mask, dtype=u0.dtype), jnp.asarray(tol_newton, dtype=u0.dtype),
                               int(max_iter), float(rcond))
            res, lam, val = ncf.residual(u)
            gn = float(jnp.linalg.norm(ncf.grad(u)))
            rel = float(res) / max(gn, scale * float(jnp.finfo(theta.dtype).eps))
            cand = dict(u=u, res=float(res), rel=rel, lam=float(lam), val=float(val), vanish=vanish, it=int(it),
                        dist=float(jnp.linalg.norm(u - u0)), ok=bool(rel <= rtol and math.isfinite(rel)))
            if better(cand, best):
                best = cand
        if best["ok"]:
            break
        start = best["u"]
    u = best["u"]
    so = classify(np.asarray(_tangent_eigs(ncf, u))) if second_order else None
    unflatten = unflatten or ncf.unflatten
    model = unflatten(u)
    return NCFPoint(
        model=model,
        theta=np.asarray(u),
        value=best["val"],
        lam=best["lam"],
        residual=best["res"],
        relative_residual=best["rel"],
        certified=best["ok"],
        rtol=rtol,
        vanishing=best["vanish"],
        second_order=so,
        singular_values=singular_values(model),
        count=1,
        distance=best["dist"],
        newton_steps=best["it"],
    )


def polish_ncf(
    model: AbstractHomogeneousModel,
    data,
    *,
    loss,
    rtol: float | None = None,
    max_iter: int = 40,
    rcond: float = 1e-9,
    gap: float = 4.0,
    vanish_max: float = 0.5,
    max_candidates: int = 4,
    second_order: bool = True,
    refine_rounds: int = 3,
    refine_steps: int = 300,
) -> NCFPoint:
    """Polish one approximate direction (for instance where a flow or an ascent arrived) into a certified KKT point of
    ``max N(u)`` s.t. ``||u|| = 1`` (docs/math.md section 3; arXiv 2403.08121).

    Arguments:
        model: the starting network (any non-zero scale; only its direction matters).
        data, loss: the NCF's data and the loss that fixes ``ytilde``.
        rtol: certified when ``||grad N(u) - lam u|| <= rtol ||grad N(u)||``; default :func:`default_residual_rtol`.
        max_iter: Newton iterations per candidate; rcond: relative eigenvalue cut of the pseudo-inverse.
        gap, vanish_max, max_candidates: a vanishing set is the ``k`` smallest groups (relative norm ``<= vanish_max``)
            when the next group is ``>= gap`` times larger; the ``max_candidates`` largest gaps are tried, plus the
            empty set.
        second_order: also compute the Riemannian Hessian class.
        refine_rounds, refine_steps: if no candidate is certified (Newton stalls, e.g. where a ReLU activation pattern
            changes), climb ``refine_steps`` steps of :func:`sphere_ascent` and retry, at most ``refine_rounds`` times;
            the point then moves uphill (``distance`` says how far).

    Returns:
        An :class:`NCFPoint`; ``certified`` says whether the tolerance was met (if not, the best candidate is returned).

    Raises:
        ValueError: if every parameter is zero or the data do not fit the model / loss.
    """
    obj, theta = make_ncf(model, data, loss)
    return polish_ncf_theta(
        obj, theta, groups=zero_preserving_groups(model), unflatten=flatten(model)[1], rtol=rtol, max_iter=max_iter,
        rcond=rcond, gap=gap, vanish_max=vanish_max, max_candidates=max_candidates, second_order=second_order,
        refine_rounds=refine_rounds, refine_steps=refine_steps,
    )
