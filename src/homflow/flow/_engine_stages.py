"""The stage lock step of the stiff-aware engine: every loop iteration evaluates the batched field ONCE, and every
member spends that evaluation on its own next stage (a Dormand-Prince stage, a Runge-Kutta-Chebyshev stage, or an
iteration of its spectral-radius estimate).

Why: in the step lock step (:func:`homflow.flow._engine.run_engine`) an iteration is one step of every member, so the
iteration costs ``6`` evaluations when any member takes a DOPRI5 step plus ``max(s)`` when any takes an RKC step with
``s`` stages, plus the longest power iteration: a member that needs 6 pays for the 200 of its neighbour. On the
canonical problem (past the escape members are stiff with very different ``s``) that lock step used 0.20 of the
batched evaluations it paid for (docs/census.md). Here a member with a short step simply starts its next step while
its neighbour is still in its 200-stage one. The price is the end-of-step logic (error test, events, saves, step-size
control, switch) in every iteration in which some member finishes a step; it is the same code as the step lock step's
(:func:`~homflow.flow._engine._finish`), so each member takes exactly the steps it would take alone (tested against
the step lock step member by member). In a batch above 16 members it runs on at most a quarter of the batch per
iteration (gathered, then scattered back); a member whose step is done beyond that waits an iteration with its stage
state frozen (its slot is idle). Idle slots are thus those of stopped and of waiting members.

``max_loops`` bounds the iterations: a member stops with ``MAX_STEPS`` at the end of its first step after that many
(the census driver's chunks, so that members of one chunk stop together and waiting members can take their slots).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._engine import MAX_STEPS, RUNNING, EngineOptions, _finish, _tree_where, initial_state
from ._stiff import _A, _B, _C, _D, _E, _comb, rkc_recurrence, rkc_stages, rkc_start

__all__ = ["run_stage_engine"]

RHO, DOPRI, RKC = 0, 1, 2

# Dormand-Prince rows as dense arrays: row i combines k_0..k_{i-1} into stage i's point (row 6: the 5th-order
# solution), and the error and dense-output weights over k_0..k_6.
_AM = np.zeros((7, 7))
for _i, _row in enumerate(_A):
    _AM[_i, : len(_row)] = _row
_AM[6, :6] = _B


class Stages(eqx.Module):
    """Per-member position inside its current step: ``job`` (power iteration, DOPRI5 or RKC), the stage counter ``j``
    and what the stages need (see the module docstring); ``tn, yn``: where the next evaluation happens."""

    job: jax.Array
    j: jax.Array
    n_it: jax.Array
    hs: jax.Array
    s: jax.Array
    hit_end: jax.Array
    tn: jax.Array
    yn: jax.Array
    ks: jax.Array
    y6: jax.Array
    yjm1: jax.Array
    yjm2: jax.Array
    coef: tuple
    w0: jax.Array
    w1: jax.Array


def _combine(weights, ks):
    """``sum_k weights[:, k] * ks[k]`` (B, P) over the nonzero weights (stale stages with weight 0 never enter)."""
    out = jnp.zeros(ks.shape[1:], ks.dtype)
    for k in range(ks.shape[0]):  # in order, as homflow.flow._stiff's steps add them: the same rounding
        w = weights[:, k]
        out = out + jnp.where((w != 0)[:, None], w[:, None] * ks[k], 0.0)
    return out


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)
def run_stage_engine(field, y0, t0, t1, save_ts, rtol, atol, events, opts: EngineOptions, max_steps: int,
                     max_loops: int):
    """The stage lock step (module docstring); arguments and result as :func:`homflow.flow._engine.run_engine`, plus
    ``max_loops`` (iterations, i.e. batched evaluations, after which members stop at their next step end)."""
    B, P = y0.shape
    dt = y0.dtype
    fb = jax.vmap(field)
    eb = None if events is None else jax.vmap(events)
    state, n_err, ER = initial_state(field, fb, eb, y0, t0, t1, save_ts, rtol, atol, opts)
    sqrt_eps = jnp.sqrt(jnp.finfo(dt).eps)
    AM, CV = (jnp.asarray(a, dt) for a in (_AM, np.asarray(_C)))
    zf = jnp.zeros((B,), dt)
    zi = jnp.zeros((B,), jnp.int32)
    zy = jnp.zeros_like(y0)
    st = Stages(job=zi, j=zi, n_it=zi, hs=zf, s=zi + 2, hit_end=jnp.zeros((B,), bool), tn=zf, yn=zy,
                ks=jnp.zeros((7, B, P), dt), y6=zy, yjm1=zy, yjm2=zy, coef=(zf,) * 10, w0=zf, w1=zf)

    def rho_eps(y):
        return sqrt_eps * (1.0 + jnp.linalg.norm(y[:, ER], axis=-1))

    def probe(y, v):
        vn = jnp.linalg.norm(v[:, ER], axis=-1)
        vn = jnp.where(vn > 0, vn, 1.0)
        return v * (rho_eps(y) / vn)[:, None]

    def begin_step(c, st, m):
        """Members ``m`` start a DOPRI5 or RKC step of length ``st.hs`` (already cut to the end)."""
        t, y, f0 = c["t"], c["y"], c["f"]
        is_r = c["mode"] == 1
        s, h_r = rkc_stages(st.hs, c["rho"], opts.s_max)
        h = jnp.where(is_r, h_r, st.hs)
        s = jnp.where(is_r, s, 2)
        w0, w1, coef = rkc_start(s, y.dtype)
        yjm1 = y + (h * coef[0])[:, None] * f0
        y_e = y + h[:, None] * (AM[1, 0] * f0)
        r = m & is_r
        st = eqx.tree_at(lambda q: (q.job, q.j, q.hs, q.s, q.hit_end, q.tn, q.yn, q.yjm1, q.yjm2, q.coef, q.w0, q.w1), st,
                         (jnp.where(m, jnp.where(is_r, RKC, DOPRI), st.job), jnp.where(m, jnp.where(is_r, 2, 1), st.j),
                          jnp.where(m, h, st.hs), jnp.where(m, s, st.s), jnp.where(m, h >= t1 - t, st.hit_end),
                          jnp.where(m, jnp.where(is_r, t + h * coef[0], t + CV[1] * h), st.tn),
                          _tree_where(m, jnp.where(is_r[:, None], yjm1, y_e), st.yn), _tree_where(r, yjm1, st.yjm1),
                          _tree_where(r, y, st.yjm2), tuple(jnp.where(r, a, b) for a, b in zip(coef, st.coef)),
                          jnp.where(r, w0, st.w0), jnp.where(r, w1, st.w1)))
        st = eqx.tree_at(lambda q: q.ks, st, st.ks.at[0].set(_tree_where(m, f0, st.ks[0])))
        return st

    def begin(c, st, m):
        """Members ``m`` start their next step: a spectral-radius estimate first where RKC needs one."""
        t = c["t"]
        hs = jnp.minimum(c["h"], t1 - t)
        st = eqx.tree_at(lambda q: q.hs, st, jnp.where(m, hs, st.hs))
        need = m & (c["mode"] == 1) & (c["since_rho"] >= opts.rho_every)
        n_it = jnp.where(c["rho"] == 0, opts.rho_iters0, opts.rho_iters).astype(jnp.int32)
        c["n_rho"] = c["n_rho"] + need
        c["since_rho"] = jnp.where(need, 0, c["since_rho"])
        st = eqx.tree_at(lambda q: (q.job, q.j, q.n_it, q.tn, q.yn), st,
                         (jnp.where(need, RHO, st.job), jnp.where(need, 0, st.j), jnp.where(need, n_it, st.n_it),
                          jnp.where(need, t, st.tn), _tree_where(need, c["y"] + probe(c["y"], c["v"]), st.yn)))
        return c, begin_step(c, st, m & ~need)

    c0 = dict((k, getattr(state, k)) for k in state.__dataclass_fields__)
    c0, st = begin(c0, st, c0["status"] == RUNNING)
    state = type(state)(**c0)

    def cond(carry):
        return jnp.any(carry[0].status == RUNNING)

    K = B if B <= 16 else B // 4  # members whose step ends are handled per iteration (module docstring)
    keep = ("saves", "loops", "batched_f")

    def finish(c, st, done, atol_c, rows):
        """End the steps of the members ``done`` (``c``, ``st``: those members' rows, the whole batch's saves)."""
        t, y, f0 = c["t"], c["y"], c["f"]
        f1 = st.ks[6]
        is_r = st.job == RKC
        h = st.hs
        hb = h[:, None]
        # DOPRI5: solution, error, dense output, free stiffness estimate (as homflow.flow._stiff.dopri5_step)
        y1_e = st.yn
        err_e = hb * _comb(_E, st.ks)
        dif_e = y1_e - y
        bspl = hb * f0 - dif_e
        dense_e = (y, dif_e, bspl, dif_e - hb * f1 - bspl, hb * _comb(_D, st.ks))
        num = jnp.linalg.norm((f1 - st.ks[5])[:, ER], axis=-1)
        den = jnp.linalg.norm((y1_e - st.y6)[:, ER], axis=-1)
        rho_e = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
        # RKC: rkc.f's error estimate and the cubic Hermite interpolant
        y1_r = st.yjm1
        err_r = 0.8 * (y - y1_r) + 0.4 * hb * (f0 + f1)
        dif_r = y1_r - y
        r3 = hb * f0 - dif_r
        dense_r = (y, dif_r, r3, dif_r - hb * f1 - r3, jnp.zeros_like(y))
        dense = tuple(_tree_where(is_r, a, b) for a, b in zip(dense_r, dense_e))
        c = _finish(c, active=done, t=t, y=y, f0=f0, h=h, s=st.s, is_r=is_r, use_e=done & ~is_r,
                    use_r=done & is_r, hit_end=st.hit_end, rho=c["rho"], v=c["v"], y1=_tree_where(is_r, y1_r, y1_e),
                    f1=f1, erre=err_e, errr=err_r, dense=dense, rho_e=rho_e, t1=t1, save_ts=save_ts, rtol=rtol,
                    atol=atol_c, eb=eb, ER=ER, opts=opts, max_steps=max_steps, rows=rows)
        budget = done & (c["status"] == RUNNING) & (c["loops"] >= max_loops)
        c["status"] = jnp.where(budget, MAX_STEPS, c["status"])
        return begin(c, st, done & (c["status"] == RUNNING))

    def finish_some(args):
        """Gather up to K members whose step is done (the others wait an iteration), end their steps, scatter back."""
        c, st, done = args
        if K == B:
            return finish(c, st, done, atol, jnp.arange(B))
        sel = jnp.argsort(jnp.where(done, 0, 1).astype(jnp.int32), stable=True)[:K]
        c_sub = {k: (v if k in keep else v[sel]) for k, v in c.items()}
        st_sub = jax.tree_util.tree_map(lambda a: a[sel], eqx.tree_at(lambda q: q.ks, st, None))
        st_sub = eqx.tree_at(lambda q: q.ks, st_sub, st.ks[:, sel], is_leaf=lambda x: x is None)
        c_sub, st_sub = finish(c_sub, st_sub, done[sel], atol[sel], sel)
        c = {k: (c_sub[k] if k in keep else v.at[sel].set(c_sub[k])) for k, v in c.items()}
        ks = st.ks.at[:, sel].set(st_sub.ks)
        rest = jax.tree_util.tree_map(lambda a, b: a.at[sel].set(b), eqx.tree_at(lambda q: q.ks, st, None),
                                      eqx.tree_at(lambda q: q.ks, st_sub, None))
        return c, eqx.tree_at(lambda q: q.ks, rest, ks, is_leaf=lambda x: x is None)

    def body(carry):
        state, st = carry
        c = {k: getattr(state, k) for k in state.__dataclass_fields__}
        run = c["status"] == RUNNING
        # a member whose step is complete (DOPRI5 j = 7, RKC j = s + 2) waits for its end-of-step turn: its slot's
        # evaluation is idle, its stage state does not move
        wait = run & (((st.job == DOPRI) & (st.j == 7)) | ((st.job == RKC) & (st.j == st.s + 2)))
        use = run & ~wait
        t, y, f0 = c["t"], c["y"], c["f"]
        F = fb(st.tn, st.yn)
        c["batched_f"] += 1
        c["loops"] += 1
        c["n_f"] += use

        # power iteration (rkc.f's rkcrho, as homflow.flow._stiff.spectral_radius)
        m_rho = use & (st.job == RHO)
        j_rho = st.j + 1
        rho_done = m_rho & (j_rho >= st.n_it)

        def power(_):
            dv = probe(y, c["v"])
            diff = F - f0
            new_rho = jnp.linalg.norm(diff[:, ER], axis=-1) / rho_eps(y)
            new_v = jnp.where((new_rho > 0)[:, None], diff, c["v"] + 0.5 * dv)
            return (_tree_where(m_rho, new_v, c["v"]), jnp.where(rho_done, opts.rho_safety * new_rho, c["rho"]),
                    _tree_where(m_rho, y + probe(y, new_v), st.yn))

        c["v"], c["rho"], yn_rho = jax.lax.cond(jnp.any(m_rho), power, lambda _: (c["v"], c["rho"], st.yn), None)

        # Dormand-Prince: F is k_j (j = 1..6; k_6 = f(y1)); RKC's j = s + 1: F = f(y1), kept as k_6 too
        m_e = use & (st.job == DOPRI)
        m_r = use & (st.job == RKC)
        m_k = m_e | (m_r & (st.j == st.s + 1))

        def dopri(_):
            je = jnp.where(m_e, st.j, 6)
            ks = st.ks.at[je, jnp.arange(B)].set(jnp.where(m_k[:, None], F, st.ks[je, jnp.arange(B)]))
            jn = jnp.minimum(st.j + 1, 6)
            return (ks, y + st.hs[:, None] * _combine(AM[jn], ks), t + CV[jn] * st.hs,
                    _tree_where(m_e & (st.j == 5), st.yn, st.y6))

        ks, yn_e, tn_e, y6 = jax.lax.cond(jnp.any(m_k), dopri, lambda _: (st.ks, st.yn, st.tn, st.y6), None)

        # Runge-Kutta-Chebyshev: F = f(Y_{j-1}) for stage j = 2..s
        stage = m_r & (st.j <= st.s)

        def chebyshev(_):
            mu, nu, mus, ajm1, new = rkc_recurrence(st.w0, st.w1, st.coef)
            yj = (mu[:, None] * st.yjm1 + nu[:, None] * st.yjm2 + (1.0 - mu - nu)[:, None] * y
                  + (st.hs * mus)[:, None] * (F - ajm1[:, None] * f0))
            coef = tuple(jnp.where(stage, a, b) for a, b in zip(new, st.coef))
            last = stage & (st.j == st.s)
            tn_r = jnp.where(last, t + st.hs, t + st.hs * new[0])
            return yj, coef, _tree_where(stage, yj, st.yjm1), _tree_where(stage, st.yjm1, st.yjm2), tn_r

        yj, coef, yjm1, yjm2, tn_r = jax.lax.cond(jnp.any(stage), chebyshev,
                                                  lambda _: (st.yn, st.coef, st.yjm1, st.yjm2, st.tn), None)

        st = Stages(job=st.job, j=jnp.where(m_rho, j_rho, jnp.where(m_e | m_r, st.j + 1, st.j)), n_it=st.n_it,
                    hs=st.hs, s=st.s, hit_end=st.hit_end,
                    tn=jnp.where(m_rho, st.tn, jnp.where(m_e, tn_e, jnp.where(stage, tn_r, st.tn))),
                    yn=_tree_where(m_e, yn_e, _tree_where(stage, yj, yn_rho)), ks=ks, y6=y6, yjm1=yjm1,
                    yjm2=yjm2, coef=coef, w0=st.w0, w1=st.w1)
        st = jax.lax.cond(jnp.any(rho_done), lambda a: begin_step(c, a, rho_done), lambda a: a, st)
        done = run & (((st.job == DOPRI) & (st.j == 7)) | ((st.job == RKC) & (st.j == st.s + 2)))
        c, st = jax.lax.cond(jnp.any(done), finish_some, lambda a: a[:2], (c, st, done))
        return type(state)(**c), st

    state, _ = jax.lax.while_loop(cond, body, (state, st))
    return state
