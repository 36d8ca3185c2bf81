"""Clarke calculus of degree-1 (ReLU / leaky-ReLU) networks: kink sets, one-sided slopes, and the minimal-norm element
of the Clarke subdifferential of the loss (docs/math.md section 6).

A bias-free network with activation ``sigma(z) = max(z, alpha z)`` is piecewise polynomial in its weights. Write
``z_e(theta)`` for the pre-activation of unit ``e = (layer, unit, sample)``; the flat list of all of them (layer by
layer, sample-major) is what :meth:`KinkedProblem.preactivations` returns. Backpropagation with slope ``s_e`` in
``[alpha, 1]`` at every unit with ``z_e = 0`` (and the one-sided slope ``1`` or ``alpha`` elsewhere) gives the set
``D(theta)`` whose convex hull contains the Clarke subdifferential of the loss (Davis, Drusvyatskiy, Kakade & Lee,
arXiv 1804.07795; Bolte & Pauwels, arXiv 1909.10300). Since ``sigma(0) = 0`` for every slope, the forward values do not
depend on ``s``; the gradient ``g(s)`` is affine in the slopes of any one layer, and multilinear across layers.

* Two-layer nets (and any point where no sample has kinked units in two different layers): ``g(s) = g_0 + J s`` with
  the column of ``s_e`` equal to ``c_e grad_theta z_e`` (``c_e = a_j l'_i`` for ``e = (j, i)``). The minimal-norm
  element is exactly ``min ||g_0 + J s||`` over the box ``[alpha, 1]^K``: a bounded-variable least squares (BVLS).
  At an interior optimum its stationarity reads ``c_e <grad z_e, g> = 0``: the minimal-norm velocity is tangent to
  the kink surface ``z_e = 0`` (a sliding mode); at a bound the unit leaves the kink.
* Deeper nets with kinked units of one sample in several layers: ``g`` is multilinear in ``s``; homflow minimises
  ``||g(s)||`` over the box by re-linearising ``n_slope_iters`` times (Gauss-Newton: BVLS of the linearisation at the
  current slopes). This is exact when the kinks of every sample lie in one layer and a documented local approximation
  otherwise (docs/nonsmooth.md).

Autodiff's own convention (``jax.grad`` of ``jnp.where(z > 0, z, alpha z)``) is the left slope ``alpha`` at ``z = 0``
(``0`` for ReLU): one element of ``D(theta)``, generally not the minimal-norm one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..models import CNN, MLP, TwoLayer, safe_norm
from ..models._cnn import _avg_pool

__all__ = ["is_kinked", "KinkedProblem", "make_kinked", "clarke_min_norm", "MinNorm", "DEFAULT_KINK_TOL",
           "default_kink_tol", "default_slope_tol"]


# XLA options of the non-smooth flow's compiled pieces. LLVM optimisation level 1
# (``{"xla_backend_optimization_level": 1}``) compiles these small, loop-heavy programs 2-3x faster with the same run
# time (benchmarks/nonsmooth.py). It was removed after CI workers died with segmentation faults inside XLA compiles;
# the cause turned out to be the per-process memory-map limit (docs/performance.md,
# homflow.shards.release_compiled_programs), not the level, but the default level stays until it is measured again.
COMPILER_OPTIONS: dict = {}


def jit(fun=None, *, static_argnames=()):
    """``jax.jit`` with :data:`COMPILER_OPTIONS` (a decorator; models and problems are pytrees, their static fields
    part of the cache key)."""
    if fun is None:
        return lambda f: jit(f, static_argnames=static_argnames)
    return jax.jit(fun, static_argnames=static_argnames, compiler_options=COMPILER_OPTIONS)


def default_kink_tol(dtype=None) -> float:
    """``1000 eps``: a pre-activation with ``|z_e| <= kink_tol * scale_e`` is at its kink (``scale_e`` bounds ``|z_e|``
    by Cauchy-Schwarz: row norm of the weights times the norm of the layer's input)."""
    return 1e3 * float(jnp.finfo(dtype or jnp.result_type(float)).eps)


def default_slope_tol(dtype=None) -> float:
    """``sqrt(eps)``: a kink slope within this of ``alpha`` or ``1`` is at its bound (the unit leaves the kink)."""
    return math.sqrt(float(jnp.finfo(dtype or jnp.result_type(float)).eps))


DEFAULT_KINK_TOL = 1e3 * 2.220446049250313e-16


def is_kinked(model) -> bool:
    """True for networks whose activation is degree 1 with a kink (ReLU, leaky ReLU with ``alpha != 1``) and that have
    at least one hidden layer: their gradient flow is a differential inclusion (docs/math.md section 6)."""
    act = getattr(model, "activation", None)
    if act is None or int(getattr(act, "p", 0)) != 1 or float(act.alpha) == 1.0:
        return False
    if isinstance(model, MLP):
        return len(model.weights) > 1
    return isinstance(model, (TwoLayer, CNN))


def _conv(h, K):
    nd = h.ndim - 1
    dn = ("NCH", "OIH", "NCH") if nd == 1 else ("NCHW", "OIHW", "NCHW")
    return jax.lax.conv_general_dilated(h[None], K, (1,) * nd, "SAME", dimension_numbers=dn)[0]


def forward(model, x, act):
    """``Phi(theta; x)`` of a two-layer net, MLP or CNN with the activation replaced by ``act(layer, z, scale)``, where
    ``scale`` bounds ``|z|`` entrywise: row norm times the norm of the layer's input bound (the data for the first
    layer; after it the scales of the layer below, since ``|h_j| <= |z_j| <= scale_j`` for slopes in ``[alpha, 1]``).
    Bounding by the input itself would make the scale of a unit whose input vanishes (a deep net's sample with every
    unit below at or under its kink) as small as its rounding noise, and ``z_e / scale_e`` meaningless there.
    ``act = lambda k, z, s: model.activation(z)`` gives the model's own output (tested)."""
    if isinstance(model, TwoLayer):
        z = model.W @ x
        return jnp.dot(model.a, act(0, z, safe_norm(model.W, axis=1) * safe_norm(x)))
    if isinstance(model, MLP):
        h, hb = x, x
        for k, W in enumerate(model.weights[:-1]):
            z = W @ h
            sc = safe_norm(W, axis=1) * safe_norm(hb)
            h, hb = act(k, z, sc), sc
        return (model.weights[-1] @ h)[0]
    if isinstance(model, CNN):
        h = jnp.reshape(x, model.input_shape)
        hb = h
        for k, K in enumerate(model.kernels):
            z = _conv(h, K)
            rows = safe_norm(K.reshape(K.shape[0], -1), axis=1)
            sc = jnp.broadcast_to(rows.reshape((-1,) + (1,) * (z.ndim - 1)) * safe_norm(hb), z.shape)
            h, hb = act(k, z, sc), sc
            if model.pool is not None and model.pool > 1:
                h, hb = _avg_pool(h, model.pool), _avg_pool(hb, model.pool)
        return jnp.sum(model.readout * h)
    raise ValueError(
        f"the non-smooth flow supports TwoLayer, MLP and CNN networks; got {type(model).__name__}, whose kinks it "
        "cannot enumerate."
    )


def mode_slopes(signs, alpha, idx, valid, s, dtype):
    """The slope vector (N,) of a mode: one-sided from ``signs`` (``1`` where positive, else ``alpha``), ``s`` at the
    valid entries of ``idx``. Padded entries of ``idx`` (``valid`` false) may repeat a valid unit's index (padding is
    0): they are sent out of bounds and dropped, never written, since a scatter with repeated indices keeps an
    unspecified one of the values."""
    base = jnp.where(signs > 0, 1.0, alpha).astype(dtype)
    if idx.shape[0] == 0:
        return base
    return base.at[jnp.where(valid, idx, base.shape[0])].set(jnp.asarray(s).astype(dtype), mode="drop")


class KinkedProblem(eqx.Module):
    """Loss of one kinked architecture on one data set, with slopes at the units as explicit inputs.

    ``signs`` (N,) holds the activation pattern (``+1``: slope 1, else slope ``alpha``); ``idx`` (K,) / ``valid`` (K,)
    name the units whose slopes ``s`` (K,) are free (the sliding set). Build with :func:`make_kinked`.
    """

    X: Any
    y: Any
    loss: Any = eqx.field(static=True)
    unflatten: Any = eqx.field(static=True)
    alpha: float = eqx.field(static=True)
    shapes: tuple = eqx.field(static=True)  # per layer: (n, *unit shape)
    n_hidden: int = eqx.field(static=True)

    @property
    def n_entries(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))

    @property
    def classification(self) -> bool:
        return bool(self.loss.classification)

    def _walk(self, theta, S=None):
        """Per-sample pre-activations and their bounds, layer by layer: the network itself (``S = None``), or with
        unit ``e`` acting as ``S_e z_e``."""
        model = self.unflatten(theta)
        parts = self._split(jnp.zeros((self.n_entries,), theta.dtype) if S is None else S)

        def one(x, Sk):
            zs, scs = [], []

            def act(k, z, sc):
                zs.append(z)
                scs.append(sc)
                return model.activation(z) if S is None else Sk[k] * z

            forward(model, x, act)
            return zs, scs

        return jax.vmap(one)(self.X, parts)

    def preactivations(self, theta):
        """``(z, scale)``: every pre-activation ``z_e`` (N,) and its Cauchy-Schwarz bound ``scale_e`` (N,)."""
        zs, scs = self._walk(theta)
        return jnp.concatenate([z.reshape(-1) for z in zs]), jnp.concatenate([s.reshape(-1) for s in scs])

    def preactivations_at(self, theta, S):
        """Every pre-activation (N,) with the units acting as ``S_e z_e``: on the pattern of ``theta`` the true values;
        its derivative along a velocity is the one-sided derivative of the mode with slopes ``S`` (autodiff of the
        network itself would use its own convention at a kink, ``sigma'(0)``, and so miss a deeper unit whose input
        comes alive when a kinked unit below it turns on)."""
        zs, _ = self._walk(theta, S)
        return jnp.concatenate([z.reshape(-1) for z in zs])

    def _split(self, S):
        parts, o = [], 0
        for shp in self.shapes:
            m = math.prod(shp)
            parts.append(S[o:o + m].reshape(shp))
            o += m
        return parts

    def objective(self, theta, S, eps=None):
        """The loss with slope ``S_e`` at every unit: ``log L`` for classification losses, ``L`` for the square loss.

        Units act as ``S_e z_e (+ eps_e)``: on the pattern of ``theta`` (``S_e`` the one-sided slope of ``z_e``) this is
        the true loss, elsewhere its polynomial continuation from that pattern (the field of one smooth piece); the
        derivative in ``eps`` is ``dF/dh_e``, the adjoint of the unit's output."""
        model = self.unflatten(theta)
        parts = self._split(S)
        eps_parts = self._split(jnp.zeros_like(S) if eps is None else eps)
        out = jax.vmap(lambda x, Sk, Ek: forward(model, x, lambda k, z, sc: Sk[k] * z + Ek[k]))(self.X, parts,
                                                                                                 eps_parts)
        return self.loss.log_value(out, self.y) if self.classification else self.loss.value(out, self.y)

    def log_loss(self, theta):
        """``log L(theta)`` of the network itself."""
        out = jax.vmap(self.unflatten(theta))(self.X)
        return self.loss.log_value(out, self.y)

    def velocity(self, theta, log_scale, signs, idx, valid, fac=None, slopes=True):
        """``(dtheta/du, dE/du, s)`` of the mode, with ``du = dt / exp(log_scale)`` (``log_scale = u`` in log time,
        where ``dtheta/du = (1 + t) dtheta/dt``) and ``E = int ||dtheta/dt||^2 dt``; computed from ``grad log L`` for
        classification losses, so that nothing underflows late in a flow. ``fac``, ``slopes``: see
        :meth:`sliding_grad`."""
        F, g, s = self.sliding_grad(theta, signs, idx, valid, fac, slopes)
        gg = jnp.sum(g * g)
        if self.classification:
            return -jnp.exp(log_scale + F) * g, jnp.exp(log_scale + 2.0 * F) * gg, s
        return -jnp.exp(log_scale) * g, jnp.exp(log_scale) * gg, s

    def slopes(self, signs, idx, valid, s):
        """The slope vector of the mode (:func:`mode_slopes`)."""
        return mode_slopes(signs, self.alpha, idx, valid, s, self.X.dtype)

    def grad_and_adjoint(self, theta, S):
        """``(F, grad_theta F, dF/dh)`` with ``F`` = :meth:`objective` and ``dF/dh_e`` the adjoint of every unit (N,)."""
        F, (g, c) = jax.value_and_grad(self.objective, argnums=(0, 2))(theta, S, jnp.zeros_like(S))
        return F, g, c

    def _locate(self, idx):
        """Sample, position inside that sample's flat pre-activation vector, and hidden layer of every flat unit
        index."""
        sizes = [math.prod(shp[1:]) for shp in self.shapes]
        glob = np.cumsum([0] + [self.X.shape[0] * m for m in sizes])
        loc = np.cumsum([0] + sizes)
        k = jnp.searchsorted(jnp.asarray(glob[1:]), idx, side="right")
        r = idx - jnp.asarray(glob)[k]
        m = jnp.asarray(sizes)[k]
        return r // m, jnp.asarray(loc)[k] + r % m, k

    def no_input(self, z, sc, kt):
        """Units (N,) whose input vanishes to rounding (host arrays ``z``, ``scale``; ``kt`` the kink tolerance): in a
        hidden layer after the first, a sample every unit of whose layer below outputs ~0 (at its kink, within
        ``10 kt``; off, for ReLU; or itself without input). Their pre-activation is rounding noise of a function that
        stays zero while the units below stay off, and their normal lies in the span of those units' normals."""
        n = self.X.shape[0]
        out = np.zeros(z.shape[0], bool)
        o, quiet_below = 0, None
        for shp in self.shapes:
            m = math.prod(shp[1:])
            zl, sl = z[o:o + n * m].reshape(n, m), sc[o:o + n * m].reshape(n, m)
            dead = np.zeros((n, m), bool) if quiet_below is None else np.repeat(quiet_below[:, None], m, axis=1)
            out[o:o + n * m] = dead.ravel()
            quiet = dead | (np.abs(zl) <= 10 * kt * sl) | ((self.alpha == 0) & (zl < 0))
            quiet_below = quiet.all(axis=1)
            o += n * m
        return out

    def normals(self, theta, idx, S=None):
        """``grad_theta z_e`` (K, P) for the units ``idx``. ``S`` (N,): the normals of the mode whose units act as
        ``S_e z_e`` (a kinked unit of an earlier layer then has its mode's slope, not autodiff's ``sigma'(0)``);
        default: the network itself. MLPs: from the layer factors (:meth:`_mlp_factors`); other architectures: one
        single-sample backward pass each (:meth:`_normals_autodiff`)."""
        if not isinstance(self.unflatten(theta), MLP):
            return self._normals_autodiff(theta, idx, S)
        return self._mlp_normals(theta, *self._mlp_factors(theta, idx, S))

    def _normals_autodiff(self, theta, idx, S=None):
        """:meth:`normals` by one single-sample backward pass per unit (any architecture)."""
        model_of = self.unflatten
        samples, local, _ = self._locate(idx)
        parts = None if S is None else jax.tree_util.tree_map(lambda a: a[samples], self._split(S))

        def z_one(th, x, l, Sk):
            model = model_of(th)
            zs = []

            def act(k, z, sc):
                zs.append(z.reshape(-1))
                return model.activation(z) if Sk is None else Sk[k] * z

            forward(model, x, act)
            return jnp.concatenate(zs)[l]

        return jax.vmap(lambda i, l, Sk: jax.grad(z_one)(theta, self.X[i], l, Sk))(samples, local, parts)

    def _mlp_factors(self, theta, idx, S=None):
        """The layer factors of an MLP's kink normals: ``A_r`` (K, m_r), ``dz_e / dz_r`` with ``z_r`` the
        pre-activations of hidden layer ``r``, and ``H_r`` (K, m_{r-1}), that layer's input for the unit's sample; the
        normal of ``e`` on ``W_r`` is the outer product ``A_r(e) H_r(e)^T`` (zero for layers above ``e``'s and for the
        output layer)."""
        model_of = self.unflatten
        samples, local, _ = self._locate(idx)
        parts = None if S is None else jax.tree_util.tree_map(lambda a: a[samples], self._split(S))

        def factors(x, l, Sk):
            model = model_of(theta)

            def z_at(eps):  # z_e with eps_r added to layer r's pre-activations; and every layer's input
                zs, outs = [], []

                def act(k, z, sc):
                    z = z + eps[k]
                    zs.append(z)
                    outs.append(model.activation(z) if Sk is None else Sk[k] * z)
                    return outs[-1]

                forward(model, x, act)
                return jnp.concatenate(zs)[l], [x] + outs[:-1]

            return jax.grad(z_at, has_aux=True)([jnp.zeros(W.shape[0], theta.dtype) for W in model.weights[:-1]])

        return jax.vmap(factors)(self.X[samples], local, parts)

    def _mlp_normals(self, theta, A, H):
        """The normals (K, P) from the layer factors of :meth:`_mlp_factors`, in ``theta``'s layout."""
        K = A[0].shape[0]
        model = self.unflatten(theta)
        blocks = [(a[:, :, None] * h[:, None, :]).reshape(K, -1) for a, h in zip(A, H)]
        blocks.append(jnp.zeros((K, model.weights[-1].size), theta.dtype))
        return jnp.concatenate(blocks, axis=1)

    def normal_ops(self, theta, idx, valid, S=None):
        """``(matvec, rmatvec, G)``: ``g -> Nz g`` (K,), ``lam -> Nz^T lam`` (P,) and ``G = Nz Nz^T`` for the normals
        ``Nz`` of :meth:`normals` with zero rows at invalid entries. MLPs: from the layer factors without
        forming ``Nz`` (``Nz g = sum_r rowsum((A_r G_r) * H_r)`` with ``G_r`` the block of ``g`` on ``W_r``, and
        ``Nz^T lam`` on ``W_r`` is ``(lam A_r)^T H_r``): the (K, P) normals were a third of a deep sliding field's
        evaluation with a few hundred units sliding, in memory traffic rather than operations."""
        w = valid.astype(theta.dtype)
        model = self.unflatten(theta)
        if not isinstance(model, MLP):
            Nz = self._normals_autodiff(theta, idx, S) * w[:, None]
            return (lambda g: Nz @ g), (lambda lam: Nz.T @ lam), Nz @ Nz.T
        A, H = self._mlp_factors(theta, idx, S)
        A = [a * w[:, None] for a in A]
        shapes = [W.shape for W in model.weights]
        offs = np.cumsum([0] + [math.prod(shp) for shp in shapes])

        def matvec(g):
            return sum(jnp.sum((a @ g[offs[r]:offs[r + 1]].reshape(shapes[r])) * h, axis=1)
                       for r, (a, h) in enumerate(zip(A, H)))

        def rmatvec(lam):
            blocks = [((a * lam[:, None]).T @ h).reshape(-1) for a, h in zip(A, H)]
            return jnp.concatenate(blocks + [jnp.zeros(offs[-1] - offs[len(A)], theta.dtype)])

        return matvec, rmatvec, sum((a @ a.T) * (h @ h.T) for a, h in zip(A, H))

    def normal_gram(self, theta, idx, valid, S=None):
        """The Gram matrix ``N N^T`` (K, K) of the kink normals of the units ``idx`` (zero rows and columns at invalid
        entries), in the mode with slopes ``S`` (default: the network itself, as :meth:`normals`).

        For MLPs it is formed from the normals' layer structure instead of the ``O(K^2 P)`` product: the normal of a
        unit ``e`` (sample ``i``) on ``W_r`` is the outer product ``a_r(e) h_{r-1}(i)^T`` of ``a_r(e) = dz_e / dz_r``
        (pre-activations of layer ``r``) and the layer's input, so ``N N^T = sum_r (A_r A_r^T) * (H_r H_r^T)``
        (entrywise product): ``O(K^2 sum_r (m_r + m_{r-1}))`` with the layer widths ``m_r``, ~12 times fewer
        operations for a (30, 30) MLP on 8 inputs, where the Gram matrix was most of a deep net's field evaluation
        with a hundred units sliding. Other architectures: ``Nz Nz^T``."""
        return self.normal_ops(theta, idx, valid, S)[2]

    def slope_jacobian(self, theta, signs, idx, valid, s):
        """``(F, g, J)``: value, gradient and ``J = dg/ds`` (P, K) at the slopes ``s``, the column of unit ``e`` being
        ``dF/dh_e grad_theta z_e`` with the normal taken in the mode (a sample with kinked units in two layers: the
        deeper unit's normal carries the shallower one's slope ``s``); zero at invalid entries. ``g`` is multilinear in
        the slopes (affine in each), so this is its exact derivative at ``s``."""
        S = self.slopes(signs, idx, valid, s)
        F, g, c = self.grad_and_adjoint(theta, S)
        Nz = self.normals(theta, idx, None if self.n_hidden == 1 else S)
        return F, g, (Nz * jnp.where(valid, c[idx], 0.0)[:, None]).T

    def _two_layer_samples(self, idx, valid):
        """Whether some sample has units of the set ``idx`` in two hidden layers (its slopes are then coupled)."""
        samples, _, layers = self._locate(idx)
        pair = valid[:, None] & valid[None, :] & (samples[:, None] == samples[None, :])
        return jnp.any(pair & (layers[:, None] != layers[None, :]))

    def sliding_factor(self, theta, idx, valid):
        """The kink normals of the sliding set ``idx`` and the pseudo-inverse of their Gram matrix
        (:class:`SlidingFactor`) when they do not depend on ``theta``: nets with one hidden layer, whose
        pre-activations are linear in the first layer's weights. A mode of such a net needs them once, not at every
        field evaluation (the Gram matrix and its factorisation were most of a step's cost with a hundred units
        sliding). ``None`` for deeper nets (their normals move with ``theta``)."""
        if self.n_hidden != 1 or idx.shape[0] == 0:
            return None
        return SlidingFactor.build(self.normals(theta, idx) * valid[:, None].astype(theta.dtype), valid)

    def sliding_correction(self, fac, zS):
        """The minimal-norm correction ``N^T (N N^T)^+ z_S`` that puts the sliding set back on its kink surfaces, from
        a :class:`SlidingFactor` (``zS``: the set's pre-activations, zero at invalid entries)."""
        return fac.rmatvec(fac.solve(zS))

    def sliding_grad(self, theta, signs, idx, valid, fac=None, slopes=True):
        """Gradient of the smooth piece ``signs`` with the slopes of the sliding set chosen so that the velocity is
        tangent to every kink surface ``z_e = 0`` of the set: ``g`` minus its projection on the normals
        ``grad_theta z_e``; the slopes ``s_e = s_base - lambda_e / (dF/dh_e)`` are read off the multipliers (a slope
        leaving ``[alpha, 1]`` ends the sliding mode). Skips the normals (a ``lax.cond``) when no entry of ``valid`` is
        set. ``fac``: the mode's :class:`SlidingFactor` (:meth:`sliding_factor`) when the normals do not depend on
        ``theta``; else they are computed here. ``slopes=False`` (a static flag): the velocity only, for the inner
        stages of a Runge-Kutta step, which need no slopes; a deep net then skips the Newton iteration on the slopes of
        samples kinked in two layers (the velocity does not depend on those slopes, below), and the returned ``s`` is
        its first step. Returns ``(F, g, s)``."""
        K = idx.shape[0]
        max_newton = 8  # Newton steps on the slopes of samples kinked in two layers (below)
        s0 = jnp.full((K,), 0.5 * (1.0 + self.alpha), self.X.dtype)
        S0 = self.slopes(signs, idx, valid, s0)
        F, g, c = self.grad_and_adjoint(theta, S0)
        if K == 0:
            return F, g, s0

        tiny = jnp.finfo(g.dtype).tiny

        def read_off(g, c, s_base, S):
            """Tangent part of ``g`` (taken at slopes ``s_base``) and the slopes read off its multipliers."""
            if fac is None:
                mv, rmv, G = self.normal_ops(theta, idx, valid, S)
                lam = gram_solve(None, mv(g), valid, G=G)
                corr = rmv(lam)
            else:  # a SlidingFactor or a block-diagonal BlockFactor (flow/_block_factor.py)
                lam = fac.solve(fac.matvec(g))
                corr = fac.rmatvec(lam)
            ce = c[idx]
            s = s_base - lam / jnp.where(jnp.abs(ce) > tiny, ce, tiny)
            return g - corr, jnp.where(valid, s, s0)

        def sliding(g):
            if self.n_hidden == 1:
                return read_off(g, c, s0, None)
            v, s1 = read_off(g, c, s0, S0)

            def newton(carry):
                _, s_k, _, n = carry
                S_k = self.slopes(signs, idx, valid, s_k)
                _, g_k, c_k = self.grad_and_adjoint(theta, S_k)
                v_k, s_n = read_off(g_k, c_k, s_k, S_k)
                return v_k, s_n, jnp.max(jnp.abs(s_n - s_k) / jnp.maximum(1.0, jnp.abs(s_n))), n + 1

            def more(carry):  # quadratic convergence: after a step under 1e-6 the next would be ~1e-12
                return (carry[2] > 1e-6) & (carry[3] < max_newton)

            # a sample with sliding units in two layers: g is multilinear in their slopes (the deeper unit's normal
            # carries the shallower one's slope, the shallower one's adjoint the deeper one's), so the read-off from
            # s0 is one Newton step; Newton's iteration, linearised at the current slopes, until a step changes no
            # slope by more than 1e-6 (relative; the next would change them by ~1e-12) or max_newton steps, makes them
            # exact (measured: 0.02 off after the first step, 1e-15 after the second). The velocity is the same
            # throughout (the span of the normals does not depend on the slopes); only the slopes, hence slope
            # events, change.
            # The velocity returned is the first read-off's whatever the iteration does, so that every stage of a
            # step evaluates the same formula (a Runge-Kutta step's inner stages skip the iteration: slopes=False).
            if not slopes:
                return v, s1
            start = (v, s1, jnp.asarray(jnp.inf, g.dtype), jnp.asarray(0, jnp.int32))
            out = jax.lax.cond(self._two_layer_samples(idx, valid),
                               lambda c: jax.lax.while_loop(more, newton, c), lambda c: c, start)
            return v, out[1]

        g, s = jax.lax.cond(jnp.any(valid), sliding, lambda g: (g, s0), g)
        return F, g, s


