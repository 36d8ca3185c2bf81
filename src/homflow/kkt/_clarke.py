"""Clarke subgradients of ReLU-type networks at kinks, for KKT certificates (docs/math.md section 6; arXiv 1906.05890).

For a network whose activation is ReLU or leaky ReLU (degree ``p = 1``, negative slope ``alpha``), ``Phi(.; x)`` is
piecewise polynomial in ``theta``. Write the forward pass with one slope per hidden unit,
``h_k = s_k * (W_k h_{k-1})`` (``s_kj = 1`` where the pre-activation ``z_kj > 0``, ``alpha`` where ``z_kj < 0``), and
call the pre-activation of unit ``j`` of layer ``k`` on sample ``i`` a *kink* when
``|z_ikj| <= kink_tol * ||W_k[j]|| * ||h_{k-1}(x_i)||`` (a cosine, so the test is scale free). Backpropagation with any
slopes ``s in [alpha, 1]`` at the kinks (the others fixed by the sign) gives the set ``D_i(theta)``; its convex hull
contains the Clarke subdifferential of ``Phi(.; x_i)`` (equal in the generic case, docs/math.md §6), so a certificate
over ``conv D_i`` is a KKT certificate in the sense of 1906.05890 (which uses Clarke subgradients). With ``kink_tol > 0``
it certifies ``theta`` up to moving those pre-activations by at most ``kink_tol`` (relative) to zero.

The gated output ``Phi_s(theta; x) = W_K (s_{K-1} * (W_{K-1} ... (s_1 * (W_1 x))))`` with the slopes held fixed is
multilinear in the slopes of different layers and affine in the slopes of one layer, so ``conv D_i`` is the convex hull
of the gradients at the *extreme* slope patterns (every kink of the sample at ``alpha`` or ``1``). The certificate
(:func:`clarke_columns` then NNLS) enumerates those ``2^m_i`` patterns as NNLS columns; the multiplier of a sample is
the sum of its columns' weights. This is exact at any depth. For a two-layer net it is the NNLS form of the box QP in
``mu_ij = lambda_i s_ij``, ``alpha lambda_i <= mu_ij <= lambda_i`` (the cone over a box is the cone over its
vertices). A sample with more than ``log2(max_patterns)`` kinks is given an *inner approximation*: the all-``alpha``
and all-``1`` patterns and every pattern one flip away from them (``2 m + 2`` columns); it may fail to certify a KKT
point but never certifies a point that is not one (every column is a valid element of ``D_i``). Which was used is
reported (``exact``).

Supported networks: :class:`~homflow.models.TwoLayer` and :class:`~homflow.models.MLP` with a degree-1 activation
whose slope ``alpha != 1``. Others (smooth activations ``p >= 2``, linear and diagonal networks, CNNs) are certified with
the gradient, as before; :func:`clarke_supported` says which applies.
"""

from __future__ import annotations

import dataclasses
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..models import MLP, AbstractHomogeneousModel, TwoLayer

__all__ = [
    "DEFAULT_KINK_TOL",
    "DEFAULT_MAX_PATTERNS",
    "clarke_supported",
    "layer_weights",
    "gated_output",
    "KinkStructure",
    "kink_structure",
    "clarke_columns",
]

DEFAULT_KINK_TOL = 1e-6
"""Default relative kink tolerance: ``|z| <= 1e-6 ||w|| ||h||`` (a cosine; ~``1e10 eps`` in float64, far above the
rounding of a point polished onto its kinks, ~``1e-15``, and far below the pre-activations of units off their kinks)."""

DEFAULT_MAX_PATTERNS = 4096
"""Default cap on the extreme slope patterns enumerated per sample (12 kinks); beyond it the inner approximation."""


def clarke_supported(model: AbstractHomogeneousModel) -> bool:
    """Whether ``model`` has kinks that the Clarke certificate handles: a :class:`TwoLayer` or an :class:`MLP` with
    at least one hidden layer whose activation has degree 1 and negative slope ``alpha != 1`` (ReLU, leaky ReLU)."""
    act = getattr(model, "activation", None)
    if act is None or act.degree != 1 or float(act.alpha) == 1.0:
        return False
    if isinstance(model, TwoLayer):
        return True
    return isinstance(model, MLP) and len(model.weights) >= 2


def layer_weights(model) -> tuple:
    """``(W_1, ..., W_K)`` of a supported network, the last of shape ``(1, h_{K-1})`` (``TwoLayer``: ``(W, a[None])``)."""
    if isinstance(model, TwoLayer):
        return (model.W, model.a[None, :])
    return tuple(model.weights)


