"""Find many KKT points of the constrained NCF at once: vmapped ascent on the sphere, clustering, polish, dedupe.

docs/math.md section 3 (arXiv 2403.08121). Points are deduplicated *up to the network's symmetries* by comparing the
functions they compute, not their parameters: two unit-norm parameter vectors related by a neuron permutation, a sign
symmetry of an odd / even activation, or (for ``p = 1``) a split of one neuron into parallel copies compute the same
outputs on every input. The signature of a point is its outputs on the data and on ``n_probe`` random inputs.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..models import AbstractHomogeneousModel, flatten
from ._ascent import sphere_ascent
from ._ncf import NCF, make_ncf
from ._polish import NCFPoint, polish_ncf_theta
from ._structure import zero_preserving_groups

__all__ = ["NCFSolution", "solve_ncf"]


@dataclasses.dataclass(frozen=True)
class NCFSolution:
    """Distinct certified KKT points of ``max N(u)`` s.t. ``||u|| = 1``, best value first (a sequence of
    :class:`NCFPoint`; each has ``.count``, the number of starts that reached it).

    Attributes:
        points: the certified distinct points; uncertified: polished clusters that missed the tolerance (kept apart).
        n_starts: number of starts; ascent_steps: ascent iterations; n_clusters: clusters polished.
        seconds: wall time of the ascent and of the polish.
    """

    points: tuple[NCFPoint, ...]
    uncertified: tuple[NCFPoint, ...]
    n_starts: int
    ascent_steps: int
    n_clusters: int
    seconds: dict

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self):
        return iter(self.points)

    def __getitem__(self, i) -> NCFPoint:
        return self.points[i]

    @property
    def best(self) -> NCFPoint:
        """The point with the largest ``N(u)``."""
        return self.points[0]


def _signatures(ncf: NCF, U, Xp):
    return jax.vmap(lambda u: jnp.concatenate([ncf.outputs(u), ncf.outputs(u, Xp)]))(U)


def _cluster(S, order, tol):
    """Greedy clustering of signature rows (in ``order``): a row joins the first cluster whose representative is
    within ``tol`` in max-norm. Returns the representative index and member list of each cluster."""
    reps, members = [], []
    for i in order:
        for c, r in enumerate(reps):
            if np.max(np.abs(S[i] - S[r])) <= tol:
                members[c].append(i)
                break
        else:
            reps.append(i)
            members.append([i])
    return reps, members


def solve_ncf(
    model: AbstractHomogeneousModel,
    data,
    *,
    loss,
    n_starts: int = 64,
    key,
    steps: int = 1000,
    inits=None,
    cluster_tol: float = 1e-3,
    dedupe_tol: float = 1e-7,
    n_probe: int = 16,
    **polish_kwargs,
) -> NCFSolution:
    """Find distinct KKT points of the constrained NCF ``max N(u)`` s.t. ``||u|| = 1`` from many starts.

    Arguments:
        model: fixes the architecture (its parameters are not used unless ``inits`` is None and ``n_starts`` = 0).
        data, loss: the NCF's data and the loss that fixes ``ytilde`` (docs/math.md section 3).
        n_starts: number of random starts (i.i.d. Gaussian parameter vectors, normalised); key: a PRNG key.
        steps: iterations of :func:`sphere_ascent` (vmapped over the starts).
        inits: optional starting directions (B, P) used instead of random ones (any non-zero scale).
        cluster_tol: ascent end points whose signatures differ by at most ``cluster_tol * max|signature|`` are
            polished once (a cluster).
        dedupe_tol: polished points within ``dedupe_tol * max|signature|`` are the same point up to symmetry.
        n_probe: random probe inputs added to the data in the signature.
        polish_kwargs: passed to :func:`polish_ncf_theta` (``rtol``, ``max_iter``, ``gap``, ...).

    Returns:
        An :class:`NCFSolution` (a sequence of :class:`NCFPoint`, best first), each point certified by its residual,
        with ``count``, ``second_order`` and ``singular_values``.

    Raises:
        ValueError: for ``n_starts < 1`` without ``inits``, ``inits`` of the wrong shape or with a zero row.
    """
    obj, theta = make_ncf(model, data, loss)
    P = theta.size
    if inits is not None:
        U0 = jnp.asarray(inits, dtype=theta.dtype)
        if U0.ndim != 2 or U0.shape[1] != P:
            raise ValueError(f"`inits` must have shape (B, {P}) (one parameter vector per row); got {U0.shape}.")
        if not bool(jnp.all(jnp.linalg.norm(U0, axis=1) > 0)):
            raise ValueError("`inits` holds a zero row; every start needs a direction.")
    else:
        if isinstance(n_starts, bool) or int(n_starts) < 1:
            raise ValueError(f"`n_starts` must be an integer >= 1; got {n_starts!r}.")
        key, sub = jax.random.split(key)
        U0 = jax.random.normal(sub, (int(n_starts), P), theta.dtype)
    if isinstance(steps, bool) or int(steps) < 0:
        raise ValueError(f"`steps` must be an integer >= 0; got {steps!r}.")
    t0 = time.perf_counter()
    U, vals, res = sphere_ascent(obj, U0, int(steps))
    U = jax.block_until_ready(U)
    t1 = time.perf_counter()

    xs = float(jnp.sqrt(jnp.mean(jnp.sum(obj.X**2, axis=1))))
    Xp = xs / np.sqrt(obj.X.shape[1]) * jax.random.normal(jax.random.PRNGKey(12345), (int(n_probe), obj.X.shape[1]),
                                                         theta.dtype)
    S = np.asarray(_signatures(obj, U, Xp))
    scale = max(float(np.max(np.abs(S))), np.finfo(S.dtype).tiny)
    order = np.argsort(-np.asarray(vals))
    reps, members = _cluster(S, order, cluster_tol * scale)
    resn = np.asarray(res)

    groups = zero_preserving_groups(model)
    unflatten = flatten(model)[1]
    polished, counts = [], []
    for mem in members:
        best = mem[int(np.argmin(resn[mem]))]
        pt = polish_ncf_theta(obj, U[best], groups=groups, unflatten=unflatten, **polish_kwargs)
        polished.append(pt)
        counts.append(len(mem))
    t2 = time.perf_counter()

    ok = [i for i, p in enumerate(polished) if p.certified]
    bad = [polished[i].replace(count=counts[i]) for i, p in enumerate(polished) if not p.certified]
    points: list[NCFPoint] = []
    if ok:
        Sp = np.asarray(_signatures(obj, jnp.stack([jnp.asarray(polished[i].theta) for i in ok]), Xp))
        sc = max(float(np.max(np.abs(Sp))), np.finfo(Sp.dtype).tiny)
        order_p = np.argsort([-polished[i].value for i in ok])
        _, mem_p = _cluster(Sp, order_p, dedupe_tol * sc)
        for mem in mem_p:
            idx = [ok[j] for j in mem]
            rep = min(idx, key=lambda i: polished[i].residual)
            points.append(polished[rep].replace(count=int(sum(counts[i] for i in idx))))
    points.sort(key=lambda p: -p.value)
    return NCFSolution(
        points=tuple(points),
        uncertified=tuple(bad),
        n_starts=int(U0.shape[0]),
        ascent_steps=int(steps),
        n_clusters=len(members),
        seconds={"ascent": t1 - t0, "polish": t2 - t1},
    )