def _gram_cholesky(J, valid, cond_max, G=None):
    """``G = J^T J`` (identity rows at invalid entries), its Cholesky factor and whether the factor is usable: finite,
    the smallest over the largest squared diagonal above ``1 / cond_max`` (default ``cond_max = 1 / (1000 K eps)``).
    ``G``: ``J^T J`` when already formed (zero rows and columns at invalid entries)."""
    G = J.T @ J if G is None else G
    K = G.shape[0]
    eps = jnp.finfo(G.dtype).eps
    cond_max = 1.0 / (1e3 * K * eps) if cond_max is None else cond_max
    G = G + jnp.diag(jnp.where(valid, 0.0, 1.0).astype(G.dtype))  # padded entries: identity rows
    Lc = jnp.linalg.cholesky(G)
    dL = jnp.diagonal(Lc)
    ok = jnp.all(jnp.isfinite(Lc)) & (jnp.min(dL) ** 2 * cond_max > jnp.max(dL) ** 2)
    return G, Lc, ok


def _eig_pinv(G):
    """``(V, 1 / lambda)`` of the symmetric ``G`` with eigenvalues below ``K eps lambda_max`` cut off (the
    minimal-norm solution for dependent kink normals)."""
    lam, V = jnp.linalg.eigh(G)
    cut = lam[-1] * G.shape[0] * jnp.finfo(G.dtype).eps
    return V, jnp.where(lam > cut, 1.0 / jnp.where(lam > cut, lam, 1.0), 0.0)


