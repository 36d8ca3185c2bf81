"""Gradient flow of a ReLU / leaky-ReLU network as a differential inclusion: the minimal-norm (Filippov / Clarke)
solution, integrated piece by piece with located pattern changes and exact sliding modes (docs/math.md section 6).

For almost every ``t`` the solution moves with ``-m(theta)``, the minimal-norm element of the Clarke subdifferential
of ``L`` (Davis, Drusvyatskiy, Kakade & Lee, arXiv 1804.07795; Lyu & Li, arXiv 1906.05890). homflow integrates it as a
hybrid system. A *mode* is an activation pattern (a sign for every unit ``e = (layer, unit, sample)``) and a *sliding
set* ``S`` of units held at ``z_e = 0``. Inside a mode the field is smooth: the gradient of the mode's polynomial piece
with the slopes of ``S`` chosen so that ``J^T g = 0`` (the velocity is tangent to every kink surface of ``S``; for
two-layer nets this is exactly the minimal-norm element, and RK stages then keep ``w_j . x_i`` fixed to rounding). It
is integrated by Dormand-Prince 5(4) with a PI step-size controller (rtol / atol as for :func:`gradient_flow`). A mode
ends when a unit outside ``S`` changes sign or a sliding slope reaches ``alpha`` or ``1``: the event is located by
regula falsi (Illinois) on the step size, i.e. the state at the event is an actual Runge-Kutta step, not an
interpolant, with ``|z_e| <= kink_tol * scale_e`` or the slope within ``slope_tol`` of its bound. At the event the new
mode is read off the minimal-norm element of the Clarke subdifferential there (:func:`clarke_min_norm`, BVLS over the
slopes of the units at a kink): an interior slope means the unit slides (it joins ``S`` and the state is projected
onto ``z_e = 0``); a slope at a bound means it crosses (or leaves), to the side the minimal-norm velocity points to.
``int_0^t ||dtheta/dt||^2`` is integrated alongside (``extras['energy']``): the energy identity
``L(0) - L(t) = int_0^t ||dtheta/dt||^2`` is a check of the whole construction.

Why not time-stepping or smoothing: an adaptive method applied to one-sided gradients chatters across an attracting
kink surface with ever smaller steps (issue 11: 1,000,000 steps to t = 0.39); a smoothed activation with a vanishing
parameter is stiff at the kink and only approximates the selection; a fixed-step scheme for inclusions is first order.
Locating events keeps every smooth piece at 5th order and the sliding constraint exact.
"""

from __future__ import annotations

import dataclasses
import math
import time as _time
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._clarke import KinkedProblem, clarke_min_norm, default_kink_tol, default_slope_tol, is_kinked, make_kinked
from ._ode import _setup
from ._results import RESULTS
from ._solution import Trajectory

__all__ = ["ClarkeFlow", "Clarke", "nonsmooth_flow", "integrate_nonsmooth", "kinked_default"]


