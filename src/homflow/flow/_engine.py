"""homflow's stiff-aware engine: one compiled loop that integrates a batch of ODEs ``dy/dt = f(t, y)`` in lock step,
each member with its own step size, error control, method (explicit Dormand-Prince 5(4) or stabilised explicit
Runge-Kutta-Chebyshev RKC2) and stiffness switch.

Why this design (docs/performance.md has the measurements): a gradient flow's Jacobian is ``-Hess L``, symmetric, so
once the flow turns stiff the step of an explicit solver is capped by ``3.3 / lambda_max`` while the dynamics move on a
much slower scale. A Runge-Kutta-Chebyshev step of length ``h`` costs ``~sqrt(1.54 h lambda_max)`` gradients instead of
``6 h lambda_max / 3.3``; it needs no Hessian, no linear solve, and it batches as well as the gradient does. The
members of a batch share each loop iteration (one batched gradient per stage) but keep their own ``t`` and ``h``:
a member never takes the steps of another; it only waits for the slowest member at the end.

Why not a diffrax solver: the DOPRI5 <-> RKC switch changes the method, its error order and its step-size controller
per member mid-solve, and RKC's stage count is chosen from the step and a spectral-radius estimate carried between
steps (the step is capped so that ``s <= s_max``); a lock-step batch with per-member steps has no diffrax counterpart
either. The step functions (``_stiff.py``) are pure and shared; the loop state is :class:`EngineState`, every constant
is a field of :class:`EngineOptions`. Solver objects (:class:`homflow.flow.Auto`, :class:`homflow.flow.RKC`,
:class:`homflow.flow.DOPRI5`) and :func:`homflow.flow.ode_batch` drive it.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp

from ._stiff import DOPRI5_STABILITY, dense_eval, dopri5_step, rkc_stages, rkc_step, spectral_radius

__all__ = ["EngineOptions", "EngineState", "run_engine", "initial_state", "RUNNING", "REACHED", "EVENT", "MAX_STEPS", "UNDERFLOW"]

# Status of a member inside the loop (translated into homflow.flow.RESULTS by one table in _solvers.py).
RUNNING, REACHED, EVENT, MAX_STEPS, UNDERFLOW = 0, 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Static settings of the stiff-aware engine, every constant of the loop in plain sight (defaults measured on the
    canonical problem, docs/performance.md, or taken from the cited codes).

    Attributes:
        method: ``'auto'`` (start explicit, switch to RKC when the step becomes stability-limited, and back),
            ``'stiff'`` (RKC throughout) or ``'explicit'`` (Dormand-Prince throughout).
        s_max: most RKC stages per step (the step is shortened to fit; default 250 as in rkc.f's practice).
        rho_every: accepted RKC steps between spectral-radius re-estimates (rkc.f uses 25).
        rho_iters0, rho_iters: power iterations for a cold / warm-started estimate.
        rho_safety: factor applied to the estimate (rkc.f: 1.2).
        stiff_ratio: an explicit step counts as stiff when ``h * rho_k`` exceeds this (``rho_k`` the free DOPRI5 estimate).
        stiff_after: switch to RKC after this many stiff explicit steps, counted until ``nonstiff_reset`` non-stiff
            ones in a row (default 6) reset the count.
        nonstiff_after: switch back to DOPRI5 after this many accepted 2-stage RKC steps with ``h rho < nonstiff_ratio``.
        probe_steps: ``None`` (default) or a count: after this many accepted RKC steps, switch back to DOPRI5 if
            RKC's cost per unit time (``s / h``, averaged with weight ``rate_smoothing``) exceeds DOPRI5's just before
            the switch (``6 / h``); the stiffness count needed for the next switch then doubles for that member. Off by
            default: on the canonical problem (t1 = 250, rtol 1e-8) it cost 30% more gradient evaluations.
        explicit_tol_factor, stiff_tol_factor: multipliers of the tolerances in DOPRI5 / RKC mode (1: the stated ones).
        pcoeff, icoeff: PI coefficients of the DOPRI5 step-size controller (0.4 / 0.3 cut rejected steps by two thirds
            on the canonical problem); RKC uses rkc.f's predictive controller with safety ``rkc_safety`` (0.8).
        safety: safety factor of the DOPRI5 controller (0.9, Hairer's dopri5), also the largest factor after a
            rejection; factor_min, factor_max: limits of a step-size change (0.1, 10); error_floor: smallest scaled
            error used by the controllers (1e-10).
        first_step_fraction: the first step is ``first_step_fraction * ||y0||_sc / ||f0||_sc`` in the scaled RMS norm
            (Hairer, Norsett & Wanner II.4, default 0.01), or ``first_step_tiny * (t1 - t0)`` where either norm is
            below ``first_step_tiny`` (1e-6).
        underflow_factor: a member stops with a step-size underflow when ``h < underflow_factor * eps * max(|t|, 1)``
            (default 64).
        event_bisections: bisection steps on the step's dense output that locate an event (60: below rounding).
    """

    method: str = "auto"
    s_max: int = 250
    rho_every: int = 25
    rho_iters0: int = 20
    rho_iters: int = 4
    rho_safety: float = 1.2
    stiff_ratio: float = 2.5
    stiff_after: int = 15
    nonstiff_reset: int = 6
    nonstiff_after: int = 25
    nonstiff_ratio: float = 0.5
    probe_steps: int | None = None
    rate_smoothing: float = 0.3
    pcoeff: float = 0.4
    icoeff: float = 0.3
    explicit_tol_factor: float = 1.0
    stiff_tol_factor: float = 1.0
    safety: float = 0.9
    rkc_safety: float = 0.8
    factor_min: float = 0.1
    factor_max: float = 10.0
    error_floor: float = 1e-10
    first_step_fraction: float = 0.01
    first_step_tiny: float = 1e-6
    underflow_factor: float = 64.0
    event_bisections: int = 60

    def __post_init__(self):
        if self.method not in ("auto", "stiff", "explicit"):
            raise ValueError(f"`method` must be 'auto', 'stiff' or 'explicit'; got {self.method!r}.")
        if not (isinstance(self.s_max, int) and self.s_max >= 2):
            raise ValueError(f"`s_max` must be an integer >= 2; got {self.s_max!r}.")
        for name in ("rho_every", "rho_iters0", "rho_iters", "stiff_after", "nonstiff_reset", "nonstiff_after",
                     "event_bisections"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {v!r}.")
        for name in ("rho_safety", "stiff_ratio", "nonstiff_ratio", "safety", "rkc_safety", "factor_max",
                     "error_floor", "first_step_fraction", "first_step_tiny", "underflow_factor",
                     "explicit_tol_factor", "stiff_tol_factor"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and v == v and v != float("inf")):
                raise ValueError(f"`{name}` must be a finite number > 0; got {v!r}.")
        if not 0 < self.factor_min < 1 or not 0 < self.rate_smoothing <= 1:
            raise ValueError(f"`factor_min` and `rate_smoothing` must lie in (0, 1); got {self.factor_min!r}, "
                             f"{self.rate_smoothing!r}.")


class EngineState(eqx.Module):
    """The loop state of :func:`run_engine`: every array has the batch as its leading axis (B) unless noted.

    ``t, y, f, h``: time, state, ``f(t, y)``, next step; ``h_prev, err_prev``: last accepted step and its scaled error
    (controllers); ``mode``: 0 DOPRI5, 1 RKC; ``rho, v``: spectral-radius estimate and power-method direction;
    ``since_rho``: accepted RKC steps since the last estimate; ``stiff_cnt, ns_cnt, back_cnt``: switch counters;
    ``rate_e, rate_r, n_since, need_stiff``: the cost-based switch back (``probe_steps``); ``status, event``: outcome
    codes and the index of the event that fired; ``g_prev`` (B, E): event functions at ``t``; ``saves`` (B, S, P),
    ``idx``: saved states and how many; counters ``n_steps, n_acc, n_rej, n_f`` (evaluations of f for the member),
    ``n_rkc, n_rho, n_switch, max_s, t_switch``; ``loops`` and ``batched_f`` (scalars): loop iterations and evaluations
    of the batched f (what the lock step really paid).
    """

    t: jax.Array
    y: jax.Array
    f: jax.Array
    h: jax.Array
    h_prev: jax.Array
    err_prev: jax.Array
    mode: jax.Array
    rho: jax.Array
    v: jax.Array
    since_rho: jax.Array
    stiff_cnt: jax.Array
    ns_cnt: jax.Array
    back_cnt: jax.Array
    status: jax.Array
    event: jax.Array
    g_prev: jax.Array
    saves: jax.Array
    idx: jax.Array
    n_steps: jax.Array
    n_acc: jax.Array
    n_rej: jax.Array
    n_f: jax.Array
    n_rkc: jax.Array
    rate_e: jax.Array
    rate_r: jax.Array
    n_since: jax.Array
    need_stiff: jax.Array
    n_rho: jax.Array
    t_switch: jax.Array
    n_switch: jax.Array
    max_s: jax.Array
    loops: jax.Array
    batched_f: jax.Array


def _as_dict(state: EngineState) -> dict:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def _rms(x):
    return jnp.sqrt(jnp.mean(x * x, axis=-1))


def _tree_where(mask, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y), a, b)


