"""Active-set Newton polish of a max-margin KKT point of a ReLU-type network that keeps kinks at kinks.

At a KKT point of ``min 1/2 ||theta||^2`` s.t. ``q_i(theta) >= 1`` (docs/math.md sections 5 and 6) with Clarke
subgradients, some pre-activations of support samples sit exactly at zero and their slopes ``s`` in ``[alpha, 1]`` are
free. Holding those units at their kinks, the KKT system in ``(theta, lambda_S, s_K)`` is square and smooth:

    theta - sum_{i in S} lambda_i grad_theta q_i^s(theta) = 0      (P equations)
    q_i^s(theta) - 1 = 0,  i in S                                  (|S|)
    z_u(theta) / c_u = 0,  u = (i, layer, unit) in K               (|K|)

where ``q_i^s = y_i Phi_s(theta; x_i)`` is the gated margin (:func:`homflow.kkt._clarke.gated_output`) with the fixed
slopes of the current activation pattern off the kinks and the unknowns ``s_K`` at the kinks, and ``c_u`` the unit's
scale ``||w|| ||h||`` at the start. Newton steps (least squares on the Jacobian, minimum-norm where symmetries make it
singular) are backtracked until the merit ``||F||`` decreases, every margin stays positive and no unit of a support
sample off its kink changes sign (a unit that would is added to ``K``). When the system is solved: a negative
multiplier drops its sample, a slope outside ``[alpha, 1]`` releases its unit to the side that slope says (``> 1``:
positive), a violated constraint joins ``S``. The result is certified from scratch by the caller.

Shapes are padded (all ``n`` samples carry a multiplier, masked; ``K`` to a power of two) so one architecture compiles
a handful of times, not once per active set.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._clarke import _pad, gated_output, kink_structure, layer_weights

__all__ = ["kink_newton"]


def _slopes(base, s, Ki, Kk, Kj, Kmask):
    out = []
    for k, b in enumerate(base):
        jj = jnp.clip(Kj, 0, b.shape[1] - 1)
        d = jnp.where((Kk == k) & Kmask, s - b[Ki, jj], 0.0)
        out.append(b.at[Ki, jj].add(d))
    return tuple(out)


def _gated_parts(unflatten, theta, x, slopes):
    """Gated margin ingredients for one sample: ``Phi_s`` and the pre-activations per layer."""
    Ws = layer_weights(unflatten(theta))
    h, zs = x, []
    for W, s in zip(Ws[:-1], slopes):
        z = W @ h
        zs.append(z)
        h = s * z
    return (Ws[-1] @ h)[0], tuple(zs)


def _residual(v, unflatten, X, y, base, Smask, Ki, Kk, Kj, Kmask, Kscale, P):
    theta, lam, s = v[:P], v[P:P + X.shape[0]], v[P + X.shape[0]:]
    slopes = _slopes(base, s, Ki, Kk, Kj, Kmask)

    def qi(t, x, yi, sl):
        return yi * gated_output(unflatten(t), x, sl)

    q = jax.vmap(qi, in_axes=(None, 0, 0, 0))(theta, X, y, slopes)
    g = jax.vmap(jax.grad(qi), in_axes=(None, 0, 0, 0))(theta, X, y, slopes)
    F1 = theta - g.T @ jnp.where(Smask, lam, 0.0)
    F2 = jnp.where(Smask, q - 1.0, lam)
    zs = jax.vmap(lambda x, sl: _gated_parts(unflatten, theta, x, sl)[1])(X, slopes)
    zsel = sum(jnp.where(Kk == k, z[Ki, jnp.clip(Kj, 0, z.shape[1] - 1)], 0.0) for k, z in enumerate(zs))
    F3 = jnp.where(Kmask, zsel / Kscale, s)
    return jnp.concatenate([F1, F2, F3])


@eqx.filter_jit
def _F(v, unflatten, X, y, base, Smask, Ki, Kk, Kj, Kmask, Kscale):
    return _residual(v, unflatten, X, y, base, Smask, Ki, Kk, Kj, Kmask, Kscale, v.shape[0] - X.shape[0] - Ki.shape[0])


@eqx.filter_jit
def _J(v, unflatten, X, y, base, Smask, Ki, Kk, Kj, Kmask, Kscale):
    P = v.shape[0] - X.shape[0] - Ki.shape[0]
    return jax.jacfwd(_residual)(v, unflatten, X, y, base, Smask, Ki, Kk, Kj, Kmask, Kscale, P)


@eqx.filter_jit
def _margins(prob, theta):
    return prob.margins(theta)


def kink_newton(prob, theta, S, lam_S, kinks, slopes_K, *, kink_tol, tol, max_iter=30, max_rounds=20,
                feas_tol=1e-12, sign_tol=1e-12, margin_floor=0.5, max_step=0.5, max_halvings=12, stall_iters=10,
                stall_factor=0.1):
    """Polish ``theta`` (flat, any scale with positive margins) into a KKT point with the kinks ``K`` held at zero.

    Arguments:
        prob: a :class:`homflow.kkt.MarginProblem` of a supported network (:func:`homflow.kkt.clarke_supported`).
        theta: the start; S, lam_S: initial support and its multipliers; kinks: list of ``(i, layer, unit)`` held at
            zero (samples in ``S``); slopes_K: their initial slopes.
        kink_tol: the relative tolerance that decides the activation pattern's kinks at the start (units within it and
            not in ``kinks`` keep their side's slope).
        tol: stop when ``||F_1|| <= tol ||theta||`` and the other blocks are ``<= tol``.
        max_iter, max_rounds: Newton iterations per active set, active-set changes.
        feas_tol: a constraint with ``q_i < 1 - feas_tol`` joins ``S``; sign_tol: relative pre-activation below which a
            unit off its kink is not considered to have changed sign.
        margin_floor: a step is accepted only if every margin stays ``>= margin_floor * min(1, q_min before)`` (the
            start has ``q_min = 1``): Newton must not trade the margins of samples outside ``S`` for its residual.
        max_step: steps longer than ``max_step * ||theta||`` are shortened to that length first.
        max_halvings: backtracking halvings before a step counts as failed.
        stall_iters, stall_factor: give up a round whose merit has not fallen by ``stall_factor`` after ``stall_iters``
            iterations (a seed far from any KKT point of its active set; Newton near one converges quadratically).

    Returns:
        ``(theta, iterations, message)``; ``message`` is empty when the active set settled.
    """
    X, y = prob.X, prob.y
    n = int(X.shape[0])
    dtype = jnp.asarray(theta).dtype
    theta = np.asarray(theta, dtype=np.float64)
    P = theta.size
    ks0 = kink_structure(prob.unflatten, theta, X, kink_tol=kink_tol)
    alpha = ks0.alpha
    base = [np.where(z > 0, 1.0, alpha) for z in ks0.z]
    scales = [np.where(c != 0, np.abs(z / np.where(c != 0, c, 1.0)), 1.0) for z, c in zip(ks0.z, ks0.cos)]
    S = sorted(set(int(i) for i in S))
    lam = np.zeros(n)
    lam[list(S)] = lam_S
    K = {(int(i), int(k), int(j)): float(np.clip(s, alpha, 1.0)) for (i, k, j), s in zip(kinks, slopes_K)}
    its, msg = 0, ""

    def pack(K):
        keys = sorted(K)
        m = _pad(max(len(keys), 1))
        Ki = np.zeros(m, np.int32)
        Kk = np.zeros(m, np.int32)
        Kj = np.zeros(m, np.int32)
        Km = np.zeros(m, bool)
        Kc = np.ones(m)
        s = np.zeros(m)
        for r, key in enumerate(keys):
            i, k, j = key
            Ki[r], Kk[r], Kj[r], Km[r] = i, k, j, True
            Kc[r] = max(float(scales[k][i, j]), np.finfo(np.float64).tiny)
            s[r] = K[key]
        return keys, [jnp.asarray(a) for a in (Ki, Kk, Kj, Km)] + [jnp.asarray(Kc, dtype=dtype)], s

    def sides_ok(th, S):
        """True margins positive and no support unit off its kink on the wrong side."""
        ks = kink_structure(prob.unflatten, th, X, kink_tol=0.0)
        model_q = np.asarray(_margins(prob, jnp.asarray(th, dtype=dtype)))
        if not model_q.min() >= floor:
            return False, []
        bad = []
        for k, (z, c) in enumerate(zip(ks.z, ks.cos)):
            for i in S:
                for j in range(z.shape[1]):
                    if (i, k, j) in K:
                        continue
                    if abs(c[i, j]) > sign_tol and (z[i, j] > 0) != (base[k][i, j] == 1.0):
                        bad.append((i, k, j))
        return not bad, bad

    for _ in range(max_rounds):
        keys, Kargs, s = pack(K)
        Smask = np.zeros(n, bool)
        Smask[S] = True
        args = (prob.unflatten, X, y, tuple(jnp.asarray(b, dtype=dtype) for b in base), jnp.asarray(Smask), *Kargs)
        v = jnp.asarray(np.concatenate([theta, lam, s]), dtype=dtype)
        F = np.asarray(_F(v, *args))
        added = False
        f_start = float(np.linalg.norm(F))
        for it_round in range(max_iter):
            if it_round == stall_iters and np.linalg.norm(F) > stall_factor * f_start:
                return np.asarray(v[:P]), its, f"Newton stalled (merit {np.linalg.norm(F):.1e} after {stall_iters} steps)"
            if (np.linalg.norm(F[:P]) <= tol * np.linalg.norm(v[:P]) and np.linalg.norm(F[P:]) <= tol):
                break
            J = np.asarray(_J(v, *args))
            if not (np.all(np.isfinite(J)) and np.all(np.isfinite(F))):
                return np.asarray(v[:P]), its, "the KKT system is not finite (a unit's kink scale underflowed)"
            try:
                step = np.linalg.lstsq(J, -F, rcond=None)[0]
            except np.linalg.LinAlgError:
                return np.asarray(v[:P]), its, "the least-squares Newton step failed (SVD did not converge)"
            cap = max_step * float(np.linalg.norm(v[:P]))
            if np.linalg.norm(step[:P]) > cap:
                step *= cap / float(np.linalg.norm(step[:P]))
            floor = margin_floor * min(1.0, float(np.asarray(_margins(prob, v[:P])).min()))
            f0, a = float(np.linalg.norm(F)), 1.0
            flips = []
            for _ in range(max_halvings):
                vt = v + a * step
                Ft = np.asarray(_F(vt, *args))
                ok, bad = sides_ok(np.asarray(vt[:P]), S)
                if ok and np.linalg.norm(Ft) <= (1.0 - 1e-4 * a) * f0:
                    break
                if bad and not flips:
                    flips = bad
                a *= 0.5
            else:
                if flips:  # a support unit reached its kink: hold it there and start the round again
                    for key in flips:
                        K[key] = base[key[1]][key[0], key[2]]
                    added = True
                    break
                return np.asarray(v[:P]), its, "the Newton line search found no decrease of the KKT residual"
            v, F = vt, Ft
            its += 1
        v = np.asarray(v)
        theta, lam, s = v[:P], v[P:P + n].copy(), v[P + n:]
        for r, key in enumerate(keys):
            K[key] = float(s[r])
        if added:
            msg = "a unit reached its kink and is held there"
            continue
        if not (np.linalg.norm(F[:P]) <= tol * np.linalg.norm(theta) and np.linalg.norm(F[P:]) <= tol):
            return theta, its, f"Newton did not reach the tolerance in {max_iter} iterations"
        if S and lam[S].min() < 0:
            i = S[int(np.argmin(lam[S]))]
            S.remove(i)
            lam[i] = 0.0
            K = {key: v_ for key, v_ in K.items() if key[0] != i}
            msg = "dropped a constraint with a negative multiplier"
            continue
        out = [(key, v_) for key, v_ in K.items() if not (alpha - 1e-12 <= v_ <= 1.0 + 1e-12)]
        if out:
            key, v_ = max(out, key=lambda kv: max(alpha - kv[1], kv[1] - 1.0))
            base[key[1]][key[0], key[2]] = 1.0 if v_ > 1.0 else alpha
            del K[key]
            msg = "released a unit from its kink (slope outside [alpha, 1])"
            continue
        q = np.asarray(_margins(prob, jnp.asarray(theta, dtype=dtype)))
        violated = [i for i in np.flatnonzero(q < 1.0 - feas_tol) if int(i) not in S]
        if violated:
            i = int(min(violated, key=lambda i: q[i]))
            S.append(i)
            S.sort()
            ks = kink_structure(prob.unflatten, theta, X, kink_tol=kink_tol)
            for k, Kb in enumerate(ks.kinks):
                base[k][i] = np.where(ks.z[k][i] > 0, 1.0, alpha)
                for j in np.flatnonzero(Kb[i]):
                    K[(i, k, int(j))] = base[k][i, j]
            msg = "added a violated constraint"
            continue
        return theta, its, ""
    return theta, its, f"active-set Newton with kinks did not settle in {max_rounds} rounds ({msg})"


@eqx.filter_jit
def _cell_constraints(theta, unflatten, X, y, slopes, sigma, rows, cols):
    def parts(x, yi, sl):
        out, zs = _gated_parts(unflatten, theta, x, sl)
        return yi * out, jnp.concatenate(zs)

    q, z = jax.vmap(parts)(X, y, slopes)
    return jnp.concatenate([q - 1.0, sigma * z[rows, cols]])


@eqx.filter_jit
def _cell_jacobian(theta, unflatten, X, y, slopes, sigma, rows, cols):
    return jax.jacrev(_cell_constraints)(theta, unflatten, X, y, slopes, sigma, rows, cols)


def cell_slsqp(prob, theta, *, flips=(), near=0.1, maxiter=300, ftol=1e-16):
    """SLSQP on ``min 1/2 ||theta||^2`` s.t. ``q_i >= 1`` inside one activation cell of the start.

    Every pre-activation with ``|cos| <= near`` (module :mod:`homflow.kkt._clarke`) keeps its side,
    ``sigma_u z_u(theta) >= 0`` with ``sigma_u`` its sign at the start (``+1`` at an exact zero, ``-1`` for the units in
    ``flips``), so each margin is the polynomial ``q_i^s`` of that pattern and the problem is smooth; the units farther
    from their kinks are checked afterwards (``crossed``). SLSQP converges to a local minimiser of the cell, whose
    active sign constraints are kinks. It is a Clarke KKT point of the whole problem when the slopes the certificate
    then needs lie in ``[alpha, 1]``; the caller certifies it. Returns ``(theta, scipy result, crossed)``.
    """
    from scipy.optimize import minimize

    X, y = prob.X, prob.y
    dtype = jnp.asarray(theta).dtype
    ks = kink_structure(prob.unflatten, theta, X, kink_tol=0.0)
    z = np.hstack(ks.z)
    cos = np.hstack(ks.cos)
    sig = np.where(z >= 0, 1.0, -1.0)
    for i, c in flips:
        sig[i, c] = -sig[i, c]
    slopes_np = np.where(sig > 0, 1.0, ks.alpha)
    splits = np.cumsum([a.shape[1] for a in ks.z])[:-1]
    slopes = tuple(jnp.asarray(a, dtype=dtype) for a in np.split(slopes_np, splits, axis=1))
    rows, cols = np.nonzero(np.abs(cos) <= near)
    args = (prob.unflatten, X, y, slopes, jnp.asarray(sig[rows, cols], dtype=dtype), jnp.asarray(rows),
            jnp.asarray(cols))
    cons = {"type": "ineq",
            "fun": lambda t: np.asarray(_cell_constraints(jnp.asarray(t, dtype=dtype), *args)),
            "jac": lambda t: np.asarray(_cell_jacobian(jnp.asarray(t, dtype=dtype), *args))}
    res = minimize(lambda t: (0.5 * float(t @ t), t), np.asarray(theta, dtype=np.float64), jac=True, method="SLSQP",
                   constraints=[cons], options={"maxiter": int(maxiter), "ftol": ftol})
    z1 = np.hstack(kink_structure(prob.unflatten, res.x, X, kink_tol=0.0).z)
    crossed = np.argwhere((np.abs(cos) > near) & (np.sign(z1) != sig) & (z1 != 0))
    return res.x, res, crossed