@dataclasses.dataclass(frozen=True)
class ClarkeFlow:
    """The non-smooth flow solver (module docstring) with every option in plain sight.

    Arguments:
        rtol: relative tolerance of the PI controller (default 1e-8); atol: absolute tolerance (default
            ``0.1 * rtol * ||theta(0)||``, as :func:`homflow.flow.gradient_flow`).
        kink_tol: a unit is at its kink when ``|z_e| <= kink_tol * scale_e`` (default ``1000 eps``); events are
            located to this accuracy.
        slope_tol: a sliding slope within this of ``alpha`` or ``1`` is at its bound (default ``sqrt(eps)``).
        n_slope_iters: BVLS re-linearisations of the mode decision at an event for nets with several hidden layers
            (the gradient is multilinear in the slopes there; two-layer nets need one and get one).
        pcoeff, icoeff: PI controller coefficients; safety, factor_min, factor_max: step-size factor limits.
        max_steps: attempted steps (including event-location steps) before giving up.
        max_locate: regula-falsi iterations per event; zeno_limit: consecutive events without progress in time before
            the solve stops (a Zeno point or an inconsistent mode).
        project: project onto the sliding set's kink surfaces after every accepted step (exact for two-layer nets, a
            Newton step for deeper ones).
    """

    rtol: float = 1e-8
    atol: float | None = None
    kink_tol: float | None = None
    slope_tol: float | None = None
    n_slope_iters: int = 2
    pcoeff: float = 0.4
    icoeff: float = 0.3
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    max_steps: int = 1_000_000
    max_locate: int = 60
    zeno_limit: int = 200
    project: bool = True

    def __post_init__(self):
        for name in ("rtol", "safety", "factor_max"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"`{name}` must be a finite number > 0; got {v!r}.")
        for name in ("atol", "kink_tol", "slope_tol"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"`{name}` must be None or a finite number > 0; got {v!r}.")
        if not 0 < self.factor_min < 1:
            raise ValueError(f"`factor_min` must lie in (0, 1); got {self.factor_min!r}.")
        for name in ("n_slope_iters", "max_steps", "max_locate", "zeno_limit"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {v!r}.")


# ----------------------------------------------------------------------------------------------------------------------
# Compiled pieces (one compilation per architecture, data shape and sliding-set capacity K).

def _aug_field(problem, y, u, log_time, signs, idx, valid):
    v, rate, s = problem.velocity(y[:-1], u if log_time else jnp.zeros_like(u), signs, idx, valid)
    return jnp.concatenate([v, rate[None]]), s


@eqx.filter_jit
def _eval(problem, y, u, log_time, signs, idx, valid):
    """``(f, s, z, scale)`` at ``y``: the augmented field, sliding slopes and pre-activations with their bounds."""
    f, s = _aug_field(problem, y, u, log_time, signs, idx, valid)
    z, sc = problem.preactivations(y[:-1])
    return f, s, z, sc


# Dormand-Prince 5(4) (Hairer, Norsett & Wanner, Solving ODEs I, II.5): the tableau rows, the 7th row being the
# 5th-order weights (first same as last), and the error weights.
_A = np.zeros((7, 7))
_A[1, :1] = [1 / 5]
_A[2, :2] = [3 / 40, 9 / 40]
_A[3, :3] = [44 / 45, -56 / 15, 32 / 9]
_A[4, :4] = [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]
_A[5, :5] = [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]
_A[6, :6] = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]
_C = np.array([0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0])
_E = np.array([71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40])


@eqx.filter_jit
def _step(problem, y, f0, u, h, log_time, signs, idx, valid, rtol, atol):
    """One Dormand-Prince 5(4) step of the mode's field, its stages in a ``lax.scan`` (the field is compiled once).

    Returns ``(y1, f1, err_norm, z1, scale1, s1)``; ``err_norm`` is the RMS of the local error of ``theta`` scaled by
    ``atol + rtol max(|theta_0|, |theta_1|)``."""
    dtype = y.dtype
    A, C, E = jnp.asarray(_A, dtype), jnp.asarray(_C, dtype), jnp.asarray(_E, dtype)
    ks = jnp.zeros((7,) + y.shape, dtype).at[0].set(f0)

    def body(carry, i):
        ks, _ = carry
        yi = y + h * (A[i] @ ks)
        fi, si = _aug_field(problem, yi, u + C[i] * h, log_time, signs, idx, valid)
        return (ks.at[i].set(fi), si), None

    s_init = jnp.zeros(idx.shape, dtype)
    (ks, s1), _ = jax.lax.scan(body, (ks, s_init), jnp.arange(1, 7))
    y1 = y + h * (A[6] @ ks)
    err = h * (E @ ks)
    ne = getattr(problem, "n_error", y.shape[0] - 1)  # a joint problem controls the error of its first part only
    scale = atol + rtol * jnp.maximum(jnp.abs(y[:ne]), jnp.abs(y1[:ne]))
    errn = jnp.sqrt(jnp.mean((err[:ne] / scale) ** 2))
    z1, sc1 = problem.preactivations(y1[:-1])
    return y1, ks[6], errn, z1, sc1, s1


@eqx.filter_jit
def _project(problem, theta, idx, valid, iters):
    """Newton projection onto ``{z_e(theta) = 0, e in S}`` (minimal-norm correction; exact in one step for two-layer
    nets, whose constraints are linear)."""
    def zS(th):
        return jnp.where(valid, problem.preactivations(th)[0][idx], 0.0)

    before = zS(theta)
    for _ in range(iters):
        Jz = jax.jacrev(zS)(theta)
        theta = theta - jnp.linalg.lstsq(Jz, zS(theta))[0]
    return theta, before, zS(theta)