def first_step(y0, f0, t0, t1, rtol, atol, opts: EngineOptions):
    """The first step of every member (B,): Hairer's rule in the scaled RMS norm (see :class:`EngineOptions`)."""
    scale = atol[:, None] + rtol * jnp.abs(y0)
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    tiny = opts.first_step_tiny
    h = jnp.where((d0 < tiny) | (d1 < tiny), tiny * (t1 - t0),
                  opts.first_step_fraction * d0 / jnp.where(d1 > 0, d1, 1.0))
    return jnp.minimum(h, t1 - t0)


def initial_state(field, fb, eb, y0, t0, t1, save_ts, rtol, atol, opts: EngineOptions):
    """The loop state before the first step (one batched evaluation of ``f``), with ``n_err`` (the field's
    ``error_size`` or None) and the slice ``ER`` of the error-controlled components; shared by both lock steps."""
    B, P = y0.shape
    dt = y0.dtype
    S = save_ts.shape[0]

    t = jnp.full((B,), t0, dt)
    f0 = fb(t, y0)
    early = save_ts <= t0
    saves = jnp.where(early[None, :, None], y0[:, None, :], jnp.full((B, S, P), jnp.nan, dt))
    idx = jnp.full((B,), jnp.sum(early), jnp.int32)
    # a field may ask for error control on its first `error_size` components only (the joint narrow/wide flow)
    n_err = getattr(field, "error_size", None)
    ER = slice(None) if n_err is None else slice(0, n_err)
    h = first_step(y0[:, ER], f0[:, ER], t0, t1, rtol, atol, opts)
    mode = jnp.full((B,), 1 if opts.method == "stiff" else 0, jnp.int32)
    v = jax.random.normal(jax.random.PRNGKey(0), (B, P if n_err is None else n_err), dt)
    v = jnp.pad(v, ((0, 0), (0, P - v.shape[1])))
    ib = jnp.zeros((B,), jnp.int32)
    zf = jnp.zeros((B,), dt)
    g_prev = jnp.zeros((B, 0), dt) if eb is None else eb(t, y0)
    state = EngineState(
        t=t, y=y0, f=f0, h=h, h_prev=zf, err_prev=jnp.ones((B,), dt), mode=mode, rho=zf, v=v,
        since_rho=jnp.full((B,), opts.rho_every, jnp.int32), stiff_cnt=ib, ns_cnt=ib, back_cnt=ib,
        status=jnp.zeros((B,), jnp.int32), event=jnp.full((B,), -1, jnp.int32), g_prev=g_prev,
        saves=saves, idx=idx, n_steps=ib, n_acc=ib, n_rej=ib, n_f=jnp.ones((B,), jnp.int32), n_rkc=ib,
        rate_e=zf, rate_r=zf, n_since=ib, need_stiff=jnp.full((B,), opts.stiff_after, jnp.int32),
        n_rho=ib, t_switch=jnp.full((B,), jnp.inf, dt), n_switch=ib, max_s=ib, loops=jnp.int32(0),
        batched_f=jnp.int32(1))
    return state, n_err, ER


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)  # counts compilations: eqx.debug.get_num_traces(run_engine)
def run_engine(field, y0, t0, t1, save_ts, rtol, atol, events, opts: EngineOptions, max_steps: int):
    """The lock-step loop.

    Arguments:
        field: ``field(t, y) -> dy/dt`` for ONE member (an ``eqx.Module`` or a hashable callable; it is vmapped).
        y0: (B, P) initial states; t0, t1: scalars; save_ts: (S,) increasing save times; rtol: scalar; atol: (B,).
        events: ``None`` or ``events(t, y) -> (E,)`` for one member: a member stops where a component changes sign.
        opts: :class:`EngineOptions`; max_steps: attempted steps per member.

    Returns:
        The final :class:`EngineState` (saved states, counts, end points, status codes).
    """
    B, P = y0.shape
    fb = jax.vmap(field)
    eb = None if events is None else jax.vmap(events)
    state, n_err, ER = initial_state(field, fb, eb, y0, t0, t1, save_ts, rtol, atol, opts)
    zf = jnp.zeros((B,), y0.dtype)

    def cond(state):
        return jnp.any(state.status == RUNNING)

    def body(state):
        c = _as_dict(state)
        active = c["status"] == RUNNING
        t, y, f0 = c["t"], c["y"], c["f"]
        to_end = t1 - t
        h = jnp.minimum(c["h"], to_end)
        is_r = c["mode"] == 1
        # spectral radius for members in RKC mode (warm-started power method, one gradient per iteration)
        need = active & is_r & (c["since_rho"] >= opts.rho_every)
        n_it = jnp.where(need, jnp.where(c["rho"] == 0, opts.rho_iters0, opts.rho_iters), 0).astype(jnp.int32)

        def do_rho(_):
            r, vv = spectral_radius(fb, t, y, f0, c["v"], n_it, n_err)
            return jnp.where(need, opts.rho_safety * r, c["rho"]), jnp.where(need[:, None], vv, c["v"])

        any_need = jnp.any(need)
        rho, v = jax.lax.cond(any_need, do_rho, lambda _: (c["rho"], c["v"]), None)
        c["batched_f"] += jnp.where(any_need, jnp.max(n_it), 0)
        c["n_f"] += jnp.where(need, n_it, 0)
        c["n_rho"] += need
        c["since_rho"] = jnp.where(need, 0, c["since_rho"])
        s, h_r = rkc_stages(h, rho, opts.s_max)
        h = jnp.where(is_r, h_r, h)
        hit_end = h >= to_end
        use_e, use_r = active & ~is_r, active & is_r
        s = jnp.where(use_r, s, 2)
        zeros_y = jnp.zeros_like(y)
        zero_dense = (zeros_y,) * 5

        any_e, any_r = jnp.any(use_e), jnp.any(use_r)
        ye, fe, erre, dense_e, rho_e = jax.lax.cond(
            any_e, lambda _: dopri5_step(fb, t, y, f0, h, n_err), lambda _: (zeros_y, zeros_y, zeros_y, zero_dense, zf), None)
        yr, fr, errr, dense_r = jax.lax.cond(
            any_r, lambda _: rkc_step(fb, t, y, f0, h, s), lambda _: (zeros_y, zeros_y, zeros_y, zero_dense), None)
        c["batched_f"] += jnp.where(any_e, 6, 0) + jnp.where(any_r, jnp.max(s), 0)
        c = _finish(c, active=active, t=t, y=y, f0=f0, h=h, s=s, is_r=is_r, use_e=use_e, use_r=use_r,
                    hit_end=hit_end, rho=rho, v=v, y1=jnp.where(is_r[:, None], yr, ye), f1=jnp.where(is_r[:, None], fr, fe),
                    erre=erre, errr=errr, dense=_tree_where(is_r, dense_r, dense_e), rho_e=rho_e, t1=t1,
                    save_ts=save_ts, rtol=rtol, atol=atol, eb=eb, ER=ER, opts=opts,
                    max_steps=max_steps)
        c["n_f"] += jnp.where(use_e, 6, 0) + jnp.where(use_r, s, 0)
        c["loops"] += 1
        return EngineState(**c)

    return jax.lax.while_loop(cond, body, state)