def gram_solve(J, b, valid, cond_max=None, G=None):
    """``lambda = (J^T J)^+ b`` (J (P, K), zero columns at invalid entries), zero at invalid entries.

    Cholesky of ``G = J^T J`` with one step of iterative refinement when ``G`` is well conditioned (the smallest over
    the largest squared diagonal of the factor above ``1 / cond_max``, default ``cond_max = 1 / (1000 K eps)``, and a
    finite factor); otherwise the eigendecomposition with a relative cut-off ``K eps`` (the minimal-norm solution for
    dependent kink normals). Both with one step of iterative refinement. ``G``: ``J^T J`` when already formed
    (:meth:`KinkedProblem.normal_gram`)."""
    G, Lc, ok = _gram_cholesky(J, valid, cond_max, G)

    def chol(b):
        solve = lambda r: jax.scipy.linalg.cho_solve((Lc, True), r)  # noqa: E731
        d = solve(b)
        return d + solve(b - G @ d)

    def eig(b):
        V, inv = _eig_pinv(G)
        solve = lambda r: V @ (inv * (V.T @ r))  # noqa: E731
        d = solve(b)
        return d + solve(b - G @ d)

    d = jax.lax.cond(ok, chol, eig, b)
    return jnp.where(valid, d, 0.0)