@eqx.filter_jit
def _preacts(problem, theta):
    return problem.preactivations(theta)


@eqx.filter_jit
def _dz(problem, theta, v):
    return jax.jvp(lambda th: problem.preactivations(th)[0], (theta,), (v,))[1]


@eqx.filter_jit
def _diag(problem, thetas):
    return jax.vmap(lambda th: (problem.log_loss(th), jnp.linalg.norm(th)))(thetas)


# ----------------------------------------------------------------------------------------------------------------------
# The host-side driver.

_MIN_CAPACITY = 8  # sliding-set capacity of the compiled field (doubled when exceeded: one compilation each)


class _Mode:
    """Activation pattern and sliding set, with the padded arrays the compiled pieces take."""

    def __init__(self, signs: np.ndarray, sliding=()):
        self.signs = np.asarray(signs).astype(np.int8)
        self.sliding = sorted(int(e) for e in sliding)
        k = len(self.sliding)
        cap = max(_MIN_CAPACITY, 1 << max(k - 1, 0).bit_length())
        idx = np.zeros(cap, np.int32)
        valid = np.zeros(cap, bool)
        idx[:k] = self.sliding
        valid[:k] = True
        self._arrays = (jnp.asarray(self.signs), jnp.asarray(idx), jnp.asarray(valid))

    def arrays(self):
        return self._arrays