def gated_output(model, x, slopes):
    """``Phi_s(theta; x) = W_K (s_{K-1} * (... (s_1 * (W_1 x))))`` with the slopes ``s_k`` held fixed (module docstring).

    With ``s_kj = sigma'(z_kj)`` off the kinks its gradient is a limiting gradient of ``Phi(.; x)`` (an element of
    ``D(theta)``), and it equals ``Phi(theta; x)`` where every kink has ``z = 0`` exactly.
    """
    Ws = layer_weights(model)
    h = x
    for W, s in zip(Ws[:-1], slopes):
        h = s * (W @ h)
    return (Ws[-1] @ h)[0]


def _forward_parts(model, x):
    """Pre-activations ``z_k`` and kink scales ``||W_k[j]|| ||h_{k-1}||`` of every hidden layer (real forward pass)."""
    Ws = layer_weights(model)
    act = model.activation
    h, zs, scales = x, [], []
    for W in Ws[:-1]:
        z = W @ h
        zs.append(z)
        scales.append(jnp.linalg.norm(W, axis=1) * jnp.linalg.norm(h))
        h = act(z)
    return tuple(zs), tuple(scales)


_parts = eqx.filter_jit(lambda unflatten, theta, X: jax.vmap(lambda x: _forward_parts(unflatten(theta), x))(X))


@dataclasses.dataclass(frozen=True)
class KinkStructure:
    """Pre-activations and kinks of a supported network on a data set.

    Attributes:
        z: pre-activations per hidden layer, arrays ``(n, h_k)``; cos: ``z / (||W_k[j]|| ||h_{k-1}||)`` (0 where the
            scale is 0).
        kinks: boolean ``(n, h_k)`` per hidden layer: ``|cos| <= kink_tol``.
        base: the slopes off the kinks, ``1`` where ``z > 0`` and ``alpha`` otherwise (also ``alpha`` at the kinks:
            autodiff's convention, see :mod:`homflow.activations`).
        alpha: the negative slope; kink_tol: the tolerance used.
    """

    z: tuple
    cos: tuple
    kinks: tuple
    base: tuple
    alpha: float
    kink_tol: float

    def units(self, i: int) -> list[tuple[int, int]]:
        """The kinked units ``(layer, unit)`` of sample ``i`` (layers counted from 0)."""
        return [(k, int(j)) for k, K in enumerate(self.kinks) for j in np.flatnonzero(K[i])]

    def counts(self) -> np.ndarray:
        """Number of kinked units per sample."""
        return np.sum([K.sum(axis=1) for K in self.kinks], axis=0).astype(np.int64)


def kink_structure(unflatten, theta, X, *, kink_tol: float = DEFAULT_KINK_TOL) -> KinkStructure:
    """The :class:`KinkStructure` of the supported network ``unflatten(theta)`` on inputs ``X`` (module docstring)."""
    model = unflatten(jnp.asarray(theta))
    zs, scales = _parts(unflatten, jnp.asarray(theta), jnp.asarray(X))
    alpha = float(model.activation.alpha)
    z = tuple(np.asarray(a, dtype=np.float64) for a in zs)
    sc = tuple(np.asarray(a, dtype=np.float64) for a in scales)
    cos = tuple(np.divide(a, s, out=np.zeros_like(a), where=s > 0) for a, s in zip(z, sc))
    kinks = tuple(np.abs(c) <= kink_tol for c in cos)
    base = tuple(np.where(a > 0, 1.0, alpha) * ~K + alpha * K for a, K in zip(z, kinks))
    return KinkStructure(z=z, cos=cos, kinks=kinks, base=base, alpha=alpha, kink_tol=float(kink_tol))


def _patterns(m: int, max_patterns: int) -> tuple[np.ndarray, bool]:
    """0/1 rows (1 = slope 1, 0 = slope alpha) over ``m`` kinks: all ``2^m`` if within the cap, else the inner set."""
    if m == 0:
        return np.zeros((1, 0)), True
    if 2**m <= max_patterns:
        return np.asarray(list(itertools.product((0.0, 1.0), repeat=m))), True
    eye = np.eye(m)
    rows = np.vstack([np.zeros((1, m)), np.ones((1, m)), eye, 1.0 - eye])
    return rows, False


@eqx.filter_jit
def _column_grads(unflatten, theta, X, y, idx, slopes):
    def one(i, s):
        return jax.grad(lambda t: y[i] * gated_output(unflatten(t), X[i], s))(theta)

    return jax.vmap(one)(idx, slopes)


def _pad(n: int) -> int:
    return 1 << max(int(n - 1).bit_length(), 0)