def _finish(c, *, active, t, y, f0, h, s, is_r, use_e, use_r, hit_end, rho, v, y1, f1, erre, errr, dense, rho_e, t1,
            save_ts, rtol, atol, eb, ER, opts: EngineOptions, max_steps, rows=None):
    """The end of a step for the members in ``active`` (error test, event location on the step's dense output, saves,
    step-size control, the DOPRI5 <-> RKC switch, counters and status); members outside ``active`` keep their state.
    ``rows``: where the members' saves are in ``c["saves"]`` (default: the members in order; the stage lock step
    passes a gathered subset of members with the whole batch's saves).
    Shared by both lock steps (:func:`run_engine`, :func:`homflow.flow._engine_stages.run_stage_engine`): ``c`` is the
    state as a dict, updated and returned; the caller counts gradient evaluations."""
    B, S = y.shape[0], save_ts.shape[0]
    dt = y.dtype
    eps = jnp.finfo(dt).eps
    E = c["g_prev"].shape[1]
    save_rows = jnp.arange(B) if rows is None else rows
    sc = atol[:, None] + rtol * jnp.maximum(jnp.abs(y[:, ER]), jnp.abs(y1[:, ER]))
    tol_fac = jnp.where(is_r, opts.stiff_tol_factor, opts.explicit_tol_factor)
    err = _rms(jnp.where(is_r[:, None], errr, erre)[:, ER] / sc) / tol_fac
    ok = jnp.isfinite(err) & jnp.all(jnp.isfinite(y1), axis=-1)
    err = jnp.where(ok, err, jnp.inf)
    accept = active & (err <= 1.0)
    t_new = jnp.where(hit_end, t1, t + h)

    fired = jnp.zeros((B,), bool)
    if eb is not None:
        g1 = eb(t_new, y1)
        gp = c["g_prev"]
        crossed = accept[:, None] & (((gp < 0) & (g1 >= 0)) | ((gp > 0) & (g1 <= 0)))
        fired = jnp.any(crossed, axis=1)

        def locate(_):
            lo = jnp.zeros((E, B), dt)
            hi = jnp.ones((E, B), dt)

            def bis(_, lh):
                lo, hi = lh
                mid = 0.5 * (lo + hi)
                ym = jax.vmap(lambda th: dense_eval(dense, th))(mid)  # (E, B, P)
                tm = t[None, :] + mid * h[None, :]
                gm = jax.vmap(eb)(tm, ym)  # (E, B, E)
                gm = jnp.diagonal(gm, axis1=0, axis2=2).T  # (E, B): event e at its own midpoint
                same = jnp.sign(gm) == jnp.sign(gp.T)
                return jnp.where(same, mid, lo), jnp.where(same, hi, mid)

            lo, hi = jax.lax.fori_loop(0, opts.event_bisections, bis, (lo, hi))
            th = jnp.where(crossed.T, hi, jnp.inf)
            which = jnp.argmin(th, axis=0)
            th_min = jnp.min(th, axis=0)
            th_min = jnp.where(jnp.isfinite(th_min), th_min, 1.0)
            return th_min, which.astype(jnp.int32), dense_eval(dense, th_min)

        th_ev, which, y_ev = jax.lax.cond(jnp.any(fired), locate,
                                          lambda _: (jnp.ones((B,), dt), jnp.full((B,), -1, jnp.int32), y1), None)
        t_new = jnp.where(fired, t + th_ev * h, t_new)
        y1 = jnp.where(fired[:, None], y_ev, y1)
        c["event"] = jnp.where(fired, which, c["event"])
        c["g_prev"] = jnp.where(accept[:, None], g1, gp)

    # save at the requested times passed by this step (interpolated, the end point exact)
    def save_mask(idx):
        ts_i = save_ts[jnp.minimum(idx, S - 1)]
        return accept & (idx < S) & (ts_i <= t_new), ts_i

    def save_cond(sv):
        return jnp.any(save_mask(sv[0])[0])

    def save_body(sv):
        idx, saves = sv
        m, ts_i = save_mask(idx)
        th = jnp.clip((ts_i - t) / jnp.where(h > 0, h, 1.0), 0.0, 1.0)
        val = jnp.where((ts_i == t_new)[:, None], y1, dense_eval(dense, th))
        ic = jnp.minimum(idx, S - 1)
        cur = saves[save_rows, ic]
        saves = saves.at[save_rows, ic].set(jnp.where(m[:, None], val, cur))
        return idx + m, saves

    c["idx"], c["saves"] = jax.lax.while_loop(save_cond, save_body, (c["idx"], c["saves"]))

    # step-size control: PI for DOPRI5 (error of order 5), rkc.f's predictive controller for RKC (order 3)
    err_s = jnp.maximum(err, opts.error_floor)
    fac_e = opts.safety * err_s ** (-(opts.pcoeff + opts.icoeff) / 5.0) * c["err_prev"] ** (opts.pcoeff / 5.0)
    first = c["h_prev"] <= 0
    fac_r = jnp.where(first, opts.rkc_safety / jnp.cbrt(err_s),
                      opts.rkc_safety * (h / jnp.where(first, 1.0, c["h_prev"])) * jnp.cbrt(c["err_prev"]) / jnp.cbrt(err_s) ** 2)
    fac_acc = jnp.clip(jnp.where(is_r, fac_r, fac_e), opts.factor_min, opts.factor_max)
    fac_rej = jnp.clip(jnp.where(is_r, opts.rkc_safety / jnp.cbrt(err_s), opts.safety * err_s ** -0.2),
                       opts.factor_min, opts.safety)
    # a step shortened to land on t1 says nothing about the step the controller would like: keep the old one
    h_next = jnp.where(accept, jnp.where(hit_end & ~is_r, jnp.maximum(h * fac_acc, c["h"]), h * fac_acc), h * fac_rej)
    h_next = jnp.where(ok, h_next, h * opts.factor_min)
    c["err_prev"] = jnp.where(accept, err_s, c["err_prev"])
    c["h_prev"] = jnp.where(accept, h, c["h_prev"])
    c["since_rho"] = jnp.where(accept, c["since_rho"] + 1, jnp.where(use_r, opts.rho_every, c["since_rho"]))

    mode = c["mode"]
    if opts.method == "auto":
        stiff = use_e & (h * rho_e > opts.stiff_ratio)
        c["stiff_cnt"] = jnp.where(stiff, c["stiff_cnt"] + 1, c["stiff_cnt"])
        c["ns_cnt"] = jnp.where(stiff, 0, jnp.where(use_e, c["ns_cnt"] + 1, c["ns_cnt"]))
        c["stiff_cnt"] = jnp.where(c["ns_cnt"] >= opts.nonstiff_reset, 0, c["stiff_cnt"])
        to_r = use_e & (c["stiff_cnt"] >= c["need_stiff"])
        easy = use_r & accept & (s == 2) & (h * rho < opts.nonstiff_ratio)
        c["back_cnt"] = jnp.where(easy, c["back_cnt"] + 1, jnp.where(use_r & accept, 0, c["back_cnt"]))
        # cost per unit time of each method (exponential averages over accepted steps)
        hh = jnp.where(h > 0, h, 1.0)
        c["rate_e"] = jnp.where(use_e & accept, (1 - opts.rate_smoothing) * c["rate_e"] + opts.rate_smoothing * 6.0 / hh, c["rate_e"])
        c["rate_r"] = jnp.where(use_r & accept, jnp.where(c["n_since"] == 0, s / hh,
                                                         (1 - opts.rate_smoothing) * c["rate_r"] + opts.rate_smoothing * s / hh), c["rate_r"])
        c["n_since"] = jnp.where(use_r & accept, c["n_since"] + 1, c["n_since"])
        # DOPRI5's rate: what it paid before the switch, or its stability-limited rate at today's spectral radius
        rate_e_now = jnp.maximum(c["rate_e"], 6.0 * rho / (opts.rho_safety * DOPRI5_STABILITY))
        if opts.probe_steps is None:
            costly = jnp.zeros_like(use_r)
        else:
            costly = use_r & (c["n_since"] >= opts.probe_steps) & (c["rate_r"] > rate_e_now)
        c["need_stiff"] = jnp.where(costly, 2 * c["need_stiff"], c["need_stiff"])
        to_e = use_r & ((c["back_cnt"] >= opts.nonstiff_after) | costly)
        c["n_since"] = jnp.where(to_e, 0, c["n_since"])
        mode = jnp.where(to_r, 1, jnp.where(to_e, 0, mode))
        switched = to_r | to_e
        c["t_switch"] = jnp.where(to_r & ~jnp.isfinite(c["t_switch"]), t_new, c["t_switch"])
        c["n_switch"] += switched
        c["stiff_cnt"] = jnp.where(switched, 0, c["stiff_cnt"])
        c["back_cnt"] = jnp.where(switched, 0, c["back_cnt"])
        c["h_prev"] = jnp.where(switched, 0.0, c["h_prev"])
        c["err_prev"] = jnp.where(switched, 1.0, c["err_prev"])
        c["since_rho"] = jnp.where(to_r, opts.rho_every, c["since_rho"])
        c["rho"] = jnp.where(to_r, 0.0, rho)
    else:
        c["rho"] = rho
    c["mode"] = mode
    c["v"] = v
    c["max_s"] = jnp.maximum(c["max_s"], jnp.where(use_r, s, 0))
    c["n_rkc"] += use_r
    c["t"] = jnp.where(accept, t_new, t)
    c["y"] = jnp.where(accept[:, None], y1, y)
    c["f"] = jnp.where(accept[:, None], f1, f0)
    c["h"] = jnp.where(active, h_next, c["h"])
    c["n_steps"] += active
    c["n_acc"] += accept
    c["n_rej"] += active & ~accept
    status = c["status"]
    status = jnp.where(accept & fired, EVENT, status)
    status = jnp.where(active & (status == RUNNING) & accept & hit_end, REACHED, status)
    status = jnp.where(active & (status == RUNNING) & (c["n_steps"] >= max_steps), MAX_STEPS, status)
    tiny = opts.underflow_factor * eps * jnp.maximum(jnp.abs(t), 1.0)
    status = jnp.where(active & (status == RUNNING) & (c["h"] < tiny), UNDERFLOW, status)
    c["status"] = status
    return c