class _Driver:
    """Host-side loop state of one non-smooth solve: the problem, options, tolerances and statistics."""

    def __init__(self, problem: KinkedProblem, sol: ClarkeFlow, theta0, log_time: bool):
        self.problem, self.sol, self.log_time = problem, sol, log_time
        dtype = theta0.dtype
        self.dtype = dtype
        self.kt = default_kink_tol(dtype) if sol.kink_tol is None else sol.kink_tol
        self.st = default_slope_tol(dtype) if sol.slope_tol is None else sol.slope_tol
        self.alpha = problem.alpha
        nrm0 = float(jnp.linalg.norm(theta0))
        self.nrm0 = nrm0
        atol = sol.atol if sol.atol is not None else 0.1 * sol.rtol * max(nrm0, float(jnp.finfo(dtype).tiny))
        self.rtol_a, self.atol_a = self.A(sol.rtol), self.A(atol)
        self.atol = atol
        self.stats = dict(num_steps=0, num_accepted_steps=0, num_rejected_steps=0, num_locate_steps=0,
                          grad_evals=0, kink_normals=0, events=0, pattern_changes=0, sliding_entered=0,
                          sliding_left=0, max_sliding=0, max_constraint_drift=0.0, max_constraint_residual=0.0,
                          solver="clarke", log_time=bool(log_time))

    def A(self, x):
        return jnp.asarray(x, self.dtype)

    def evaluate(self, y, u, mode):
        signs, idx, valid = mode.arrays()
        f, s, z, sc = _eval(self.problem, y, self.A(u), self.log_time, signs, idx, valid)
        self.stats["grad_evals"] += 1
        self.stats["kink_normals"] += len(mode.sliding)
        return f, np.asarray(s), np.asarray(z), np.asarray(sc)

    def step(self, y, f0, u, h, mode):
        signs, idx, valid = mode.arrays()
        y1, f1, errn, z1, sc1, s1 = _step(self.problem, y, f0, self.A(u), self.A(h), self.log_time, signs, idx,
                                          valid, self.rtol_a, self.atol_a)
        self.stats["num_steps"] += 1
        self.stats["grad_evals"] += 6
        self.stats["kink_normals"] += 6 * len(mode.sliding)
        return y1, f1, float(errn), np.asarray(z1), np.asarray(sc1), np.asarray(s1)

    def event_values(self, mode, z, sc, s):
        """Normalised event functions: ``sign_e z_e / scale_e`` for units outside ``S`` (tolerance ``kink_tol``) and
        the distance of each sliding slope to its box (tolerance ``slope_tol``); negative means it has happened."""
        cross = mode.signs * z / np.maximum(sc, np.finfo(float).tiny)
        if mode.sliding:
            cross[mode.sliding] = np.inf
        k = len(mode.sliding)
        slide = np.minimum(s[:k] - self.alpha, 1.0 - s[:k]) if k else np.zeros(0)
        return cross, slide

    def _tiny_dz(self, theta, v, sc, ids):
        return self.kt * sc[ids] * (np.linalg.norm(v) / max(float(jnp.linalg.norm(theta)), np.finfo(float).tiny))

    def resolve(self, y, u, mode, cands):
        """The mode after an event at ``y``: from the minimal-norm element (interior slope: slides; bound: crosses to
        the side its velocity points to), then made consistent: a sliding slope of the new mode outside ``[alpha, 1]``
        leaves on that bound's side; a unit at its kink whose new field points into the other side is flipped, and if
        both sides point into the kink it slides."""
        problem, theta = self.problem, y[:-1]
        C = np.asarray(sorted(set(mode.sliding) | set(int(c) for c in cands)), np.int64)
        mn = clarke_min_norm(problem, theta, signs=mode.signs, kinks=C, kink_tol=self.kt, slope_tol=self.st,
                             n_slope_iters=self.sol.n_slope_iters)
        self.stats["grad_evals"] += 1
        self.stats["kink_normals"] += len(C)
        slide = set(C[mn.interior].tolist())
        signs = mode.signs.copy()
        bound = C[~mn.interior]
        _, _, z, sc = self.evaluate(y, u, mode)
        if bound.size:
            v = -np.asarray(mn.m)
            dz = np.asarray(_dz(problem, theta, self.A(v)))[bound]
            side = np.where(mn.slopes[~mn.interior] > 0.5 * (1 + self.alpha), 1, -1)
            signs[bound] = np.where(np.abs(dz) > self._tiny_dz(theta, v, sc, bound), np.sign(dz), side)
        flipped = set()
        new = _Mode(signs, slide)
        for _ in range(2 * len(C) + 2):
            f, s, _, _ = self.evaluate(y, u, new)
            k = len(new.sliding)
            out = [(e, se) for e, se in zip(new.sliding, s[:k]) if se < self.alpha - self.st or se > 1.0 + self.st]
            if out:
                for e, se in out:
                    slide.discard(e)
                    signs[e] = 1 if se > 1.0 else -1
                new = _Mode(signs, slide)
                continue
            rest = np.asarray([e for e in C if e not in slide], np.int64)
            if rest.size == 0:
                break
            v = np.asarray(f[:-1])
            dz = np.asarray(_dz(problem, theta, f[:-1]))[rest]
            wrong = rest[signs[rest] * dz < -self._tiny_dz(theta, v, sc, rest)]
            if wrong.size == 0:
                break
            e = int(wrong[0])
            if e in flipped:
                slide.add(e)
            else:
                signs[e] = -signs[e]
                flipped.add(e)
            new = _Mode(signs, slide)
        old_s, new_s = set(mode.sliding), set(new.sliding)
        both_out = np.asarray([e for e in C if e not in old_s and e not in new_s], np.int64)
        if both_out.size:
            self.stats["pattern_changes"] += int(np.sum(mode.signs[both_out] != new.signs[both_out]))
        self.stats["sliding_entered"] += len(new_s - old_s)
        self.stats["sliding_left"] += len(old_s - new_s)
        self.stats["max_sliding"] = max(self.stats["max_sliding"], len(new_s))
        return new

    def project(self, theta, mode):
        """Back onto ``z_e = 0`` for the sliding set (records the drift before and the residual after, relative to
        ``scale_e``)."""
        if not (self.sol.project and mode.sliding):
            return theta
        _, idx, valid = mode.arrays()
        th, before, after = _project(self.problem, theta, idx, valid, 1 if self.problem.n_hidden == 1 else 2)
        _, sc = _preacts(self.problem, th)
        k = len(mode.sliding)
        scs = np.maximum(np.asarray(sc)[mode.sliding], np.finfo(float).tiny)
        st = self.stats
        st["max_constraint_drift"] = max(st["max_constraint_drift"], float(np.max(np.abs(np.asarray(before)[:k]) / scs)))
        st["max_constraint_residual"] = max(st["max_constraint_residual"],
                                            float(np.max(np.abs(np.asarray(after)[:k]) / scs)))
        return th

    def locate(self, y, f0, u, h, mode, ev0, ev1, hits):
        """The earliest event inside a step of size ``h``: regula falsi (Illinois) on the step size, each trial an
        actual Runge-Kutta step. Returns ``(h_event, step_output, target)``."""
        kt, st, sol = self.kt, self.st, self.sol

        def val(ev, tg):
            return ev[0][tg[1]] if tg[0] == "c" else ev[1][tg[1]]

        def pick(ev_a, ev_b, hit):
            best, tau = None, np.inf
            for kind, ids in (("c", hit[0]), ("s", hit[1])):
                for e in ids:
                    tg = (kind, int(e))
                    ea, eb = max(val(ev_a, tg), 0.0), val(ev_b, tg)
                    t_lin = ea / (ea - eb) if ea - eb > 0 else 0.0
                    if t_lin < tau:
                        best, tau = tg, t_lin
            return best

        target = pick(ev0, ev1, hits)
        ha, hb, ev_a, ev_b = 0.0, h, ev0, ev1
        best_a, out, hc = None, None, 0.0
        pts = [(ha, max(val(ev_a, target), 0.0)), (hb, val(ev_b, target))]  # the last two trials (secant)
        for _ in range(sol.max_locate):
            (h1, e1), (h2, e2) = pts
            hc = h2 - e2 * (h2 - h1) / (e2 - e1) if e2 != e1 else 0.5 * (ha + hb)
            if not (ha < hc < hb):  # secant outside the bracket: regula falsi on the bracket, else bisection
                ea, eb = max(val(ev_a, target), 0.0), val(ev_b, target)
                hc = ha + (hb - ha) * ea / (ea - eb) if ea - eb > 0 else 0.5 * (ha + hb)
                if not (ha < hc < hb):
                    hc = 0.5 * (ha + hb)
            out = self.step(y, f0, u, hc, mode)
            self.stats["num_locate_steps"] += 1
            ev_c = self.event_values(mode, out[3], out[4], out[5])
            hit_c = (np.flatnonzero(ev_c[0] < -kt), np.flatnonzero(ev_c[1] < -st))
            tol_t = kt if target[0] == "c" else st
            ec = val(ev_c, target)
            others = [("c", int(e)) for e in hit_c[0]] + [("s", int(e)) for e in hit_c[1]]
            others = [o for o in others if o != target]
            if abs(ec) <= tol_t and not others:
                return hc, out, target
            if ec < -tol_t or others:
                new_t = pick(ev_a, ev_c, hit_c) if others else target
                hb, ev_b = hc, ev_c
                if new_t != target:
                    target = new_t
                    pts = [(ha, max(val(ev_a, target), 0.0)), (hb, val(ev_b, target))]
                    continue
            else:
                ha, ev_a, best_a = hc, ev_c, (hc, out)
            pts = [pts[1], (hc, ec)]
            if hb - ha <= 4 * np.finfo(float).eps * max(abs(u) + hb, 1.0):
                break
        if best_a is not None:
            return best_a[0], best_a[1], target
        return hc, out, target