def pattern_slopes(samples, ks: KinkStructure, *, max_patterns: int = DEFAULT_MAX_PATTERNS, expand=None):
    """The slopes of every extreme slope pattern of each sample's kinks (module docstring), one row per column.

    Arguments:
        samples: sample indices; ks: the :class:`KinkStructure`; max_patterns: see :func:`clarke_columns`.
        expand: optional boolean per sample; a sample with ``expand[i]`` False gets one column, its base slopes
            (autodiff's convention at its kinks), whatever its kinks.

    Returns:
        ``(owner, patterns, slopes, exact)``: ``owner`` (N,) the sample of each column, ``patterns`` a list of
        ``{(layer, unit): slope}`` at the sample's kinks, ``slopes`` a tuple per hidden layer of ``(N, h_k)`` arrays,
        and ``exact`` (False if some expanded sample got the inner approximation).
    """
    owner, pats, slope_rows, exact = [], [], [[] for _ in ks.base], True
    for i in (int(i) for i in samples):
        U = ks.units(i) if expand is None or expand[i] else []
        rows, ex = _patterns(len(U), max_patterns)
        exact &= ex
        for r in rows:
            pat = {}
            for k in range(len(ks.base)):
                slope_rows[k].append(ks.base[k][i].copy())
            for (k, j), b in zip(U, r):
                s = 1.0 if b else ks.alpha
                slope_rows[k][-1][j] = s
                pat[(k, j)] = s
            owner.append(i)
            pats.append(pat)
    slopes = tuple(np.vstack(rows) if rows else np.zeros((0, b.shape[1])) for rows, b in zip(slope_rows, ks.base))
    return np.asarray(owner, dtype=np.int64), pats, slopes, exact


def padded_columns(owner, slopes, dtype):
    """``owner`` and ``slopes`` padded to a power of two (repeating the last column), as JAX arrays, for a handful of
    compilations per architecture; returns ``(idx, slopes)``."""
    N = int(owner.size)
    Np = _pad(N)
    idx = np.concatenate([owner, np.full(Np - N, owner[-1])]).astype(np.int32)
    sl = tuple(jnp.asarray(np.vstack([s, np.repeat(s[-1:], Np - N, axis=0)]), dtype=dtype) for s in slopes)
    return jnp.asarray(idx), sl


def clarke_columns(unflatten, theta, X, y, samples, ks: KinkStructure, *, max_patterns: int = DEFAULT_MAX_PATTERNS):
    """Columns of the Clarke certificate: for each sample in ``samples``, ``y_i grad Phi_s(theta; x_i)`` at each extreme
    slope pattern ``s`` of its kinks (module docstring).

    Returns:
        ``(G, owner, patterns, exact)``: ``G`` (N, P) the columns as rows, ``owner`` (N,) the sample of each,
        ``patterns`` a list (one per column) of ``{(layer, unit): slope}`` at the sample's kinks, and ``exact`` (False
        if some sample got the inner approximation).
    """
    owner, pats, slopes, exact = pattern_slopes(samples, ks, max_patterns=max_patterns)
    N = int(owner.size)
    if N == 0:
        return np.zeros((0, int(np.asarray(theta).size))), np.zeros(0, dtype=np.int64), [], True
    idx, sl = padded_columns(owner, slopes, jnp.asarray(theta).dtype)
    G = _column_grads(unflatten, jnp.asarray(theta), jnp.asarray(X), jnp.asarray(y), idx, sl)
    return np.asarray(G, dtype=np.float64)[:N], owner, pats, exact


def chosen_slopes(ks: KinkStructure, owner, pats, beta, lam) -> tuple:
    """Slopes per hidden layer ``(n, h_k)`` that the certificate uses: the fixed slope off the kinks and, at a kink of a
    sample with ``lambda_i > 0``, the column-weighted mean ``sum_b beta_b s_b / lambda_i`` (for a two-layer net the
    slope ``s_ij`` of the single subgradient ``h_i = sum_b beta_b g_b / lambda_i``; for deeper nets the mean of a convex
    combination of extreme patterns); NaN at kinks of samples with ``lambda_i = 0``."""
    out = [np.where(K, np.nan, b) for b, K in zip(ks.base, ks.kinks)]
    acc = [np.zeros_like(b) for b in ks.base]
    for o, pat, w in zip(owner, pats, beta):
        for (k, j), s in pat.items():
            acc[k][o, j] += w * s
    for k, K in enumerate(ks.kinks):
        rows, cols = np.nonzero(K)
        for i, j in zip(rows, cols):
            if lam[i] > 0:
                out[k][i, j] = acc[k][i, j] / lam[i]
    return tuple(out)