class SlidingFactor(eqx.Module):
    """Kink normals ``N`` (K, P) of a sliding set (zero rows at invalid entries), their Gram matrix ``G = N N^T``
    (identity rows at invalid entries) and its pseudo-inverse ``Q``, formed once: Cholesky when well conditioned, the
    eigendecomposition with a ``K eps`` cut-off otherwise (as :func:`gram_solve`). :meth:`solve` applies ``Q`` with one
    step of iterative refinement, so it matches :func:`gram_solve` to rounding at ``O(K P)`` per call."""

    N: jax.Array
    G: jax.Array
    Q: jax.Array
    valid: jax.Array

    @classmethod
    def build(cls, N, valid, cond_max=None):
        return cls.build_checked(N, valid, cond_max)[0]

    @classmethod
    def build_checked(cls, N, valid, cond_max=None):
        """The factor and whether Cholesky formed it (``False``: the eigendecomposition, dependent normals)."""
        G, Lc, ok = _gram_cholesky(N.T, valid, cond_max)
        eye = jnp.eye(G.shape[0], dtype=G.dtype)

        def eig(_):
            V, inv = _eig_pinv(G)
            return (V * inv) @ V.T

        Q = jax.lax.cond(ok, lambda _: jax.scipy.linalg.cho_solve((Lc, True), eye), eig, None)
        return cls(N, G, Q, valid), ok

    def matvec(self, g):
        """``N g`` (K,)."""
        return self.N @ g

    def rmatvec(self, lam):
        """``N^T lam`` (P,)."""
        return self.N.T @ lam

    def solve(self, b):
        d = self.Q @ b
        d = d + self.Q @ (b - self.G @ d)
        return jnp.where(self.valid, d, 0.0)