def integrate_nonsmooth(problem: KinkedProblem, theta0, ts, t1: float, *, log_time: bool = False,
                        solver: ClarkeFlow | None = None, progress=None) -> Trajectory:
    """Integrate the minimal-norm flow of ``problem`` from ``theta0``, saving at ``ts`` (increasing, from 0, within
    ``[0, t1]``). ``log_time``: integrate in ``u = log(1 + t)``. Returns a :class:`Trajectory` whose ``stats`` count
    steps, gradient evaluations, events, sliding modes entered and left and pattern changes, and whose
    ``extras['energy']`` holds ``int_0^t ||dtheta/dt||^2`` at the saved times."""
    sol = solver or ClarkeFlow()
    theta0 = jnp.asarray(theta0)
    dtype = theta0.dtype
    D = _Driver(problem, sol, theta0, log_time)
    stats = D.stats
    ts = np.asarray(ts, float)
    us = np.log1p(ts) if log_time else ts.copy()
    u1 = math.log1p(t1) if log_time else float(t1)
    t_start = _time.perf_counter()
    tiny_h = 16 * float(np.finfo(float).eps)

    theta = theta0
    z, sc = (np.asarray(a) for a in _preacts(problem, theta))
    mode = _Mode(np.where(z > 0, 1, -1))
    y = jnp.concatenate([theta, jnp.zeros((1,), dtype)])
    u = 0.0
    near = np.flatnonzero(np.abs(z) <= D.kt * sc)
    if near.size:
        stats["events"] += 1
        mode = D.resolve(y, u, mode, near)
        y = jnp.concatenate([D.project(y[:-1], mode), y[-1:]])
    f0, s0, z0, sc0 = D.evaluate(y, u, mode)
    v0 = float(jnp.linalg.norm(f0[:-1]))
    h = min(u1, 0.01 * max(D.nrm0, D.atol) / v0) if v0 > 0 else u1
    saves_th, saves_E, saves_t = [np.asarray(y[:-1])], [0.0], [0.0]
    k_save = 1 if us[0] == 0.0 else 0
    err_prev = 1.0
    no_progress = 0
    reason, success, failure = None, True, None

    while k_save < len(us):
        if stats["num_steps"] >= sol.max_steps:
            success, failure = False, "max_steps"
            reason = (f"max_steps = {sol.max_steps} reached at t = {_t(u, log_time):.6g} before t1 = {t1:g} "
                      f"({stats['events']} events, {len(mode.sliding)} units sliding); raise max_steps")
            break
        h = min(h, us[k_save] - u)
        if h <= tiny_h * max(abs(u), 1.0):  # at a save time
            saves_th.append(np.asarray(y[:-1]))
            saves_E.append(float(y[-1]))
            saves_t.append(float(ts[k_save]))
            k_save += 1
            h = max(h, D.last_h if hasattr(D, "last_h") else h)
            continue
        y1, f1, errn, z1, sc1, s1 = D.step(y, f0, u, h, mode)
        if not np.isfinite(errn) or errn > 1.0:
            stats["num_rejected_steps"] += 1
            fac = sol.factor_min if not np.isfinite(errn) else \
                max(sol.factor_min, sol.safety * errn ** (-(sol.icoeff + sol.pcoeff) / 5))
            h *= fac
            if h <= tiny_h * max(abs(u), 1.0):
                success, failure = False, "underflow"
                reason = (f"the step size underflowed at t = {_t(u, log_time):.6g}: the state became non-finite or "
                          "the field is not resolved (diverging flow?)")
                break
            continue
        ev1 = D.event_values(mode, z1, sc1, s1)
        hits = (np.flatnonzero(ev1[0] < -D.kt), np.flatnonzero(ev1[1] < -D.st))
        if hits[0].size or hits[1].size:
            stats["events"] += 1
            ev0 = D.event_values(mode, z0, sc0, s0)
            hc, out, target = D.locate(y, f0, u, h, mode, ev0, ev1, hits)
            y, u = out[0], u + hc
            stats["num_accepted_steps"] += 1
            no_progress = no_progress + 1 if hc <= tiny_h * max(abs(u), 1.0) else 0
            if no_progress > sol.zeno_limit:
                success, failure = False, "zeno"
                reason = (f"{no_progress} events without progress in time at t = {_t(u, log_time):.6g}: a Zeno point "
                          "or a kink where no mode is consistent (try a larger kink_tol)")
                break
            zc, scc = out[3], out[4]
            cands = np.flatnonzero(np.abs(zc) <= 10 * D.kt * scc)
            if target[0] == "c":
                cands = np.union1d(cands, [target[1]])
            mode = D.resolve(y, u, mode, cands)
            y = jnp.concatenate([D.project(y[:-1], mode), y[-1:]])
            f0, s0, z0, sc0 = D.evaluate(y, u, mode)
            h = max(h - hc, h / 4) if hc < h else h
            continue
        stats["num_accepted_steps"] += 1
        no_progress = 0
        u, y = u + h, y1
        D.last_h = h
        if mode.sliding and sol.project:  # a rounding-level correction: the step's last stage stays valid (FSAL)
            y = jnp.concatenate([D.project(y[:-1], mode), y[-1:]])
        f0, s0, z0, sc0 = f1, s1, z1, sc1
        fac = sol.safety * max(errn, 1e-10) ** (-(sol.icoeff + sol.pcoeff) / 5) * max(err_prev, 1e-10) ** (sol.pcoeff / 5)
        h *= min(sol.factor_max, max(sol.factor_min, fac))
        err_prev = errn
        if progress is not None:
            progress(_t(u, log_time), stats)
    if not success:
        saves_th.append(np.asarray(y[:-1]))
        saves_E.append(float(y[-1]))
        saves_t.append(_t(u, log_time))
    thetas = np.stack(saves_th)
    log_l, norm = (np.asarray(a) for a in _diag(problem, jnp.asarray(thetas)))
    stats["wall_s"] = _time.perf_counter() - t_start
    stats["sliding_final"] = len(mode.sliding)
    if success:
        result = RESULTS.successful
        reason = (f"reached t1 = {t1:g} ({stats['events']} events: {stats['pattern_changes']} pattern changes, "
                  f"{stats['sliding_entered']} sliding modes entered, {stats['sliding_left']} left)")
    else:
        result = _FAILURES[failure]
    return Trajectory(ts=np.asarray(saves_t), thetas=thetas, loss=np.exp(log_l), log_loss=log_l, norm=norm,
                      stats=stats, result=result, reason=reason, unflatten=problem.unflatten,
                      degree=problem.unflatten(jnp.asarray(thetas[0])).degree,
                      extras={"energy": np.asarray(saves_E), "sliding_units": np.asarray(mode.sliding, np.int64)})


