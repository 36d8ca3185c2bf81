"""Step functions of the stiff-aware integrator, written for a batch of states ``(B, P)`` at once.

* :func:`dopri5_step`: the Dormand-Prince 5(4) pair (Hairer, Norsett & Wanner, *Solving ODEs I*, II.5) with its free
  stiffness estimate ``||k7 - k6|| / ||y7 - y6||`` and its 4th-order dense output.
* :func:`rkc_step`: the second-order Runge-Kutta-Chebyshev method of Sommeijer, Shampine & Verwer (J. Comput. Appl.
  Math. 88, 1997; the Fortran code ``rkc.f``), damping ``eps = 2/13``, with ``s`` stages per step (per member of the
  batch). Its stability interval on the negative real axis is ``beta(s) ~ 0.653 s^2``: a step of length ``h`` through a
  spectrum ``[-rho, 0]`` needs only ``s ~ sqrt(1.54 h rho)`` gradient evaluations, against ``h rho / 3.3`` Dormand-Prince
  steps (6 evaluations each). The Jacobian of a gradient flow is ``-Hess L``, symmetric, so its spectrum is real and
  lies where Chebyshev methods are stable: no linear algebra, no Hessian, only gradients.
* :func:`spectral_radius`: the nonlinear power method of ``rkc.f`` with finite differences of the vector field (one
  gradient evaluation per iteration, warm-started from the previous direction).
* :func:`dense_eval`: evaluate the interpolant of a step (Dormand-Prince's continuous extension, or the cubic Hermite
  interpolant for RKC steps, both in the same 5-coefficient form).

Everything is pure and jit-friendly; ``f(t, y)`` maps ``t`` of shape ``(B,)`` and ``y`` of shape ``(B, P)`` to ``(B, P)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["dopri5_step", "rkc_step", "rkc_start", "rkc_recurrence", "rkc_stages", "spectral_radius", "dense_eval", "RKC_STABILITY",
           "DOPRI5_STABILITY"]

# Negative-real-axis stability bounds: RKC with eps = 2/13 is stable for h*rho <= beta(s) ~ 0.653 s^2
# (s = 1 + sqrt(1 + 1.54 h rho) keeps a margin, as in rkc.f); DOPRI5 is stable for h*rho <= ~3.3.
RKC_STABILITY = 1.54
DOPRI5_STABILITY = 3.3

_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
# b - bhat (5th minus 4th order weights), the last entry multiplies k7 = f(y1).
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
# Dense output coefficients of Hairer's dopri5 (contd5).
_D = (-12715105075 / 11282082432, 0.0, 87487479700 / 32700410799, -10690763975 / 1880347072,
      701980252875 / 199316789632, -1453857185 / 822651844, 69997945 / 29380423)


def _comb(coeffs, ks):
    out = None
    for c, k in zip(coeffs, ks):
        if c != 0.0:
            out = c * k if out is None else out + c * k
    return out


def dopri5_step(f, t, y, f0, h, n_err=None):
    """One Dormand-Prince 5(4) step for every member of a batch.

    Arguments:
        f: vector field ``f(t (B,), y (B, P)) -> (B, P)``.
        t, h: times and step sizes, shape ``(B,)``; y, f0: states and ``f(t, y)``, shape ``(B, P)``.

    Returns:
        ``(y1, f1, err, dense, rho)``: the 5th-order solution, ``f(t + h, y1)`` (first same as last), the embedded error
        estimate ``y1 - y1_hat``, the dense-output coefficients (see :func:`dense_eval`) and the free stiffness estimate
        ``rho ~ ||k7 - k6|| / ||y1 - Y6||`` (a lower bound of the spectral radius along the step). Six evaluations of ``f``.
    """
    hb = h[:, None]
    ks = [f0]
    y6 = None
    for i in range(1, 6):
        yi = y + hb * _comb(_A[i], ks)
        if i == 5:
            y6 = yi
        ks.append(f(t + _C[i] * h, yi))
    y1 = y + hb * _comb(_B, ks)
    f1 = f(t + h, y1)
    ks.append(f1)
    err = hb * _comb(_E, ks)
    ydiff = y1 - y
    bspl = hb * f0 - ydiff
    dense = (y, ydiff, bspl, ydiff - hb * f1 - bspl, hb * _comb(_D, ks))
    sl = slice(None) if n_err is None else slice(0, n_err)  # the components the error control looks at
    num = jnp.linalg.norm((f1 - ks[5])[:, sl], axis=-1)
    den = jnp.linalg.norm((y1 - y6)[:, sl], axis=-1)
    rho = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    return y1, f1, err, dense, rho


def rkc_stages(h, rho, s_max: int):
    """Stages ``s = 1 + floor(sqrt(1 + 1.54 h rho))`` (at least 2) that keep ``h rho`` inside RKC's stability interval,
    and the step ``h`` shortened where ``s`` would exceed ``s_max``.

    >>> import jax.numpy as jnp
    >>> s, h = rkc_stages(jnp.array([1.0, 1.0]), jnp.array([0.1, 1e4]), 50)
    >>> s.tolist(), bool(h[1] < 1.0)
    ([2, 50], True)
    """
    h_cap = (s_max**2 - 1.0) / RKC_STABILITY / jnp.maximum(rho, 1e-300)
    h = jnp.minimum(h, h_cap)
    s = 1 + jnp.floor(jnp.sqrt(1.0 + RKC_STABILITY * h * rho)).astype(jnp.int32)
    return jnp.clip(s, 2, s_max), h


def rkc_start(s, dtype):
    """``(w0, w1, coef)`` of an RKC step with ``s`` stages per member: the Chebyshev parameters and the recurrence
    state ``(th_1, th_0, T_1, T_0, T_1', T_0', T_1'', T_0'', b_1, b_0)`` at ``w0`` before stage 2 (``th_1 = mu~_1``)."""
    sf = s.astype(dtype)
    # w0 = 1 + e with e = eps/s^2 (damping eps = 2/13); w0^2 - 1 = e (2 + e) computed without the cancellation of
    # w0**2 - 1, which loses ~log10(1/e) digits (about 5 at s = 250)
    e = 2.0 / (13.0 * sf**2)
    w0 = 1.0 + e
    temp1 = e * (2.0 + e)
    temp2 = jnp.sqrt(temp1)
    arg = sf * jnp.log(w0 + temp2)
    w1 = jnp.sinh(arg) * temp1 / (jnp.cosh(arg) * sf * temp2 - w0 * jnp.sinh(arg))
    bjm1 = 1.0 / (2.0 * w0) ** 2
    mus = w1 * bjm1
    one = jnp.ones_like(w0)
    zero = jnp.zeros_like(w0)
    return w0, w1, (mus, zero, w0, one, one, zero, zero, zero, bjm1, bjm1)


def rkc_recurrence(w0, w1, coef):
    """One stage of the RKC recurrence: ``(mu, nu, mu~, a_{j-1}, coef_j)`` from ``coef_{j-1}`` (see :func:`rkc_start`)."""
    thjm1, thjm2, zjm1, zjm2, dzjm1, dzjm2, d2zjm1, d2zjm2, bjm1, bjm2 = coef
    zj = 2.0 * w0 * zjm1 - zjm2
    dzj = 2.0 * w0 * dzjm1 - dzjm2 + 2.0 * zjm1
    d2zj = 2.0 * w0 * d2zjm1 - d2zjm2 + 4.0 * dzjm1
    bj = d2zj / dzj**2
    ajm1 = 1.0 - zjm1 * bjm1
    mu = 2.0 * w0 * bj / bjm1
    nu = -bj / bjm2
    mus = mu * w1 / w0
    thj = mu * thjm1 + nu * thjm2 + mus * (1.0 - ajm1)
    return mu, nu, mus, ajm1, (thj, thjm1, zj, zjm1, dzj, dzjm1, d2zj, d2zjm1, bj, bjm1)


def rkc_step(f, t, y, f0, h, s):
    """One step of the second-order Runge-Kutta-Chebyshev method (RKC, damping 2/13) with ``s[b]`` stages for member b.

    The recurrence (Sommeijer, Shampine & Verwer 1997, eq. 2.5) with ``w0 = 1 + eps/s^2``, ``w1 = T_s'(w0)/T_s''(w0)``,
    ``b_j = T_j''(w0)/T_j'(w0)^2``, ``a_j = 1 - b_j T_j(w0)``::

        Y_0 = y,   Y_1 = y + mu~_1 h f(Y_0)
        Y_j = (1 - mu_j - nu_j) y + mu_j Y_{j-1} + nu_j Y_{j-2} + mu~_j h f(Y_{j-1}) + gamma~_j h f(Y_0)

    Members with fewer stages than the largest keep their state after their last stage (their extra evaluations are
    wasted work of the lock-step batch, not counted as theirs).

    Returns:
        ``(y1, f1, err, dense)``: the new state, ``f(t + h, y1)``, the error estimate ``0.8 (y - y1) + 0.4 h (f0 + f1)``
        of rkc.f, and the cubic Hermite interpolant in the form of :func:`dense_eval`. ``s`` evaluations of ``f``.
    """
    hb = h[:, None]
    w0, w1, coef = rkc_start(s, y.dtype)
    yjm1 = y + (h * coef[0])[:, None] * f0

    def body(j, c):
        (yjm1, yjm2), coef = c
        mu, nu, mus, ajm1, new = rkc_recurrence(w0, w1, coef)
        # a member past its last stage repeats its state (mu = 1, nu = mus = 0): no vector masking needed
        live = j <= s
        new = tuple(jnp.where(live, a_new, a) for a, a_new in zip(coef, new))
        mu, nu, mus, ajm1 = (jnp.where(live, mu, 1.0), jnp.where(live, nu, 0.0), jnp.where(live, mus, 0.0),
                             jnp.where(live, ajm1, 0.0))
        fj = f(t + h * coef[0], yjm1)
        yj = (mu[:, None] * yjm1 + nu[:, None] * yjm2 + (1.0 - mu - nu)[:, None] * y
              + (h * mus)[:, None] * (fj - ajm1[:, None] * f0))
        return (yj, yjm1), new

    carry = ((yjm1, y), coef)
    carry = jax.lax.fori_loop(2, jnp.max(s) + 1, body, carry)
    y1 = carry[0][0]
    f1 = f(t + h, y1)
    err = 0.8 * (y - y1) + 0.4 * hb * (f0 + f1)
    ydiff = y1 - y
    r3 = hb * f0 - ydiff
    dense = (y, ydiff, r3, ydiff - hb * f1 - r3, jnp.zeros_like(y))
    return y1, f1, err, dense


def dense_eval(dense, theta):
    """Interpolant of a step at fractions ``theta`` (B,) of it: ``y0 + th (r2 + (1-th)(r3 + th (r4 + (1-th) r5)))``.

    With ``r5 = 0`` this is the cubic Hermite interpolant through ``(y0, h f0)`` and ``(y1, h f1)``.
    """
    y0, r2, r3, r4, r5 = dense
    th = theta[:, None]
    return y0 + th * (r2 + (1.0 - th) * (r3 + th * (r4 + (1.0 - th) * r5)))


def spectral_radius(f, t, y, f0, v, iters, n_err=None):
    """Estimate the spectral radius of ``df/dy`` at ``y`` by ``iters`` steps of the nonlinear power method.

    ``J v ~ (f(y + eps v) - f(y)) / eps`` with ``eps ~ sqrt(machine eps) (1 + ||y||)`` (rkc.f's ``rkcrho``): one
    evaluation of ``f`` per iteration, warm-started from the previous direction ``v`` (B, P). ``iters`` is an int or
    per-member counts (B,): a member's estimate never depends on the counts of the others. ``n_err``: only the first
    ``n_err`` components are measured (a joint flow whose error control looks at its first half; with ``v`` zero in
    the rest and a block-diagonal Jacobian the iteration stays in that block).

    Returns:
        ``(rho, v)``: estimates (B,) and the last directions.
    """
    sqrt_eps = jnp.sqrt(jnp.finfo(y.dtype).eps)
    sl = slice(None) if n_err is None else slice(0, n_err)
    ynrm = jnp.linalg.norm(y[:, sl], axis=-1)
    eps = sqrt_eps * (1.0 + ynrm)
    iters = jnp.broadcast_to(jnp.asarray(iters), y.shape[:1])

    def body(i, c):
        rho, v = c
        vn = jnp.linalg.norm(v[:, sl], axis=-1)
        vn = jnp.where(vn > 0, vn, 1.0)
        dv = v * (eps / vn)[:, None]
        diff = f(t, y + dv) - f0
        new_rho = jnp.linalg.norm(diff[:, sl], axis=-1) / eps
        # keep a usable direction where the difference vanished (a locally linear-zero field)
        new_v = jnp.where((new_rho > 0)[:, None], diff, v + 0.5 * dv)
        live = i < iters
        return jnp.where(live, new_rho, rho), jnp.where(live[:, None], new_v, v)

    return jax.lax.fori_loop(0, jnp.max(iters), body, (jnp.zeros(y.shape[:1], y.dtype), v))
