"""Sparsity kept through the escape (arXiv 2502.15952, docs/math.md section 4): zero-preserving groups (the in- and
out-weights of a neuron) that are zero at the KKT direction stay exactly zero along the limiting path and small along
the real flow; the saddle reached is then a critical point of the smaller network with those neurons removed."""

from __future__ import annotations

import numpy as np

from ..kkt import group_norms, zero_preserving_groups
from ..models import MLP, AbstractHomogeneousModel, TwoLayer, flatten

__all__ = ["small_groups", "group_norm_track", "remove_neurons", "neuron_of_group"]


def small_groups(model_or_theta, groups=None, *, rtol: float = 1e-3) -> np.ndarray:
    """Indices of the zero-preserving groups whose norm is at most ``rtol * ||theta||`` (``rtol = 0``: exactly zero).

    Arguments:
        model_or_theta: a network, or a flat vector together with ``groups``.
        groups: :func:`homflow.kkt.zero_preserving_groups` of the architecture (computed from a model if omitted).
    """
    if isinstance(model_or_theta, AbstractHomogeneousModel):
        groups = zero_preserving_groups(model_or_theta) if groups is None else groups
        theta = np.asarray(flatten(model_or_theta)[0])
    else:
        theta = np.asarray(model_or_theta)
        if groups is None:
            raise ValueError("`groups` is required when a flat vector is given.")
    if not (rtol >= 0):
        raise ValueError(f"`rtol` must be >= 0; got {rtol!r}.")
    gn = group_norms(theta, groups)
    return np.flatnonzero(gn <= rtol * np.linalg.norm(theta))


def group_norm_track(thetas, groups, which) -> np.ndarray:
    """Norms (T, k) of the groups ``which`` along saved states ``thetas`` (T, P)."""
    thetas = np.atleast_2d(np.asarray(thetas))
    return np.stack([np.linalg.norm(thetas[:, groups[g]], axis=1) for g in which], axis=1) if len(which) else \
        np.zeros((thetas.shape[0], 0))


def neuron_of_group(model: AbstractHomogeneousModel, g: int) -> tuple[int, int]:
    """``(layer, neuron)`` of group ``g`` in the order of :func:`homflow.kkt.zero_preserving_groups` (two-layer: layer 0;
    MLP: hidden layer ``k`` counted from 0)."""
    if isinstance(model, TwoLayer):
        return 0, int(g)
    if isinstance(model, MLP):
        for k, h in enumerate(model.widths):
            if g < h:
                return k, int(g)
            g -= h
    raise ValueError(f"`model` must be a TwoLayer or an MLP with group {g!r}; got {type(model).__name__}.")


def remove_neurons(model: AbstractHomogeneousModel, which) -> AbstractHomogeneousModel:
    """The smaller network with the hidden neurons of groups ``which`` removed (two-layer nets and MLPs).

    Removing a neuron whose group is zero does not change the outputs, and the gradient of the smaller network is the
    restriction of the larger one's, so a critical point of the larger network that is zero on the removed groups is a
    critical point of the smaller one.

    Raises:
        ValueError: for other architectures, or if every neuron of a layer would be removed.
    """
    which = sorted({int(g) for g in which})
    if isinstance(model, TwoLayer):
        keep = np.setdiff1d(np.arange(model.width), which)
        if keep.size == 0:
            raise ValueError("cannot remove every hidden neuron.")
        return TwoLayer.from_weights(model.a[keep], model.W[keep], model.activation)
    if isinstance(model, MLP):
        drop = [[] for _ in model.widths]
        for g in which:
            k, j = neuron_of_group(model, g)
            drop[k].append(j)
        Ws = list(model.weights)
        for k, js in enumerate(drop):
            keep = np.setdiff1d(np.arange(Ws[k].shape[0]), js)
            if keep.size == 0:
                raise ValueError(f"cannot remove every neuron of hidden layer {k}.")
            Ws[k] = Ws[k][keep]
            Ws[k + 1] = Ws[k + 1][:, keep]
        return MLP.from_weights(tuple(Ws), model.activation)
    raise ValueError(f"`model` must be a TwoLayer or an MLP; got {type(model).__name__}.")