# Failures of the non-smooth solve as RESULTS items: the step budget; a step size underflow (non-finite state); a Zeno
# point (events without progress in time), reported as a step size underflow with the detail in the reason.
_FAILURES = {"max_steps": RESULTS.max_steps_reached, "underflow": RESULTS.step_size_underflow,
             "zeno": RESULTS.step_size_underflow}


def _t(u, log_time):
    return math.expm1(u) if log_time else u


def nonsmooth_flow(model, data, *, loss="square", t1: float, ts=None, n_save: int = 200, time: str = "auto",
                   theta0=None, solver: ClarkeFlow | None = None, rtol: float | None = None,
                   atol: float | None = None, max_steps: int | None = None) -> Trajectory:
    """Gradient flow of a ReLU / leaky-ReLU ``model`` on ``data``: the minimal-norm solution of the differential
    inclusion ``dtheta/dt in -Clarke subdifferential of L`` (module docstring; docs/math.md section 6).

    Arguments:
        model: a kinked TwoLayer, MLP or CNN (``theta(0)``); data: a ``Dataset``; loss: a loss or its name.
        t1: final time; ts: save times (default :func:`homflow.flow.log_times` ``(t1, n_save)``).
        time: ``'linear'``, ``'log'`` (``u = log(1 + t)``) or ``'auto'`` (log when ``t1 > 1e4``).
        theta0: optional flat initial vector overriding ``model``'s parameters.
        solver: a :class:`ClarkeFlow` (default ``ClarkeFlow()``); ``rtol``, ``atol``, ``max_steps`` override its
            fields when given.

    Returns:
        A :class:`Trajectory`; ``extras['energy']`` is ``int_0^t ||dtheta/dt||^2`` at ``ts``.

    Raises:
        ValueError: on bad arguments or a network without kinks.
    """
    from ._integrate import check_times

    sol = solver or ClarkeFlow()
    upd = {k: v for k, v in (("rtol", rtol), ("atol", atol), ("max_steps", max_steps)) if v is not None}
    if upd:
        sol = dataclasses.replace(sol, **upd)
    if not is_kinked(model):
        raise ValueError(f"`model` must have a kinked degree-1 activation (relu / leaky_relu); got "
                         f"{getattr(model, 'activation', None)!r}. Use gradient_flow for smooth networks.")
    objective, theta = _setup(model, data, loss, theta0)
    eps = float(jnp.finfo(theta.dtype).eps)
    if sol.rtol < 10 * eps:
        raise ValueError(f"`rtol` must be >= 10 eps = {10 * eps:.3g} for {theta.dtype}; got {sol.rtol!r}.")
    t1, ts = check_times(t1, ts, n_save)
    if time not in ("auto", "linear", "log"):
        raise ValueError(f"`time` must be 'auto', 'linear' or 'log'; got {time!r}.")
    log_time = time == "log" or (time == "auto" and t1 > 1e4)
    problem = make_kinked(objective, model)
    return integrate_nonsmooth(problem, theta, ts, t1, log_time=log_time, solver=sol)


