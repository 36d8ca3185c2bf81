"""The compiled core of the non-smooth flow (flow/_nonsmooth.py): many Dormand-Prince 5(4) steps of one mode in one
``lax.while_loop``, with error control, the rounding-level projection onto the sliding set, event detection and the
location of the earliest event (secant / regula falsi on the step size), returning to the host only at a save time, a
located event (pattern change, sliding entry or exit), a step size underflow or the step budget of one call.

The host (``integrate_nonsmooth``) decides the new mode at an event (BVLS over the kink slopes, ``clarke_min_norm``):
that is the only part that needs an active-set solver and happens once per event. Everything per step runs here.

Event functions are normalised so that every one has tolerance 1: ``sign_e z_e / (kink_tol scale_e)`` for units outside
the sliding set and ``min(s_e - alpha, 1 - s_e) / slope_tol`` for sliding slopes; an event has happened when one is
below ``-1`` and is located when the target's value lies in ``[-1, 1]`` with no other below ``-1``.
"""

from __future__ import annotations

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._block_factor import BlockNormals
from ._clarke import KinkedProblem, gram_solve, jit, mode_slopes
from ._stiff import RKC_STABILITY, rkc_recurrence, rkc_stages, rkc_start, spectral_radius

__all__ = ["advance", "unpack", "RUN", "SAVE", "EVENT", "UNDERFLOW", "BUDGET", "project_sliding", "METHODS"]

# the explicit pair; Runge-Kutta-Chebyshev for stiff stretches (flow/_stiff.py); the linearly implicit
# Rosenbrock pair of MATLAB's ode23s for stretches too stiff even for RKC's stage budget
METHODS = ("dopri5", "rkc", "ros2")

RUN, SAVE, EVENT, UNDERFLOW, BUDGET = 0, 1, 2, 3, 4

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


def project_sliding(problem, theta, idx, valid, iters, fac=None):
    """Gauss-Newton projection onto ``{z_e(theta) = 0, e in S}`` with the minimal-norm correction
    ``-N^T (N N^T)^+ z_S`` (``N`` the kink normals): exact in one step for two-layer nets, whose constraints are linear
    (``fac``: their :class:`~homflow.flow._clarke.SlidingFactor`, formed once per mode). Deeper nets: up to
    ``iters >= 1`` steps; a step after the first only while some ``|z_e|`` is above rounding (``64 eps`` of its bound),
    which one step from a state a step's local error off the set almost always reaches (the residual is quadratic in
    the offset).
    Returns ``(theta, z_S before, z_S after)``."""
    def zS(th):
        z, sc = problem.preactivations(th)
        return jnp.where(valid, z[idx], 0.0), jnp.where(valid, sc[idx], 0.0)

    def step(theta, z):
        if fac is not None:
            return theta - problem.sliding_correction(fac, z)
        _, rmv, G = problem.normal_ops(theta, idx, valid)
        return theta - rmv(gram_solve(None, z, valid, G=G))

    before, _ = zS(theta)
    theta = step(theta, before)
    z, sc = zS(theta)
    for _ in range(iters - 1):  # further steps only while a residual is above rounding
        theta = jax.lax.cond(jnp.any(jnp.abs(z) > 64 * jnp.finfo(z.dtype).eps * sc), step, lambda th, _: th, theta, z)
        z, sc = zS(theta)
    return theta, before, z


def _aug_field(problem, y, u, log_time, signs, idx, valid, fac=None, slopes=True):
    """``(dy/du, s)``: the velocity with the energy's rate appended, and the sliding slopes (``slopes=False``: a
    stage that needs none, see :meth:`~homflow.flow._clarke.KinkedProblem.sliding_grad`)."""
    v, rate, s = problem.velocity(y[:-1], u if log_time else jnp.zeros_like(u), signs, idx, valid, fac, slopes)
    return jnp.concatenate([v, rate[None]]), s


def _stage_field(problem, log_time, signs, idx, valid, fac=None):
    """The mode's augmented field ``F(y, u)`` as an inner stage evaluates it (no slopes): what every stage of the
    Runge-Kutta, Chebyshev and Rosenbrock steps, the Rosenbrock Jacobian and the power iteration evaluate."""
    return lambda yy, uu: _aug_field(problem, yy, uu, log_time, signs, idx, valid, fac, False)[0]


def as_factor(fac, idx, valid):
    """A mode's factor as the field takes it: a one-hidden-layer net's :class:`BlockNormals` formed into its
    block-diagonal factor for the set ``(idx, valid)``; anything else as it is."""
    return fac.factor(idx, valid) if isinstance(fac, BlockNormals) else fac


def slot_adjoint(problem, theta, signs, idx, valid, alpha):
    """``dF/dh_e`` (the adjoint of the unit's output, :meth:`KinkedProblem.grad_and_adjoint`) at every slot of the
    sliding set, 0 at invalid slots, for a :class:`KinkedProblem` with one hidden layer; zeros for other problems.
    There the velocity depends on a sliding slope through ``dg/ds_e = c_e grad z_e``, so ``dz_S/ds_S = -G diag(c)``
    (``G`` the Gram matrix of the set's normals) and unit ``e``'s own coupling, the others held on their kinks, is
    ``-c_e / (G^-1)_ee``: its sliding mode attracts from both sides when ``c_e > 0`` and repels when ``c_e < 0``
    (both one-sided fields point away from the kink; the slope can stay inside ``[alpha, 1]`` through the change,
    e.g. when the neuron's output weight passes through 0). Deeper nets: zeros (their normals depend on the slopes
    below them, so the sign of ``c_e`` alone does not decide)."""
    if not (isinstance(problem, KinkedProblem) and problem.n_hidden == 1) or idx.shape[0] == 0:
        return jnp.zeros(idx.shape, theta.dtype)
    S = problem.slopes(signs, idx, valid, jnp.full(idx.shape, 0.5 * (1.0 + alpha), theta.dtype))
    c = problem.grad_and_adjoint(theta, S)[2]
    return jnp.where(valid, c[idx], 0.0)