def make_kinked(objective, model=None) -> KinkedProblem:
    """The :class:`KinkedProblem` of an objective (``X``, ``y``, ``loss``, ``unflatten``) of a kinked network.

    Raises:
        ValueError: if the network is not kinked (see :func:`is_kinked`) or not a TwoLayer / MLP / CNN.
    """
    unflatten = objective.unflatten
    if model is None:
        raise ValueError("`model` (a network of the objective's architecture) is required.")
    if not is_kinked(model):
        raise ValueError(
            f"the non-smooth flow is for degree-1 kinked activations (relu, leaky_relu(alpha), alpha != 1) with a "
            f"hidden layer; got {type(model).__name__} with activation {getattr(model, 'activation', None)!r}."
        )
    X = jnp.asarray(objective.X)

    def one(x):
        zs = []

        def act(k, z, sc):
            zs.append(z)
            return model.activation(z)

        forward(model, x, act)
        return zs

    shapes = tuple((X.shape[0], *z.shape[1:]) for z in jax.eval_shape(jax.vmap(one), X))
    return KinkedProblem(X, jnp.asarray(objective.y), objective.loss, unflatten, float(model.activation.alpha), shapes,
                         len(shapes))


# ----------------------------------------------------------------------------------------------------------------------
# The minimal-norm element (host side: BVLS), used to decide the mode at an event and by the tests.

