"""Narrow and wide non-smooth flows as ONE hybrid system, so that ``eta(t) = T theta(t)`` can be measured at rounding
level for ReLU-type networks (arXiv 2505.12419, docs/math.md section 5; the smooth version is
:func:`homflow.embedding.joint_flow`).

The state is ``(theta, eta)``; the loss ``log L(theta) + log L~(eta)`` (or ``L + L~``) is separable, so its minimal-norm
Clarke element is the pair of the two minimal-norm elements and its flow is the pair of the two flows. Every step,
every located event and every sliding mode is shared: a unit of the narrow net and its copies ``c_r z`` in the wide net
reach their kinks at the same time, and the wide sliding slopes equal the narrow ones, so each Runge-Kutta stage of the
wide half is ``T`` of the narrow stage. The step-size controller looks at the narrow half only (``joint_flow``'s
``error_norm='narrow'``): the narrow half takes the steps of :func:`nonsmooth_flow` alone.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._clarke import KinkedProblem, make_kinked
from ._nonsmooth import ClarkeFlow, integrate_nonsmooth
from ._solution import Trajectory

__all__ = ["JointKinked", "joint_nonsmooth_flow"]


class JointKinked(eqx.Module):
    """Two :class:`KinkedProblem` s on one concatenated state and one concatenated list of units."""

    narrow: KinkedProblem
    wide: KinkedProblem
    P: int = eqx.field(static=True)

    @property
    def alpha(self):
        return self.narrow.alpha

    @property
    def n_hidden(self):
        return max(self.narrow.n_hidden, self.wide.n_hidden)

    @property
    def n_error(self):
        return self.P

    @property
    def unflatten(self):
        return lambda th: self.narrow.unflatten(th[: self.P])

    def _blocks(self, theta):
        return theta[: self.P], theta[self.P:]

    def _idx(self, idx, valid):
        Nn = self.narrow.n_entries
        Nw = self.wide.n_entries
        vn = valid & (idx < Nn)
        vw = valid & (idx >= Nn)
        return (jnp.clip(idx, 0, Nn - 1), vn), (jnp.clip(idx - Nn, 0, Nw - 1), vw)

    def preactivations(self, theta):
        a, b = self._blocks(theta)
        zn, sn = self.narrow.preactivations(a)
        zw, sw = self.wide.preactivations(b)
        return jnp.concatenate([zn, zw]), jnp.concatenate([sn, sw])

    def preactivations_at(self, theta, S):
        a, b = self._blocks(theta)
        Nn = self.narrow.n_entries
        return jnp.concatenate([self.narrow.preactivations_at(a, S[:Nn]), self.wide.preactivations_at(b, S[Nn:])])

    def log_loss(self, theta):
        return self.narrow.log_loss(theta[: self.P])

    def no_input(self, z, sc, kt):
        Nn = self.narrow.n_entries
        return np.concatenate([self.narrow.no_input(z[:Nn], sc[:Nn], kt), self.wide.no_input(z[Nn:], sc[Nn:], kt)])

    def sliding_factor(self, theta, idx, valid):
        """The two halves' :class:`~homflow.flow._clarke.SlidingFactor` s (``None`` unless both nets have one hidden
        layer)."""
        if self.n_hidden != 1 or idx.shape[0] == 0:
            return None
        a, b = self._blocks(theta)
        (i_n, v_n), (i_w, v_w) = self._idx(idx, valid)
        return self.narrow.sliding_factor(a, i_n, v_n), self.wide.sliding_factor(b, i_w, v_w)

    def sliding_correction(self, fac, zS):
        """Each half's minimal-norm correction from its own units' entries of ``zS`` (the Gram matrix of the joint
        normals is block diagonal)."""
        fn, fw = fac
        return jnp.concatenate([self.narrow.sliding_correction(fn, jnp.where(fn.valid, zS, 0.0)),
                                self.wide.sliding_correction(fw, jnp.where(fw.valid, zS, 0.0))])

    def velocity(self, theta, log_scale, signs, idx, valid, fac=None, slopes=True):
        a, b = self._blocks(theta)
        Nn = self.narrow.n_entries
        (i_n, v_n), (i_w, v_w) = self._idx(idx, valid)
        fn, fw = (None, None) if fac is None else fac
        vn, rn, sn = self.narrow.velocity(a, log_scale, signs[:Nn], i_n, v_n, fn, slopes)
        vw, rw, sw = self.wide.velocity(b, log_scale, signs[Nn:], i_w, v_w, fw, slopes)
        return jnp.concatenate([vn, vw]), rn + rw, jnp.where(v_n, sn, sw)

    def _halves_S(self, S):
        """The narrow and wide parts of a joint slope vector ``S`` (N,) (``None``: the networks' own)."""
        if S is None:
            return None, None
        Nn = self.narrow.n_entries
        return S[:Nn], S[Nn:]

    def normals(self, theta, idx, S=None):
        """``grad z_e`` (K, P_narrow + P_wide) of the joint system's units ``idx`` (narrow units first), with the units
        acting as ``S_e z_e`` when ``S`` is given: each unit's normal lives in its own network's block, zero in the
        other."""
        a, b = self._blocks(theta)
        Nn = self.narrow.n_entries
        Sn, Sw = self._halves_S(S)
        in_narrow = (idx < Nn)[:, None].astype(theta.dtype)
        Jn = self.narrow.normals(a, jnp.clip(idx, 0, Nn - 1), Sn) * in_narrow
        Jw = self.wide.normals(b, jnp.clip(idx - Nn, 0, self.wide.n_entries - 1), Sw) * (1 - in_narrow)
        return jnp.concatenate([Jn, Jw], axis=1)

    def normal_gram(self, theta, idx, valid, S=None):
        """``N N^T`` of the joint units: the two halves' Gram matrices (a narrow and a wide unit's normals live in
        different blocks, so the joint one is their sum over the halves' entries)."""
        return self.normal_ops(theta, idx, valid, S)[2]

    def normal_ops(self, theta, idx, valid, S=None):
        """``(matvec, rmatvec, G)`` as :meth:`KinkedProblem.normal_ops <homflow.flow._clarke.KinkedProblem.normal_ops>`,
        from the two halves' own (each unit's normal lives in its network's block)."""
        a, b = self._blocks(theta)
        (i_n, v_n), (i_w, v_w) = self._idx(idx, valid)
        Sn, Sw = self._halves_S(S)
        mn, rn, Gn = self.narrow.normal_ops(a, i_n, v_n, Sn)
        mw, rw, Gw = self.wide.normal_ops(b, i_w, v_w, Sw)
        return (lambda g: mn(g[:self.P]) + mw(g[self.P:])), (lambda lam: jnp.concatenate([rn(lam), rw(lam)])), Gn + Gw

    def slope_jacobian(self, theta, signs, idx, valid, s):
        a, b = self._blocks(theta)
        Nn = self.narrow.n_entries
        (i_n, v_n), (i_w, v_w) = self._idx(idx, valid)
        Fn, gn, Jn = self.narrow.slope_jacobian(a, signs[:Nn], i_n, v_n, s)
        Fw, gw, Jw = self.wide.slope_jacobian(b, signs[Nn:], i_w, v_w, s)
        return Fn + Fw, jnp.concatenate([gn, gw]), jnp.concatenate([Jn, Jw], axis=0)


def joint_nonsmooth_flow(split, narrow, data, *, loss="exponential", t1: float, ts=None, n_save: int = 50,
                         time: str = "auto", solver: ClarkeFlow | None = None, wide_theta0=None
                         ) -> tuple[Trajectory, Trajectory]:
    """Non-smooth flows of ``narrow`` (``theta``) and ``split.wide`` (``eta(0) = T theta(0)``, or ``wide_theta0`` for a
    negative control) integrated as one hybrid system (module docstring).

    Arguments:
        split: the embedding ``T`` (``homflow.embedding.split`` ...); narrow: a kinked network of its narrow
            architecture; data, loss, t1, ts, n_save, time, solver: as :func:`homflow.flow.nonsmooth_flow`.
        wide_theta0: optional wide initial vector (default ``T theta(0)``).

    Returns:
        ``(narrow_trajectory, wide_trajectory)`` at the same times; ``stats`` (shared) count steps and events.
    """
    from ._integrate import check_times
    from ._problem import make_problem

    t1, ts = check_times(t1, ts, n_save)
    if time not in ("auto", "linear", "log"):
        raise ValueError(f"`time` must be 'auto', 'linear' or 'log'; got {time!r}.")
    log_time = time == "log" or (time == "auto" and t1 > 1e4)
    prob_n, theta0 = make_problem(narrow, data, loss)
    wide = split.wide
    prob_w, _ = make_problem(wide, data, loss)
    eta0 = split.apply_flat(theta0) if wide_theta0 is None else jnp.asarray(wide_theta0, theta0.dtype)
    joint = JointKinked(make_kinked(prob_n, narrow), make_kinked(prob_w, wide), int(theta0.size))
    tr = integrate_nonsmooth(joint, jnp.concatenate([theta0, eta0]), ts, t1, log_time=log_time,
                             solver=solver or ClarkeFlow())
    P = int(theta0.size)
    out = []
    for th, kp in ((tr.thetas[:, :P], joint.narrow), (tr.thetas[:, P:], joint.wide)):
        log_l = np.asarray([float(kp.log_loss(jnp.asarray(x))) for x in th])
        out.append(Trajectory(ts=tr.ts, thetas=th, loss=np.exp(log_l), log_loss=log_l,
                              norm=np.linalg.norm(th, axis=1), stats=tr.stats, result=tr.result, reason=tr.reason,
                              unflatten=kp.unflatten, degree=kp.unflatten(jnp.asarray(th[0])).degree,
                              extras=dict(tr.extras)))
    return out[0], out[1]