def _err_norm_and_preacts(problem, y, y1, err, rtol, atol):
    """The RMS of the local error ``err`` over the error-controlled part of ``theta`` (``problem.n_error`` entries,
    default all of ``theta``) scaled by ``atol + rtol max(|y0|, |y1|)``, and the pre-activations at ``y1`` with their
    bounds: the common tail of every step (a joint problem controls the error of its first part only)."""
    ne = getattr(problem, "n_error", y.shape[0] - 1)
    scale = atol + rtol * jnp.maximum(jnp.abs(y[:ne]), jnp.abs(y1[:ne]))
    errn = jnp.sqrt(jnp.mean((err[:ne] / scale) ** 2))
    z1, sc1 = problem.preactivations(y1[:-1])
    return errn, z1, sc1


def _rk_step(problem, y, f0, u, h, log_time, signs, idx, valid, rtol, atol, fac=None):
    """One DOPRI5 step: ``(y1, f1, err_norm, z1, scale1, s1, rho)``; the error norm is the RMS of the local error of the
    error-controlled part of ``theta`` scaled by ``atol + rtol max(|y0|, |y1|)``; ``rho = ||k7 - k6|| / ||y1 - y6||``
    is the pair's free estimate of the field's spectral radius along the step (Hairer & Wanner's stiffness test)."""
    dtype = y.dtype
    A, C, E = jnp.asarray(_A, dtype), jnp.asarray(_C, dtype), jnp.asarray(_E, dtype)
    ks = jnp.zeros((7,) + y.shape, dtype).at[0].set(f0)
    F = _stage_field(problem, log_time, signs, idx, valid, fac)

    def body(ks, i):  # the inner stages need no slopes
        return ks.at[i].set(F(y + h * (A[i] @ ks), u + C[i] * h)), None

    ks, _ = jax.lax.scan(body, ks, jnp.arange(1, 6))
    y1 = y + h * (A[6] @ ks)
    f1, s1 = _aug_field(problem, y1, u + h, log_time, signs, idx, valid, fac)  # FSAL: the next step's first stage
    ks = ks.at[6].set(f1)
    err = h * (E @ ks)
    errn, z1, sc1 = _err_norm_and_preacts(problem, y, y1, err, rtol, atol)
    ne = getattr(problem, "n_error", y.shape[0] - 1)
    y6 = y + h * (A[5] @ ks)
    num, den = jnp.linalg.norm((ks[6] - ks[5])[:ne]), jnp.linalg.norm((y1 - y6)[:ne])
    rho = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    return y1, ks[6], errn, z1, sc1, s1, rho


def _ros_energy(y, y1, k1, k2, u, h, log_time):
    """``y1`` with its energy (last entry) advanced by the integral of ``||dtheta/du||^2 du/dt`` along the step's own
    path, the continuous extension of Shampine & Reichelt ``y(u + s h) = y + h (s (1 - s) k1 + s (s - 2 d) k2) /
    (1 - 2 d)``: its velocity ``((1 - 2 s) k1 + 2 (s - d) k2) / (1 - 2 d)`` (exact to ``O(h^2)`` at both ends, ``k2`` at
    the middle) squared is quadratic in ``s``, integrated by Simpson's rule with ``du/dt = exp(-u)`` in log time.

    Why the path's velocity and not the rate ``||grad L||^2`` at the states (what DOPRI5 integrates): where
    ``h rho >> 1`` an accepted state lies off the slow path by up to the tolerance, ``delta``, in stiff directions, and
    the gradient there gains ``lambda delta``: measured on the two-layer sweep's problem 1 in log time near t = 6.5e4
    (134 steps at rtol 1e-8, 21 sliding units), the rate at the step ends was 2.6x the true mean (trapezoidal rule
    2.9e-5 of energy, Simpson's rule with the midpoint stage 3.5e-5, where the loss fell by 1.10e-5 and the flow at
    rtol 1e-12 counts 1.10e-5), while the steps' own velocity gave 1.1012e-5 (the same path: theta agreed with rtol
    1e-12's to 3e-5). ``W^-1`` damps the stiff part of ``k1`` and ``k2`` by ``1 + h d lambda``, so the velocity
    carries no such error; the method's own energy row (``grad`` of the rate times ``k2 - k1``) carries the stiff
    spectrum and a Hermite rule with the rate's derivatives the same way. Its local error is ``O(h^3)``, the method's
    own order."""
    c = 1.0 / (1.0 - 2.0 * _ROS_D)
    v0 = c * (k1[:-1] - 2.0 * _ROS_D * k2[:-1])
    v1 = c * ((2.0 - 2.0 * _ROS_D) * k2[:-1] - k1[:-1])
    w = (lambda s: jnp.exp(-(u + s * h))) if log_time else (lambda s: jnp.ones_like(u))
    e = (h / 6.0) * (w(0.0) * jnp.sum(v0 * v0) + 4.0 * w(0.5) * jnp.sum(k2[:-1] * k2[:-1]) + w(1.0) * jnp.sum(v1 * v1))
    return y1.at[-1].set(y[-1] + e)


def _rkc_energy(y, y1, r0, r1, q, u, h, log_time):
    """``y1`` with its energy advanced by Simpson's rule over the rate, its middle value the step's mean velocity
    ``q = (theta1 - theta0) / h`` squared (times ``du/dt`` at the middle: ``O(h^2)`` from the rate there, like the
    method), its ends the rates at the step's ends, in place of the Chebyshev recurrence's own energy (its stages are
    off the path; measured on the two-layer sweep's problem 1 in log time, a call of 217 steps near t = 22 with the
    loss down by 0.393: the recurrence's energy was 1.0e-6 short of a DOPRI5 flow at rtol 1e-12, this rule 3.8e-8 (the
    paths' own difference), the trapezoidal rule 1.4e-6 over, the mean velocity alone 6.6e-7 short). ``q`` comes from
    the recurrence run on the increments divided by ``h`` (:func:`_rkc_step`), not from ``(theta1 - theta0) / h``:
    the event location's trials reach ``h ~ 1e-27``, where the difference is rounding and dividing it by ``h`` counted
    2.6e-2 of energy in one call (depth-3 sweep problem 1, linear time)."""
    w = jnp.exp(-(u + 0.5 * h)) if log_time else jnp.ones_like(u)
    return y1.at[-1].set(y[-1] + (h / 6.0) * (r0 + r1 + 4.0 * w * jnp.sum(q * q)))


