"""Structure of a parameter vector: zero-preserving groups (neurons / channels), singular values per weight matrix.

A *zero-preserving group* (docs/math.md §4) is a set of parameters whose gradient (of every network output) vanishes
whenever the whole group is zero: the in- and out-weights of one hidden neuron of an MLP / two-layer net, one channel
of a CNN (its kernel slice and the matching input slices of the next layer), or one coordinate ``u_i`` or ``v_i`` of a
diagonal linear network of depth >= 2. KKT points are often exactly zero on such groups, and the polish sets them to
zero and certifies the point on the rest.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..models import CNN, MLP, DiagonalLinear, TwoLayer, flatten

__all__ = ["zero_preserving_groups", "singular_values", "group_norms"]


def _index_model(model):
    theta, unflatten = flatten(model)
    return unflatten(jnp.arange(theta.size, dtype=theta.dtype))


def _idx(a) -> np.ndarray:
    return np.asarray(a).astype(np.int64).ravel()


def zero_preserving_groups(model) -> list[np.ndarray]:
    """Index arrays (into the flat parameter vector of :func:`homflow.models.flatten`) of the zero-preserving groups.

    ``TwoLayer``: neuron ``j`` is ``(a_j, W[j, :])``. ``MLP``: hidden neuron ``j`` of layer ``k`` is row ``j`` of ``W_k``
    and column ``j`` of ``W_{k+1}``. ``CNN``: output channel ``c`` of conv ``k`` is ``kernels[k][c]`` and
    ``kernels[k+1][:, c]`` (or ``readout[c]``). ``DiagonalLinear`` (depth >= 2): each ``u_i`` and each ``v_i``.
    Other models: no groups (the polish then works on all parameters).
    """
    idx = _index_model(model)
    groups: list[np.ndarray] = []
    if isinstance(model, TwoLayer):
        for j in range(model.width):
            groups.append(np.concatenate([_idx(idx.a[j]), _idx(idx.W[j])]))
    elif isinstance(model, MLP):
        Ws = idx.weights
        for k in range(len(Ws) - 1):
            for j in range(Ws[k].shape[0]):
                groups.append(np.concatenate([_idx(Ws[k][j]), _idx(Ws[k + 1][:, j])]))
    elif isinstance(model, CNN):
        Ks = idx.kernels
        for k in range(len(Ks)):
            nxt = Ks[k + 1] if k + 1 < len(Ks) else None
            for c in range(Ks[k].shape[0]):
                out = _idx(nxt[:, c]) if nxt is not None else _idx(idx.readout[c])
                groups.append(np.concatenate([_idx(Ks[k][c]), out]))
    elif isinstance(model, DiagonalLinear) and model.depth >= 2:
        groups = [_idx(i) for i in idx.u] + [_idx(i) for i in idx.v]
    return groups


def group_norms(theta, groups) -> np.ndarray:
    """Euclidean norm of ``theta`` on each group."""
    th = np.asarray(theta)
    return np.array([np.linalg.norm(th[g]) for g in groups])


def singular_values(model) -> tuple[np.ndarray, ...]:
    """Singular values of every weight array with two or more axes, reshaped to ``(shape[0], -1)``, in field order
    (``TwoLayer``: ``W``; ``MLP``: ``W_1 .. W_K``; ``CNN``: each kernel, then the read-out). Rank-one structure
    (arXiv 2403.08121) shows as one non-zero singular value per matrix."""
    import equinox as eqx
    import jax

    leaves = [leaf for leaf in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)) if leaf.ndim >= 2]
    return tuple(np.linalg.svd(np.asarray(w).reshape(w.shape[0], -1), compute_uv=False) for w in leaves)