# ----------------------------------------------------------------------------------------------------------------------
# The solver object of the one integrate path (homflow.flow.integrate / gradient_flow).

from ._solvers import AbstractFlowSolver, FlowOutput  # noqa: E402


class Clarke(AbstractFlowSolver):
    """The non-smooth flow as a solver of :func:`homflow.flow.integrate`: chosen automatically there for networks with
    kinked degree-1 activations (ReLU, leaky ReLU). Members of a batch run one after the other (map).

    Arguments:
        rtol, atol: tolerances (``atol=None``: ``0.1 rtol ||theta(0)||`` per member).
        options: a :class:`ClarkeFlow` with the event and mode options (its own rtol / atol / max_steps are replaced
            by these and by ``integrate``'s ``max_steps``).

    ``stats`` of each member add ``events``, ``pattern_changes``, ``sliding_entered``, ``sliding_left``,
    ``max_sliding``, ``sliding_final``, ``num_locate_steps``, ``max_constraint_residual`` and ``energy`` (``int_0^t_end
    ||dtheta/dt||^2``, to check ``L(0) - L(t_end)``).
    """

    name: ClassVar[str] = "clarke"
    rtol: float = 1e-8
    atol: float | None = None
    options: ClarkeFlow = ClarkeFlow()

    def run(self, field, y0, t0, t1, save_ts, atol, events, max_steps):
        if events is not None:
            raise ValueError("events (LossBelow, NormAbove, NormBelow) are not supported by the non-smooth solver "
                             "`Clarke` yet; stop at a time t1 instead, or pass a smooth solver explicitly.")
        if float(t0) != 0.0:
            raise ValueError(f"the non-smooth solver starts at t0 = 0; got {t0!r}.")
        problem = field.problem
        log_time = bool(field.log_time)
        save_ts = np.asarray(save_ts, float)
        ts = np.expm1(save_ts) if log_time else save_ts
        t1_t = math.expm1(t1) if log_time else float(t1)
        B, S, P = y0.shape[0], save_ts.size, y0.shape[1]
        ys = np.full((B, S, P), np.nan)
        n_saved, t_end, y_end = np.zeros(B, int), np.zeros(B), np.zeros((B, P))
        results, stats = [], []
        for b in range(B):
            th = jnp.asarray(y0[b])
            kp = make_kinked(problem, problem.model(th))
            opts = dataclasses.replace(self.options, rtol=self.rtol, atol=float(atol[b]), max_steps=int(max_steps))
            tr = integrate_nonsmooth(kp, th, ts, t1_t, log_time=log_time, solver=opts)
            k = len(tr.ts) - (0 if tr.success else 1)
            ys[b, :k] = tr.thetas[:k]
            n_saved[b] = k
            te = float(tr.ts[-1])
            t_end[b] = math.log1p(te) if log_time else te
            y_end[b] = tr.thetas[-1]
            st = dict(tr.stats)
            st["energy"] = float(tr.extras["energy"][-1])
            st["reason_detail"] = tr.reason
            stats.append(st)
            results.append(tr.result)
        return FlowOutput(ys=ys, n_saved=n_saved, t_end=t_end, y_end=y_end, results=results,
                          event=np.full(B, -1), stats=stats)


def kinked_default(problem, theta0) -> bool:
    """True when ``problem``'s network (at ``theta0``, (P,) or (B, P)) has kinked degree-1 activations: the flow is a
    differential inclusion and :class:`Clarke` is the solver (``integrate`` switches to it from the default)."""
    th = jnp.asarray(theta0)
    return is_kinked(problem.model(th[0] if th.ndim == 2 else th))