def _rkc_step(problem, y, f0, u, h, s, log_time, signs, idx, valid, rtol, atol, fac=None):
    """One step of the second-order Runge-Kutta-Chebyshev method with ``s`` stages (flow/_stiff.py, rkc.f's damping
    2/13): stable for ``h rho <= 0.653 s^2``, so a stiff stretch costs ``~sqrt(1.54 h rho)`` field evaluations per step
    instead of ``h rho / 3.3`` Dormand-Prince steps. Every stage is an affine combination of ``y`` and field values,
    so the linear invariants of a two-layer sliding mode are kept as by DOPRI5. Returns what :func:`_rk_step` returns,
    with the error estimate ``0.8 (y - y1) + 0.4 h (f0 + f1)`` of rkc.f and ``rho = 0``."""
    w0, w1, coef = rkc_start(s, y.dtype)
    yjm1 = y + (h * coef[0]) * f0
    F = _stage_field(problem, log_time, signs, idx, valid, fac)

    def body(j, c):
        (yjm1, yjm2, qjm1, qjm2), coef = c
        mu, nu, mus, ajm1, new = rkc_recurrence(w0, w1, coef)
        fj = F(yjm1, u + h * coef[0])
        yj = mu * yjm1 + nu * yjm2 + (1.0 - mu - nu) * y + (h * mus) * (fj - ajm1 * f0)
        qj = mu * qjm1 + nu * qjm2 + mus * (fj[:-1] - ajm1 * f0[:-1])  # (yj - y) / h, free of cancellation
        return (yj, yjm1, qj, qjm1), new

    q0 = jnp.zeros_like(f0[:-1])
    (y1, _, q, _), _ = jax.lax.fori_loop(2, s + 1, body, ((yjm1, y, coef[0] * f0[:-1], q0), coef))
    f1, s1 = _aug_field(problem, y1, u + h, log_time, signs, idx, valid, fac)
    err = 0.8 * (y - y1) + 0.4 * h * (f0 + f1)
    y1 = _rkc_energy(y, y1, f0[-1], f1[-1], q, u, h, log_time)
    errn, z1, sc1 = _err_norm_and_preacts(problem, y, y1, err, rtol, atol)
    return y1, f1, errn, z1, sc1, s1, jnp.zeros((), y.dtype)


_ROS_D = 1.0 / (2.0 + np.sqrt(2.0))
_ROS_E32 = 6.0 + np.sqrt(2.0)


def _ros_jac(problem, y, u, log_time, signs, idx, valid, fac=None):
    """The Rosenbrock step's ``J = df/dy`` (forward mode, one JVP per entry of ``y``) and, in log time, ``df/du``."""
    F = _stage_field(problem, log_time, signs, idx, valid, fac)
    J = jax.jacfwd(F)(y, u)
    T = jax.jvp(lambda uu: F(y, uu), (u,), (jnp.ones_like(u),))[1] if log_time else jnp.zeros_like(y)
    return J, T


def _ros_step(problem, y, f0, u, h, log_time, signs, idx, valid, rtol, atol, fac=None, JT=None):
    """One step of the modified Rosenbrock pair of Shampine & Reichelt (SIAM J. Sci. Comput. 18, 1997; MATLAB's
    ``ode23s``): second order, L-stable, with a third-order error estimate, three field evaluations, one Jacobian
    ``J = df/dy`` (forward mode, one JVP per parameter) and one LU of ``W = I - h d J`` (``d = 1/(2 + sqrt 2)``) per
    step. Its step is limited by accuracy only, so a state at rest in a stiff late phase (log time multiplies the
    Hessian's spectrum by ``1 + t``) is crossed in a few steps. ``W`` maps the tangent space of a two-layer sliding
    mode (constant kink normals) to itself, so the stages keep the linear invariants as the explicit pairs do.
    ``JT``: ``(J, T)`` of :func:`_ros_jac` at ``(y, u)`` when known (they do not depend on ``h``: a rejected step and
    the trials of an event location reuse them). Returns what :func:`_rk_step` returns (``rho = 0``)."""
    F = _stage_field(problem, log_time, signs, idx, valid, fac)
    J, T = _ros_jac(problem, y, u, log_time, signs, idx, valid, fac) if JT is None else JT
    d = _ROS_D
    W = jnp.eye(y.shape[0], dtype=y.dtype) - (h * d) * J
    lu = jax.scipy.linalg.lu_factor(W)
    def solve(b):  # with one step of iterative refinement: W is ill-conditioned exactly where the step is long
        x = jax.scipy.linalg.lu_solve(lu, b)
        return x + jax.scipy.linalg.lu_solve(lu, b - W @ x)
    k1 = solve(f0 + (h * d) * T)
    f1 = F(y + 0.5 * h * k1, u + 0.5 * h)
    k2 = solve(f1 - k1) + k1
    y1 = y + h * k2
    f2, s2 = _aug_field(problem, y1, u + h, log_time, signs, idx, valid, fac)
    y1 = _ros_energy(y, y1, k1, k2, u, h, log_time)
    k3 = solve(f2 - _ROS_E32 * (k2 - f1) - 2.0 * (k1 - f0) + (h * d) * T)
    err = (h / 6.0) * (k1 - 2.0 * k2 + k3)
    errn, z1, sc1 = _err_norm_and_preacts(problem, y, y1, err, rtol, atol)
    return y1, f2, errn, z1, sc1, s2, jnp.zeros((), y.dtype)


def _power(problem, y, f0, u, v, iters, log_time, signs, idx, valid, fac=None):
    """``iters`` steps of the nonlinear power method on the mode's field (:func:`homflow.flow._stiff.spectral_radius`,
    rkc.f's ``rkcrho``, a batch of one), warm-started from ``v``; ``theta`` only (the energy is not fed back).
    Returns ``(rho, v)``."""
    F = _stage_field(problem, log_time, signs, idx, valid, fac)

    def f(_, th):
        return F(jnp.concatenate([th[0], y[-1:]]), u)[None, :-1]

    rho, v = spectral_radius(f, u, y[None, :-1], f0[None, :-1], v[None], iters)
    return rho[0], v[0]