@jit
def _jac_at(problem, theta, signs, idx, valid, s):
    return problem.slope_jacobian(theta, signs, idx, valid, s)


MIN_CAPACITY = 16  # smallest padded size of a set of kinked units (compiled programs take fixed shapes)
CAPACITY_GROWTH = 4  # the next capacity when a set outgrows one: one compilation per capacity, so few of them


def capacity(k: int, minimum: int = MIN_CAPACITY, growth: int = CAPACITY_GROWTH, halves_from: int | None = None) -> int:
    """Padded size for ``k`` units: ``minimum`` (:data:`MIN_CAPACITY`) times a power of ``growth``
    (:data:`CAPACITY_GROWTH`); with ``halves_from``, capacities from that one on also take the step halfway in ratio
    (``growth = 2``: ``128, 192, 256, 384, 512, ...``)."""
    cap = minimum
    while cap < k:
        if halves_from is not None and cap >= halves_from and cap * 3 // 2 >= k:
            return cap * 3 // 2
        cap *= growth
    return cap


def _padded(kinks, growth: int = CAPACITY_GROWTH, halves_from: int | None = None):
    """Indices padded to :func:`capacity` (one compilation per capacity; ``growth`` between capacities,
    ``halves_from`` as there) and their validity mask."""
    k = len(kinks)
    cap = capacity(k, growth=growth, halves_from=halves_from)
    idx = np.zeros(cap, np.int32)
    idx[:k] = kinks
    valid = np.zeros(cap, bool)
    valid[:k] = True
    return idx, valid


