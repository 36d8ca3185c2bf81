"""Which certified KKT point of the constrained NCF each escape direction aligns with (docs/math.md section 3).

Hidden neurons can be permuted without changing the network, so two flows that escape along the "same" KKT point
usually do so with different neurons in front. Directions are therefore compared in a canonical form: in every hidden
layer the neurons are sorted by the norm of their zero-preserving group (in- and out-weights), largest first
(:func:`canonical_directions`; two-layer nets and MLPs; other architectures are compared as they are). The canonical
escape directions are clustered greedily by cosine, each cluster's mean direction is polished once into a certified
KKT point (:func:`homflow.kkt.polish_ncf_theta`), points that polish to the same place are merged, and every member is
then matched to the certified point of largest cosine (arXiv 2403.08121: the direction at the escape approaches a
non-negative KKT point of ``max N(u)`` s.t. ``||u|| = 1``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..kkt import polish_ncf_theta, zero_preserving_groups
from ..models import MLP, AbstractHomogeneousModel, TwoLayer, flatten

__all__ = ["Canonicaliser", "cluster_directions", "CertifiedPoints", "certify_and_match"]


class Canonicaliser:
    """Permutations that sort each hidden layer's neurons by group norm (largest first), applied to flat vectors.

    ``TwoLayer``: neuron ``j`` is ``(a_j, W[j])``; ``MLP``: neuron ``j`` of hidden layer ``k`` is row ``j`` of ``W_k``
    and column ``j`` of ``W_{k+1}`` (a layer's permutation moves the next matrix's columns, which leaves the next
    layer's group norms unchanged, so the layers can be sorted one after the other). Other architectures: identity.
    """

    def __init__(self, model: AbstractHomogeneousModel):
        self.groups = zero_preserving_groups(model)
        self.P = int(flatten(model)[0].size)
        layers: list[list[int]] = []  # group ids of each hidden layer
        if isinstance(model, TwoLayer):
            layers = [list(range(len(self.groups)))]
        elif isinstance(model, MLP):
            start = 0
            for w in model.widths:
                layers.append(list(range(start, start + w)))
                start += w
        self.layer_ids = [np.asarray(ls) for ls in layers if len(ls) > 1]
        self.layers = [np.stack([self.groups[g] for g in ls]) for ls in self.layer_ids]

    def original_groups(self, theta, canonical_ids) -> np.ndarray:
        """The group ids of ``theta`` (one vector) that land at ``canonical_ids`` in its canonical form."""
        th = np.asarray(theta, dtype=float)
        where = {}
        for ids, idx in zip(self.layer_ids, self.layers):
            order = np.argsort(-np.sqrt(np.sum(th[idx] ** 2, axis=-1)), kind="stable")
            where.update({int(ids[j]): int(ids[order[j]]) for j in range(ids.size)})
        return np.asarray([where.get(int(g), int(g)) for g in canonical_ids], dtype=int)

    def __call__(self, thetas) -> np.ndarray:
        """Canonical forms of the rows of ``thetas`` (N, P) (or one vector)."""
        th = np.atleast_2d(np.asarray(thetas, dtype=float)).copy()
        rows = np.arange(th.shape[0])[:, None, None]
        for idx in self.layers:  # idx (m, s): the flat positions of each neuron's group in this layer
            norms = np.sqrt(np.sum(th[:, idx] ** 2, axis=-1))  # (N, m)
            order = np.argsort(-norms, axis=1, kind="stable")
            src = idx[order]  # (N, m, s): neuron order[j]'s positions, to be written at neuron j's
            new = th.copy()
            new[rows, idx[None]] = th[rows, src]
            th = new
        return th if np.ndim(thetas) == 2 else th[0]


def _unit_rows(U):
    U = np.atleast_2d(np.asarray(U, dtype=float))
    n = np.linalg.norm(U, axis=1, keepdims=True)
    return U / np.where(n > 0, n, 1.0)


def cluster_directions(U, *, cos_tol: float = 0.99) -> np.ndarray:
    """Greedy leader clustering of unit directions (rows of ``U``): the first unassigned row leads a new cluster that
    takes every unassigned row within cosine ``cos_tol`` of it. Returns labels (N,), clusters numbered by size
    (largest first).

    >>> cluster_directions(np.array([[1.0, 0.0], [0.0, 1.0], [0.999, 0.04]])).tolist()
    [0, 1, 0]
    """
    if not (-1.0 <= cos_tol <= 1.0):
        raise ValueError(f"`cos_tol` must be in [-1, 1]; got {cos_tol!r}.")
    U = _unit_rows(U)
    labels = np.full(U.shape[0], -1)
    k = 0
    for i in range(U.shape[0]):
        if labels[i] >= 0 or not np.all(np.isfinite(U[i])):
            continue
        free = labels < 0
        close = free & (U @ U[i] >= cos_tol)
        close[i] = True
        labels[close] = k
        k += 1
    sizes = np.bincount(labels[labels >= 0], minlength=k)
    rank = np.empty(k, dtype=int)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(k)
    return np.where(labels >= 0, rank[np.maximum(labels, 0)], -1)


@dataclasses.dataclass(frozen=True)
class CertifiedPoints:
    """Certified KKT points of a census and every member's match.

    Attributes:
        points: the distinct :class:`homflow.kkt.NCFPoint` objects (canonical form), numbered by how many members match.
        canonical: their canonical unit vectors (K, P).
        match: per member, the index of the point of largest cosine (-1 for a member without a direction).
        cos: that cosine (canonical forms).
        cluster: per member, its cluster label (the clusters polished; several may give one point).
        merged_cos: points closer than this cosine were merged.
    """

    points: tuple
    canonical: np.ndarray
    match: np.ndarray
    cos: np.ndarray
    cluster: np.ndarray
    merged_cos: float

    def shares(self) -> np.ndarray:
        """Fraction of members matched to each point."""
        ok = self.match >= 0
        return np.bincount(self.match[ok], minlength=len(self.points)) / max(int(ok.sum()), 1)


def certify_and_match(ncf, model: AbstractHomogeneousModel, directions, *, cluster_cos: float = 0.99,
                      merge_cos: float = 1.0 - 1e-8, rtol: float | None = None, max_clusters: int = 64,
                      second_order: bool = True) -> CertifiedPoints:
    """Cluster the escape ``directions`` (N, P), certify one KKT point per cluster and match every member.

    Arguments:
        ncf: the NCF (:func:`homflow.kkt.make_ncf`) of ``model``'s architecture.
        directions: one row per member (any scale; NaN rows are members without a direction: matched -1).
        cluster_cos: cosine within which canonical directions share a cluster.
        merge_cos: polished points closer than this cosine (canonical forms) are one point.
        rtol: certification tolerance of the polish (default :func:`homflow.kkt.default_residual_rtol`).
        max_clusters: polish at most this many clusters (the largest); members of the others are matched to the
            points found.
        second_order: classify each point by its Riemannian Hessian.

    Returns:
        :class:`CertifiedPoints`.
    """
    import jax.numpy as jnp

    can = Canonicaliser(model)
    D = np.asarray(directions, dtype=float)
    valid = np.all(np.isfinite(D), axis=1) & (np.linalg.norm(np.nan_to_num(D), axis=1) > 0)
    C = np.full(D.shape, np.nan)
    if valid.any():
        C[valid] = _unit_rows(can(D[valid]))
    labels = np.full(D.shape[0], -1)
    labels[valid] = cluster_directions(C[valid], cos_tol=cluster_cos)
    points, canon = [], []
    for k in range(min(int(labels.max(initial=-1)) + 1, max_clusters)):
        mean = C[labels == k].mean(axis=0)
        pt = polish_ncf_theta(ncf, jnp.asarray(mean / np.linalg.norm(mean)), groups=can.groups, rtol=rtol,
                              second_order=second_order)
        c = _unit_rows(can(pt.theta))[0]
        if canon and np.max(np.asarray(canon) @ c) >= merge_cos:
            j = int(np.argmax(np.asarray(canon) @ c))
            points[j] = points[j].replace(count=points[j].count + int(np.sum(labels == k)))
            continue
        points.append(pt.replace(count=int(np.sum(labels == k))))
        canon.append(c)
    K = np.asarray(canon) if canon else np.zeros((0, D.shape[1]))
    match = np.full(D.shape[0], -1)
    cos = np.full(D.shape[0], np.nan)
    if len(points) and valid.any():
        S = C[valid] @ K.T
        match[valid] = np.argmax(S, axis=1)
        cos[valid] = np.max(S, axis=1)
    # number the points by how many members they hold
    counts = np.bincount(match[match >= 0], minlength=len(points))
    order = np.argsort(-counts, kind="stable")
    rank = np.empty(len(points), dtype=int)
    rank[order] = np.arange(len(points))
    match = np.where(match >= 0, rank[np.maximum(match, 0)], -1)
    pts = tuple(points[j].replace(count=int(counts[j])) for j in order)
    return CertifiedPoints(pts, K[order] if len(points) else K, match, cos, labels, merge_cos)