def _event_values(signs, in_S, valid, z, sc, s, kt, st, alpha):
    tiny = jnp.finfo(z.dtype).tiny
    cross = jnp.where(in_S, jnp.inf, signs.astype(z.dtype) * z / (kt * jnp.maximum(sc, tiny)))
    slide = jnp.where(valid, jnp.minimum(s - alpha, 1.0 - s) / st, jnp.inf)
    return jnp.concatenate([cross, slide])


def _hermite_guess(problem, y0, f0, y1, f1, hh, t, e0, e1, signs, kt, tau, iters=8):
    """Where the crossing event ``t`` (a unit outside the sliding set) happens on the cubic Hermite interpolant of the
    step from ``(y0, f0)`` to ``(y1, f1)`` over ``[0, hh]``: the Illinois method on ``sign_t z_t / (kt scale_t) - tau``
    of the interpolated ``theta`` (``tau``: the aim, :func:`_aim`), from ``e0 - tau > 0`` at 0 to ``e1 - tau < 0`` at
    ``hh`` (one forward pass per iteration, no field evaluation). The first trial of the event location (a
    field-evaluating step) then starts within the interpolant's error of the event instead of at the secant of the two
    ends. NaN when ``t`` is a slope event or ``e0 <= tau``."""
    N = signs.shape[0]
    tt = jnp.minimum(t, N - 1)
    tiny = jnp.finfo(y0.dtype).tiny
    th0, th1, d0, d1 = y0[:-1], y1[:-1], hh * f0[:-1], hh * f1[:-1]

    def g(s):
        s2, s3 = s * s, s * s * s
        th = (2 * s3 - 3 * s2 + 1) * th0 + (s3 - 2 * s2 + s) * d0 + (3 * s2 - 2 * s3) * th1 + (s3 - s2) * d1
        z, sc = problem.preactivations(th)
        return signs[tt].astype(y0.dtype) * z[tt] / (kt * jnp.maximum(sc[tt], tiny)) - tau

    def body(_, c):
        a, ga, b, gb, side = c
        m = jnp.clip((a * gb - b * ga) / jnp.where(gb != ga, gb - ga, 1.0), a, b)
        m = jnp.where((m <= a) | (m >= b), 0.5 * (a + b), m)
        gm = g(m)
        left = gm > 0  # the root lies in [m, b]
        # Illinois: halve the value of the end kept twice in a row
        ga_n = jnp.where(left, gm, jnp.where(side == -1, 0.5 * ga, ga))
        gb_n = jnp.where(left, jnp.where(side == 1, 0.5 * gb, gb), gm)
        return (jnp.where(left, m, a), ga_n, jnp.where(left, b, m), gb_n, jnp.where(left, 1, -1))

    one = jnp.ones((), y0.dtype)
    a, ga, b, gb, _ = jax.lax.fori_loop(0, iters, body, (0 * one, e0 - tau, one, jnp.minimum(e1 - tau, -1.0), 0))
    s = jnp.where(jnp.abs(ga) < jnp.abs(gb), a, b)
    ok = (t < N) & (e0 > tau) & (s > 0) & (s < 1)
    return jnp.where(ok, s * hh, jnp.nan)


def _aim(e_start):
    """The event value the location aims at, given the target's value ``e_start`` at the start of the bracket: 0
    (the kink, or the slope bound) when the start is before the band ``|ev| <= 1`` that counts as located, else
    halfway between the start and the band's far edge -1. A step that starts inside the band (a unit freed at its
    kink, ``z = 0``; a sliding slope a rounding inside its bound) and crosses the edge soon after: the secant through
    the start's value clipped at 0 aimed at the start itself and crept to it (measured on a deep net's unit freed at
    its slope bound, a quadratic start: ~10 trials for an event 2e-10 into a 7e-4 step; 3-4 with the aim)."""
    return jnp.where(e_start > 0, 0.0, 0.5 * (jnp.maximum(e_start, -1.0) - 1.0))


def _pick(ev_a, ev_b, hit):
    """The entry of ``hit`` whose linear interpolation between ``ev_a`` (at 0) and ``ev_b`` (at 1) crosses first."""
    ea = jnp.maximum(ev_a, 0.0)
    den = ea - ev_b
    tl = jnp.where(den > 0, ea / jnp.where(den > 0, den, 1.0), 0.0)
    return jnp.argmin(jnp.where(hit, tl, jnp.inf)).astype(jnp.int32)


class Controls(eqx.Module):
    """Scalars of one solve (traced, so changing them does not recompile)."""

    rtol: jax.Array
    atol: jax.Array
    kt: jax.Array
    st: jax.Array
    alpha: jax.Array
    pcoeff: jax.Array
    icoeff: jax.Array
    safety: jax.Array
    factor_min: jax.Array
    factor_max: jax.Array
    max_locate: jax.Array
    rho_every: jax.Array
    s_max: jax.Array
    s_switch: jax.Array  # RKC steps with more stages than this count toward the Rosenbrock rung
    switch_after: jax.Array  # end the call after this many limited steps, if most are: the host switches up
    stiff_ratio: jax.Array
    nonstiff_ratio: jax.Array