@jit
def _preacts(problem, theta):
    return problem.preactivations(theta)


@dataclasses.dataclass(frozen=True)
class MinNorm:
    """The minimal-norm element ``m`` of the Clarke subdifferential of ``F`` (``log L`` or ``L``) at ``theta``.

    Attributes:
        m: the element (P,); kinks: flat unit indices with ``|z_e| <= kink_tol scale_e``; slopes: their slopes in
        ``[alpha, 1]``; interior: which slopes lie strictly inside (sliding units); value: ``F(theta)``.
    """

    m: np.ndarray
    kinks: np.ndarray
    slopes: np.ndarray
    interior: np.ndarray
    value: float


def _column_groups(nz):
    """Connected components of the columns of the support pattern ``nz`` (P, K) (two columns are connected when they
    share a nonzero row): ``(groups of columns, groups of rows)``, both lists of index arrays, one entry per
    component; rows touched by no column belong to none."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    P, K = nz.shape
    r, c = np.nonzero(nz)
    graph = coo_matrix((np.ones(r.size, bool), (K + r, c)), shape=(K + P, K + P))
    _, label = connected_components(graph, directed=False)
    col_label, row_label = label[:K], label[K:]
    comps, col_of = np.unique(col_label, return_inverse=True)
    order = np.argsort(col_of, kind="stable")
    cols = np.split(order, np.flatnonzero(np.diff(col_of[order])) + 1)
    touched = np.flatnonzero(np.isin(row_label, comps))
    row_of = np.searchsorted(comps, row_label[touched])
    order = np.argsort(row_of, kind="stable")
    bounds = np.flatnonzero(np.diff(row_of[order])) + 1
    rows = np.split(touched[order], bounds)
    return cols, rows


def _batched_lstsq(J, r, cols, rows):
    """Minimal-norm least-squares solutions of ``min ||J[rows_k, cols_k] x + r[rows_k]||`` for every component ``k``
    at once (zero-padded to a common shape; one batched SVD) and whether each has full column rank."""
    R, C = max(len(x) for x in rows), max(len(x) for x in cols)
    G = len(cols)
    A = np.zeros((G, R, C))
    b = np.zeros((G, R))
    for k, (rk, ck) in enumerate(zip(rows, cols)):
        A[k, :len(rk), :len(ck)] = J[np.ix_(rk, ck)]
        b[k, :len(rk)] = -r[rk]
    U, S, Vt = np.linalg.svd(A, full_matrices=False)
    cut = S[:, :1] * max(R, C) * np.finfo(float).eps
    inv = np.where(S > cut, 1.0 / np.where(S > cut, S, 1.0), 0.0)
    x = np.einsum("gji,gj->gi", Vt, inv * np.einsum("gri,gr->gi", U, b))
    full = np.sum(S > cut, axis=1) == np.asarray([len(c) for c in cols])
    return [x[k, :len(c)] for k, c in enumerate(cols)], full


def bvls(J, r, lo, hi, groups=None):
    """``argmin_s ||J s + r||`` subject to ``lo <= s <= hi``.

    The problem separates over the connected components of the columns, two columns being connected when they share a
    nonzero row (for a net with one hidden layer: the kinked units of one hidden unit, whose normals live in its own
    weights): each component is solved alone. A component whose unconstrained least-squares solution has full column
    rank and lies in the box is that solution (a sliding set whose slopes are admissible: the common case at an
    event; all such solutions come from one batched SVD); every other one is SciPy's bounded-variable least squares
    (exact active set). One BVLS of all the columns was most of a two-layer flow's time with a hundred units
    sliding. ``groups``: ``(group of every column, rows of every group)`` when the components are known (a net with
    one hidden layer: the columns of one neuron, flow/_block_factor.py), instead of finding them from ``J``'s
    nonzeros."""
    from scipy.optimize import lsq_linear

    J = np.asarray(J, float)
    r = np.asarray(r, float)
    K = J.shape[1]
    if K == 0:
        return np.zeros(0)
    if not (np.all(np.isfinite(J)) and np.all(np.isfinite(r))):
        raise FloatingPointError(f"bvls: `J` ({J.shape}) and `r` ({r.shape}) must be finite; got "
                                 f"{int(np.sum(~np.isfinite(J)))} and {int(np.sum(~np.isfinite(r)))} non-finite "
                                 "entries (a non-finite state or gradient)")
    if groups is None:
        cols, rows = _column_groups(J != 0)
    else:
        gcol, grows = groups
        gcol = np.asarray(gcol)
        order = np.argsort(gcol, kind="stable")
        cuts = np.flatnonzero(np.diff(gcol[order])) + 1
        cols = np.split(order, cuts)
        rows = [grows[int(gcol[c[0]])] for c in cols]
    xs, full = _batched_lstsq(J, r, cols, rows)
    s = np.empty(K)
    for ck, rk, x, ok in zip(cols, rows, xs, full):
        if ok and np.all((x >= lo) & (x <= hi)):
            s[ck] = x
            continue
        res = lsq_linear(J[np.ix_(rk, ck)], -r[rk], bounds=(lo, hi), method="bvls", tol=1e-15, lsq_solver="exact")
        s[ck] = np.clip(res.x, lo, hi)
    return s


def clarke_min_norm(problem: KinkedProblem, theta, *, signs=None, kinks=None, kink_tol: float | None = None,
                    slope_tol: float | None = None, n_slope_iters: int = 3, groups=None) -> MinNorm:
    """Minimal-norm element of ``conv D(theta)`` for ``F = log L`` (classification) or ``L`` (square loss).

    Arguments:
        problem: a :class:`KinkedProblem`; theta: flat parameters.
        signs: the activation pattern of the units not at a kink (default: the signs of ``z``).
        kinks: flat indices of the units whose slope is free (default: ``|z_e| <= kink_tol * scale_e``).
        kink_tol: default :func:`default_kink_tol`; slope_tol: interior means at least this far from a bound
            (default :func:`default_slope_tol`).
        n_slope_iters: BVLS re-linearisations (one suffices when ``g`` is affine in the slopes: two-layer nets).
        groups: ``(group of every unit (N,), columns of every group)`` of a net with one hidden layer (its neurons,
            :func:`homflow.flow._block_factor.block_normals`): the BVLS's independent components, known in advance.

    Returns:
        A :class:`MinNorm`.
    """
    theta = jnp.asarray(theta)
    kink_tol = default_kink_tol(theta.dtype) if kink_tol is None else float(kink_tol)
    slope_tol = default_slope_tol(theta.dtype) if slope_tol is None else float(slope_tol)
    if kinks is None or signs is None:
        z, sc = (np.asarray(a) for a in _preacts(problem, theta))
    if kinks is None:
        kinks = np.flatnonzero(np.abs(z) <= kink_tol * sc)
    kinks = np.asarray(kinks, dtype=np.int32)
    if signs is None:
        signs = np.where(z > 0, 1, -1).astype(np.int8)
    signs_j = np.asarray(signs)
    a = problem.alpha
    s = np.full(kinks.size, 0.5 * (1.0 + a))
    iters = 1 if problem.n_hidden == 1 else max(1, int(n_slope_iters))  # re-linearisations (multilinear g)
    idx, valid = _padded(kinks)
    k = kinks.size
    for _ in range(iters):
        s_pad = np.full(idx.shape[0], 0.5 * (1.0 + a))
        s_pad[:k] = s
        f, g, J = jax.device_get(_jac_at(problem, theta, signs_j, idx, valid, s_pad))
        J = J[:, :k]
        s_new = bvls(J, g - J @ s, a, 1.0, None if groups is None else (groups[0][kinks], groups[1]))
        g = g + J @ (s_new - s)
        s = s_new
    interior = (s > a + slope_tol) & (s < 1.0 - slope_tol)
    return MinNorm(m=g, kinks=kinks, slopes=s, interior=interior, value=float(f))