@partial(jit, static_argnames=("log_time", "project", "proj_iters", "crossings", "method"))
def advance(problem, y, u, h, err_prev, u_stop, signs, idx, valid, ctl: Controls, n_max, project_first,
            log_time: bool, project: bool, proj_iters: int, crossings: bool = False, fac=None,
            method: str = "dopri5", v_rho=None, rho_iters0=None, st_slot=None):
    """Integrate the mode ``(signs, idx, valid)`` from ``(u, y)`` with proposed step ``h`` until ``u_stop`` (status
    ``SAVE``), a located event (``EVENT``), a step size underflow (``UNDERFLOW``) or ``n_max`` attempted steps
    (``BUDGET``). ``project_first``: first project ``y`` onto the sliding set's kink surfaces (after a mode change).
    ``n_max = 0`` only evaluates the mode at ``y`` (``f0``, ``s0``, ``z0``, ``scale0``): the host's mode decisions
    use this, so that the field is compiled once per capacity.

    ``crossings``: a located event that is a *transversal crossing* is passed inside the loop instead of returning to
    the host: exactly one unit outside the sliding set is within ``10 kink_tol`` of its kink (the target), the mode's
    field moves it across (``sign_e dz_e/dt < -kink_tol scale_e ||v|| / ||theta||``), the field of the mode with its
    sign flipped moves it on across by the same margin, every sliding slope of the flipped mode stays in
    ``[alpha, 1]`` (within ``slope_tol``) and no other event value of the flipped mode is below ``-1``. That is the
    host's mode decision in the only case where it is a pure flip (the minimal-norm element has the target's slope at
    a bound and both one-sided fields agree); anything else (several units at kinks, a unit whose fields point into
    the kink, a sliding slope at a bound) returns as before. ``signs`` (the final pattern) and ``n_cross`` are returned.

    ``fac``: a :class:`~homflow.flow._block_factor.BlockNormals` (nets with one hidden layer: ``idx`` / ``valid`` are
    then its slots, and the block-diagonal factor of the sliding set is formed here), or the sliding set's
    :class:`~homflow.flow._clarke.SlidingFactor` (``problem.sliding_factor``) when its kink
    normals do not move with ``theta`` (one hidden layer): the host forms it once per sliding set, and no field
    evaluation or projection here forms a Gram matrix. ``None``: the normals are recomputed at every evaluation.

    ``method``: ``'dopri5'`` (Dormand-Prince 5(4)) or ``'rkc'`` (Runge-Kutta-Chebyshev, for stretches where DOPRI5's
    step is limited by stability, not accuracy: ``h rho`` near its bound 3.3). In RKC mode the spectral radius is
    estimated at the start by ``rho_iters0`` power iterations warm-started from ``v_rho`` (shape of ``theta``) and
    re-estimated (4 iterations) every ``ctl.rho_every`` accepted steps; the estimate is multiplied by 1.2 (rkc.f) and
    the stage count ``s`` chosen per step (at most ``ctl.s_max``, the step shortened to fit). In DOPRI5 mode
    ``n_stiff`` counts the accepted steps with ``h rho > ctl.stiff_ratio`` (``rho`` the pair's free estimate), in RKC
    mode the accepted steps shortened to fit ``s_max`` stages or taking more than ``ctl.s_switch`` (the cost of a
    Rosenbrock step in evaluations); ``n_easy`` in RKC mode the accepted 2-stage steps with
    ``h rho < ctl.nonstiff_ratio``, in Rosenbrock mode the steps RKC would take with under ``s_switch / 2`` stages:
    the host switches on them.

    ``st_slot``: the slope tolerance of every slot of ``idx`` where it exceeds ``ctl.st`` (a sliding slope whose
    rounding sensitivity exceeds ``slope_tol``, measured by the host; ``_Driver.slope_noise``).

    Returns a dict of the state (``y``, ``u``, ``h``, ``err_prev``), the event (``h_event`` from the returned ``u``,
    ``h_step``: the step that saw it, ``target``, ``y_event``, ``z_event``, ``scale_event``), the start values
    (``y0`` after the projection, ``f0``, ``s0``, ``z0``, ``scale0``, the slots' adjoints ``c0``,
    :func:`slot_adjoint`) and counters."""
    fac = as_factor(fac, idx, valid)  # a one-hidden-layer net's block-diagonal factor is formed here per call
    dtype = y.dtype
    # the slope tolerance of every slot: ctl.st, or more for a slope that rounding cannot resolve to it (host)
    st = ctl.st if st_slot is None else jnp.maximum(ctl.st, jnp.asarray(st_slot, dtype))
    N = signs.shape[0]
    in_S = jnp.zeros(N, bool).at[idx].max(valid)
    eps = jnp.finfo(dtype).eps
    tiny_h = 16 * eps
    zero = jnp.zeros((), dtype)
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731

    def proj(y1, sc1):
        th, before, after = project_sliding(problem, y1[:-1], idx, valid, proj_iters, fac)
        scS = jnp.maximum(jnp.where(valid, sc1[idx], 1.0), jnp.finfo(dtype).tiny)
        return jnp.concatenate([th, y1[-1:]]), jnp.max(jnp.abs(before) / scS), jnp.max(jnp.abs(after) / scS)

    def no_proj(y1, sc1):
        return y1, zero, zero

    if project:
        y, dr0, rs0 = jax.lax.cond(project_first & jnp.any(valid), proj, no_proj, y,
                                   problem.preactivations(y[:-1])[1])
    else:
        dr0, rs0 = zero, zero
    f0, s0 = _aug_field(problem, y, u, log_time, signs, idx, valid, fac)
    z0, sc0 = problem.preactivations(y[:-1])
    c0 = slot_adjoint(problem, y[:-1], signs, idx, valid, ctl.alpha)  # repelling modes (ClarkeFlow.repelling)
    y0 = y
    stiff = method == "rkc"
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")
    order_q = 5.0 if method == "dopri5" else 3.0  # the controller's exponent: 1 / (order of the error estimate)
    n_ev0 = i32(1)
    if method != "dopri5":
        v_rho = jnp.zeros(y.shape[0] - 1, dtype).at[0].set(1.0) if v_rho is None else v_rho
        it0 = i32(20) if rho_iters0 is None else rho_iters0
        rho, v_rho = _power(problem, y, f0, u, v_rho, it0, log_time, signs, idx, valid, fac)
        rho = 1.2 * rho
        n_ev0 = n_ev0 + it0
    else:
        rho, v_rho = zero, jnp.zeros(y.shape[0] - 1, dtype)
    ev0 = _event_values(signs, in_S, valid, z0, sc0, s0, ctl.kt, st, ctl.alpha)
    at_stop = u_stop - u <= tiny_h * jnp.maximum(jnp.abs(u), 1.0)

    c = dict(y=y, f0=f0, ev0=ev0, u=u, h=h, err_prev=err_prev, status=jnp.where(at_stop, SAVE, RUN).astype(jnp.int32),
             signs=signs, n_cross=i32(0),
             locating=jnp.asarray(False), n_att=i32(0), n_acc=i32(0), n_rej=i32(0), n_loc=i32(0),
             drift=dr0, resid=rs0, last_h=h,
             rho=rho, v_rho=v_rho, since_rho=i32(0), n_ev=n_ev0, n_stiff=i32(0), n_easy=i32(0), s_last=i32(6),
             capped=jnp.asarray(False),
             # locate state
             h_step=zero, ha=zero, hb=zero, ev_a=ev0, ev_b=ev0, target=i32(0), p1=jnp.zeros(2, dtype),
             p2=jnp.zeros(2, dtype), n_it=i32(0), has_a=jnp.asarray(False), h_guess=jnp.asarray(jnp.nan, dtype),
             ya=y, za=z0, sca=sc0, yc=y, zc=z0, scc=sc0, hc=zero)
    if method == "ros2":  # the Rosenbrock Jacobian and the start (y, u, signs) it belongs to: none yet
        n1 = y.shape[0]
        c.update(J=jnp.zeros((n1, n1), dtype), T=jnp.zeros_like(y), Jy=jnp.full_like(y, jnp.nan), Ju=zero,
                 Js=signs)

    def step_size(c):
        ha, hb, t = c["ha"], c["hb"], c["target"]
        tau = _aim(c["ev_a"][t])
        (h1, e1), (h2, e2) = c["p1"], c["p2"]
        e1, e2 = e1 - tau, e2 - tau
        mid = 0.5 * (ha + hb)
        sec = jnp.where(e2 != e1, h2 - e2 * (h2 - h1) / jnp.where(e2 != e1, e2 - e1, 1.0), mid)
        ea, eb = jnp.maximum(c["ev_a"][t] - tau, 0.0), c["ev_b"][t] - tau
        rf = jnp.where(ea - eb > 0, ha + (hb - ha) * ea / jnp.where(ea - eb > 0, ea - eb, 1.0), mid)
        rf = jnp.where((ha < rf) & (rf < hb), rf, mid)
        h_loc = jnp.where((ha < sec) & (sec < hb), sec, rf)
        hg = c["h_guess"]  # the first trial: the event on the step's Hermite interpolant (_hermite_guess)
        h_loc = jnp.where((c["n_it"] == 0) & (ha < hg) & (hg < hb), hg, h_loc)
        h_adv = jnp.minimum(c["h"], u_stop - c["u"])
        return jnp.where(c["locating"], h_loc, h_adv)

    def re_rho(c):
        r, v = _power(problem, c["y"], c["f0"], c["u"], c["v_rho"], 4, log_time, c["signs"], idx, valid, fac)
        return dict(c, rho=1.2 * r, v_rho=v, since_rho=i32(0), n_ev=c["n_ev"] + 4)

    def body(c):
        hh = step_size(c)
        if stiff:
            c = jax.lax.cond(~c["locating"] & (c["since_rho"] >= ctl.rho_every), re_rho, lambda c: c, c)
            ns, hh_r = rkc_stages(hh, c["rho"], ctl.s_max)
            # a step shortened to fit s_max stages, or one costing more stages than a Rosenbrock step
            c = dict(c, capped=~c["locating"] & ((hh_r < hh) | (ns > ctl.s_switch)))
            hh = jnp.where(c["locating"], hh, hh_r)
            y1, f1, errn, z1, sc1, s1, rho1 = _rkc_step(problem, c["y"], c["f0"], c["u"], hh, ns, log_time,
                                                         c["signs"], idx, valid, ctl.rtol, ctl.atol, fac)
            c = dict(c, n_ev=c["n_ev"] + ns, s_last=ns)
        elif method == "ros2":
            # the Jacobian of the step's start, kept while the start is (rejected steps, event-location trials)
            same = jnp.all(c["Jy"] == c["y"]) & (c["Ju"] == c["u"]) & jnp.all(c["Js"] == c["signs"])

            def fresh(c):
                J, T = _ros_jac(problem, c["y"], c["u"], log_time, c["signs"], idx, valid, fac)
                return dict(c, J=J, T=T, Jy=c["y"], Ju=c["u"], Js=c["signs"], n_ev=c["n_ev"] + y.shape[0])

            c = jax.lax.cond(same, lambda c: c, fresh, c)
            y1, f1, errn, z1, sc1, s1, rho1 = _ros_step(problem, c["y"], c["f0"], c["u"], hh, log_time, c["signs"],
                                                        idx, valid, ctl.rtol, ctl.atol, fac, JT=(c["J"], c["T"]))
            c = dict(c, n_ev=c["n_ev"] + 3)  # three fields (and a Jacobian, one JVP per column, when fresh)
        else:
            y1, f1, errn, z1, sc1, s1, rho1 = _rk_step(problem, c["y"], c["f0"], c["u"], hh, log_time, c["signs"],
                                                       idx, valid, ctl.rtol, ctl.atol, fac)
            c = dict(c, n_ev=c["n_ev"] + 6)
        ev1 = _event_values(c["signs"], in_S, valid, z1, sc1, s1, ctl.kt, st, ctl.alpha)
        hit1 = ev1 < -1.0
        c = jax.lax.cond(c["locating"], locate_update, advance_update, c, hh, y1, f1, errn, z1, sc1, s1, ev1, hit1,
                         rho1)
        if crossings:
            c = jax.lax.cond(c["status"] == EVENT, try_cross, lambda c: c, c)
        return c

    def dz_along(theta, v, sg, s):
        S = mode_slopes(sg, ctl.alpha, idx, valid, s, dtype)
        return jax.jvp(lambda th: problem.preactivations_at(th, S), (theta,), (v,))[1]

    def try_cross(c):
        """The located event as an in-loop sign flip when it is a transversal crossing (docstring), else unchanged."""
        t, sg = c["target"], c["signs"]
        tt = jnp.clip(t, 0, N - 1)
        tiny = jnp.finfo(dtype).tiny
        zc, scc = c["zc"], jnp.maximum(c["scc"], tiny)
        near = ~in_S & (jnp.abs(zc) <= 10 * ctl.kt * scc)
        only = (t < N) & near[tt] & (jnp.sum(near) == 1)
        u_e = c["u"] + c["hc"]
        y_e = c["yc"]
        if project:
            y_e = jax.lax.cond(jnp.any(valid), proj, no_proj, y_e, c["scc"])[0]
        th = y_e[:-1]
        f_old, s_old = _aug_field(problem, y_e, u_e, log_time, sg, idx, valid, fac)
        sg_new = sg.at[tt].set(-sg[tt])
        f_new, s_new = _aug_field(problem, y_e, u_e, log_time, sg_new, idx, valid, fac)
        nth = jnp.maximum(jnp.linalg.norm(th), tiny)
        z_e, sc_e = problem.preactivations(th)
        side = sg[tt].astype(dtype)
        d_old = side * dz_along(th, f_old[:-1], sg, s_old)[tt]
        d_new = side * dz_along(th, f_new[:-1], sg_new, s_new)[tt]
        thr = ctl.kt * jnp.maximum(sc_e[tt], tiny) / nth
        slopes_ok = jnp.all(jnp.where(valid, (s_new >= ctl.alpha - st) & (s_new <= 1.0 + st), True))
        ev_new = _event_values(sg_new, in_S, valid, z_e, sc_e, s_new, ctl.kt, st, ctl.alpha)
        ok = (only & (d_old < -thr * jnp.linalg.norm(f_old[:-1])) & (d_new < -thr * jnp.linalg.norm(f_new[:-1]))
              & slopes_ok & ~jnp.any(ev_new < -1.0) & jnp.all(jnp.isfinite(f_new)))
        hs = c["h_step"]
        h_new = jnp.where(c["hc"] < hs, jnp.maximum(hs - c["hc"], hs / 4), hs)
        h_new = jnp.maximum(h_new, 2 * tiny_h * jnp.maximum(jnp.abs(u_e), 1.0))
        saved = u_stop - u_e <= tiny_h * jnp.maximum(jnp.abs(u_e), 1.0)
        new = dict(c, y=y_e, f0=f_new, ev0=ev_new, u=u_e, h=h_new, locating=jnp.asarray(False), signs=sg_new,
                   n_cross=c["n_cross"] + 1, n_acc=c["n_acc"] + 1, last_h=c["hc"],
                   status=jnp.where(saved, SAVE, RUN).astype(jnp.int32), ya=y_e, za=z_e, sca=sc_e)
        return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, c)

    def advance_update(c, hh, y1, f1, errn, z1, sc1, s1, ev1, hit1, rho1):
        c = dict(c, n_att=c["n_att"] + 1)
        u = c["u"]
        ok = jnp.isfinite(errn) & (errn <= 1.0)
        any_hit = jnp.any(hit1)
        # rejected: shrink
        fac_rej = jnp.where(jnp.isfinite(errn),
                            jnp.maximum(ctl.factor_min,
                                        ctl.safety * jnp.maximum(errn, 1e-10) ** (-(ctl.icoeff + ctl.pcoeff) / order_q)),
                            ctl.factor_min)
        h_rej = hh * fac_rej
        underflow = ~ok & (h_rej <= tiny_h * jnp.maximum(jnp.abs(u), 1.0))
        # event: start locating in [0, hh]
        t0 = _pick(c["ev0"], ev1, hit1)
        ev_t0 = jnp.maximum(c["ev0"][t0], -1.0)
        h_guess = jax.lax.cond(ok & any_hit, lambda: _hermite_guess(problem, c["y"], c["f0"], y1, f1, hh, t0,
                                                                      c["ev0"][t0], ev1[t0], c["signs"], ctl.kt,
                                                                      _aim(c["ev0"][t0])),
                               lambda: jnp.asarray(jnp.nan, dtype))
        loc = dict(locating=jnp.asarray(True), h_step=hh, ha=zero, hb=hh, ev_a=c["ev0"], ev_b=ev1, target=t0,
                   h_guess=h_guess,
                   p1=jnp.stack([zero, ev_t0]), p2=jnp.stack([hh, ev1[t0]]), n_it=i32(0), has_a=jnp.asarray(False),
                   yc=y1, zc=z1, scc=sc1, hc=hh)
        # accepted
        if project:
            y_acc, dr, rs = jax.lax.cond(jnp.any(valid), proj, no_proj, y1, sc1)
        else:
            y_acc, dr, rs = y1, zero, zero
        fac = ctl.safety * jnp.maximum(errn, 1e-10) ** (-(ctl.icoeff + ctl.pcoeff) / order_q) * \
            jnp.maximum(c["err_prev"], 1e-10) ** (ctl.pcoeff / order_q)
        h_acc = hh * jnp.minimum(ctl.factor_max, jnp.maximum(ctl.factor_min, fac))
        h_acc = jnp.where(hh < c["h"], jnp.maximum(h_acc, c["h"]), h_acc)  # a step clipped at u_stop
        u_acc = u + hh
        saved = u_stop - u_acc <= tiny_h * jnp.maximum(jnp.abs(u_acc), 1.0)
        if stiff:
            hot = (c["s_last"] == 2) & (hh * c["rho"] < ctl.nonstiff_ratio)
            counters = dict(n_easy=c["n_easy"] + hot, since_rho=c["since_rho"] + 1, n_stiff=c["n_stiff"] + c["capped"])
        elif method == "ros2":  # a step RKC would take with under half the stages that make it the dearer method
            hot = hh * c["rho"] < (ctl.s_switch.astype(dtype) ** 2 - 1.0) / (4 * RKC_STABILITY)
            counters = dict(n_easy=c["n_easy"] + hot)
        else:
            counters = dict(n_stiff=c["n_stiff"] + (hh * rho1 > ctl.stiff_ratio))
        # ya (za, sca): the state before an event when no trial is, i.e. the start of the step that sees it
        acc = dict(y=y_acc, f0=f1, ev0=ev1, u=u_acc, h=h_acc, err_prev=errn, n_acc=c["n_acc"] + 1, **counters,
                   drift=jnp.maximum(c["drift"], dr), resid=jnp.maximum(c["resid"], rs), last_h=hh,
                   status=jnp.where(saved, SAVE, RUN).astype(jnp.int32), ya=y_acc, za=z1, sca=sc1)
        rej = dict(h=h_rej, n_rej=c["n_rej"] + 1, status=jnp.where(underflow, UNDERFLOW, RUN).astype(jnp.int32))

        def sel(key):
            cur = c[key]
            v = cur
            if key in rej:
                v = jnp.where(~ok, rej[key], v)
            if key in loc:
                v = jnp.where(ok & any_hit, loc[key], v)
            if key in acc:
                v = jnp.where(ok & ~any_hit, acc[key], v)
            return v

        out = {k: sel(k) for k in c}
        return out

    def locate_update(c, hc, y1, f1, errn, z1, sc1, s1, ev_c, hit_c, rho1):
        t = c["target"]
        # a trial whose state or event values are not finite (seen: a field evaluation of a deep net's sliding mode at
        # one trial of a step whose ends were finite) is no bracket end and no located state: the bracket's right end
        # moves to it (something happens before it), its value is kept
        finite = jnp.isfinite(errn) & jnp.all(jnp.isfinite(y1)) & ~jnp.any(jnp.isnan(ev_c))
        ev_c = jnp.where(finite, ev_c, c["ev_b"])
        hit_c = hit_c & finite
        ec = ev_c[t]
        others = jnp.any(hit_c & (jnp.arange(ev_c.shape[0]) != t))
        located = (jnp.abs(ec) <= 1.0) & ~others & finite
        go_b = ~located & ((ec < -1.0) | others | ~finite)
        go_a = ~located & ~go_b
        new_t = jnp.where(others, _pick(c["ev_a"], ev_c, hit_c), t)
        retarget = go_b & (new_t != t)  # never on a non-finite trial: its hits are masked, so new_t == t
        ha = jnp.where(go_a, hc, c["ha"])
        hb = jnp.where(go_b, hc, c["hb"])
        ev_a = jnp.where(go_a, ev_c, c["ev_a"])
        ev_b = jnp.where(go_b, ev_c, c["ev_b"])
        p1 = jnp.where(retarget, jnp.stack([ha, jnp.maximum(ev_a[new_t], -1.0)]), c["p2"])
        p2 = jnp.where(retarget, jnp.stack([hb, ev_b[new_t]]), jnp.stack([hc, ec]))
        p1, p2 = jnp.where(finite, p1, c["p1"]), jnp.where(finite, p2, c["p2"])
        n_it = c["n_it"] + 1
        collapsed = ~located & ~retarget & (hb - ha <= 4 * eps * jnp.maximum(jnp.abs(c["u"]) + hb, 1.0))
        done = located | collapsed | (n_it >= ctl.max_locate)
        has_a = c["has_a"] | go_a
        sel_a = lambda new, old: jnp.where(go_a, new, old)  # noqa: E731
        ya, za, sca = sel_a(y1, c["ya"]), sel_a(z1, c["za"]), sel_a(sc1, c["sca"])
        # at the end: the located trial, else the last trial before the event (best_a), else the last trial; a last
        # trial that is not finite gives the last one before the event, or the step's start (ya starts there, ha = 0)
        use_a = done & ~located & (has_a | ~finite)
        yc = jnp.where(use_a, ya, y1)
        zc = jnp.where(use_a, za, z1)
        scc = jnp.where(use_a, sca, sc1)
        h_out = jnp.where(use_a, ha, hc)
        return dict(c, ha=ha, hb=hb, ev_a=ev_a, ev_b=ev_b, target=new_t, p1=p1, p2=p2, n_it=n_it, has_a=has_a,
                    ya=ya, za=za, sca=sca, yc=yc, zc=zc, scc=scc, hc=h_out, n_loc=c["n_loc"] + 1,
                    status=jnp.where(done, EVENT, RUN).astype(jnp.int32))

    def cond(c):
        # a call of mostly limited steps ends after ctl.switch_after of them, so that the host switches up at once
        # (not after n_max steps: 20,000 RKC steps cut to s_max stages took 77 s)
        switch = (c["n_stiff"] >= ctl.switch_after) & (2 * c["n_stiff"] >= c["n_acc"]) & ~c["locating"]
        return (c["status"] == RUN) & (c["n_att"] + c["n_loc"] < n_max) & ~switch

    c = jax.lax.while_loop(cond, body, c)
    budget = c["status"] == RUN
    status = jnp.where(budget, BUDGET, c["status"])
    # a budget stop while locating: the next call retries the whole step from its start (nothing was accepted)
    floats = dict(u=c["u"], h=jnp.where(budget & c["locating"], c["h_step"], c["h"]), err_prev=c["err_prev"],
                  last_h=c["last_h"], h_event=c["hc"], h_step=c["h_step"], drift=c["drift"], resid=c["resid"],
                  rho=c["rho"])
    ints = dict(status=status, target=c["target"], n_att=c["n_att"], n_acc=c["n_acc"], n_rej=c["n_rej"],
                n_loc=c["n_loc"], n_cross=c["n_cross"], n_ev=c["n_ev"], n_stiff=c["n_stiff"], n_easy=c["n_easy"])
    # the scalars travel as two packed vectors (:func:`unpack`): one transfer each instead of one per scalar, which
    # the host pays at every call (several per event)
    return dict(y=c["y"], y_event=c["yc"], z_event=c["zc"], scale_event=c["scc"], y0=y0, f0=f0, s0=s0, z0=z0,
                scale0=sc0, c0=c0, signs=c["signs"], v_rho=c["v_rho"],
                floats=jnp.stack([jnp.asarray(floats[k], dtype) for k in _FLOATS]),
                ints=jnp.stack([jnp.asarray(ints[k], jnp.int32) for k in _INTS]))


_FLOATS = ("u", "h", "err_prev", "last_h", "h_event", "h_step", "drift", "resid", "rho")
_INTS = ("status", "target", "n_att", "n_acc", "n_rej", "n_loc", "n_cross", "n_ev", "n_stiff", "n_easy")


def unpack(out):
    """The host's view of :func:`advance`'s result (after ``jax.device_get``): the packed scalars as Python numbers
    beside the arrays."""
    out = dict(out)
    out.update(zip(_FLOATS, (float(v) for v in out.pop("floats"))))
    out.update(zip(_INTS, (int(v) for v in out.pop("ints"))))
    return out
