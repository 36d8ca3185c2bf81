"""One compiled loop that integrates a batch of ODEs ``dy/dt = f(t, y)`` in lock step, each member with its own step
size, error control, method (explicit Dormand-Prince 5(4) or stabilised explicit RKC) and stiffness switch.

Why this design (docs/performance.md has the measurements): a gradient flow's Jacobian is ``-Hess L``, symmetric, so
once the flow turns stiff the step of an explicit solver is capped by ``3.3 / lambda_max`` while the dynamics move on a
much slower scale. A Runge-Kutta-Chebyshev step of length ``h`` costs ``~sqrt(1.54 h lambda_max)`` gradients instead of
``6 h lambda_max / 3.3``; it needs no Hessian, no linear solve, and it batches as well as the gradient does. The
members of a batch share each loop iteration (one batched gradient per stage) but keep their own ``t`` and ``h``:
a member never takes the steps of another; it only waits for the slowest member at the end.

The engine is used by :func:`homflow.flow.gradient_flow` (``solver='auto'`` / ``'stiff'``, batch of one), by
:func:`homflow.flow.gradient_flow_batch` (``method='batched'``) and, for any vector field, by :func:`ode_batch`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._stiff import DOPRI5_STABILITY, dense_eval, dopri5_step, rkc_stages, rkc_step, spectral_radius

__all__ = ["ode_batch", "BatchSolution", "STATUS_MESSAGES", "EngineOptions"]

RUNNING, REACHED, EVENT, MAX_STEPS, UNDERFLOW = 0, 1, 2, 3, 4
STATUS_MESSAGES = {
    REACHED: "reached t1",
    EVENT: "event",
    MAX_STEPS: "max_steps reached",
    UNDERFLOW: "the step size underflowed (the state became non-finite or the flow diverged?)",
}


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Static settings of the stiff-aware engine (all have defaults measured on the canonical problem).

    Attributes:
        method: ``'auto'`` (start explicit, switch to RKC when the step becomes stability-limited, and back),
            ``'stiff'`` (RKC throughout) or ``'explicit'`` (Dormand-Prince throughout).
        s_max: most RKC stages per step (the step is shortened to fit; default 250 as in rkc.f's practice).
        rho_every: accepted RKC steps between spectral-radius re-estimates (rkc.f uses 25).
        rho_iters0, rho_iters: power iterations for a cold / warm-started estimate.
        rho_safety: factor applied to the estimate (rkc.f: 1.2).
        stiff_ratio: an explicit step counts as stiff when ``h * rho_k`` exceeds this (``rho_k`` the free DOPRI5 estimate).
        stiff_after: switch to RKC after this many stiff explicit steps (reset after 6 non-stiff ones in a row).
        nonstiff_after: switch back to DOPRI5 after this many accepted 2-stage RKC steps with ``h rho < nonstiff_ratio``.
        probe_steps: ``None`` (default) or a count: after this many accepted RKC steps, switch back to DOPRI5 if
            RKC's cost per unit time (``s / h``, averaged) exceeds DOPRI5's just before the switch (``6 / h``); the
            stiffness count needed for the next switch then doubles for that member. Off by default: on the
            canonical problem (t1 = 250, rtol 1e-8) it cost 30% more gradient evaluations (78.7k vs 60.8k), the
            members oscillating between the methods through the mildly stiff stretch (docs/performance.md).
        explicit_tol_factor, stiff_tol_factor: multipliers of the tolerances in DOPRI5 / RKC mode (1: the stated ones).
        pcoeff, icoeff: PI coefficients of the DOPRI5 step-size controller (RKC uses rkc.f's predictive controller).
    """

    method: str = "auto"
    s_max: int = 250
    rho_every: int = 25
    rho_iters0: int = 20
    rho_iters: int = 4
    rho_safety: float = 1.2
    stiff_ratio: float = 2.5
    stiff_after: int = 15
    nonstiff_after: int = 25
    nonstiff_ratio: float = 0.5
    probe_steps: int | None = None
    pcoeff: float = 0.4
    icoeff: float = 0.3
    explicit_tol_factor: float = 1.0
    stiff_tol_factor: float = 1.0

    def __post_init__(self):
        if self.method not in ("auto", "stiff", "explicit"):
            raise ValueError(f"`method` must be 'auto', 'stiff' or 'explicit'; got {self.method!r}.")
        if not (isinstance(self.s_max, int) and self.s_max >= 2):
            raise ValueError(f"`s_max` must be an integer >= 2; got {self.s_max!r}.")


def _rms(x):
    return jnp.sqrt(jnp.mean(x * x, axis=-1))


def _tree_where(mask, a, b):
    return jax.tree_util.tree_map(lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y), a, b)


@eqx.filter_jit
def _engine(field: Callable, args, y0, t0, t1, save_ts, rtol, atol, event_fn, opts: EngineOptions, max_steps: int):
    """The lock-step loop. ``field(t, y, args)`` and ``event_fn(t, y, args) -> (E,)`` act on one member; ``y0`` is (B, P);
    ``atol`` is (B,). Returns saved states (B, S, P), how many were saved (B,), final t, y, status, event index, stats."""
    B, P = y0.shape
    dt = y0.dtype
    S = save_ts.shape[0]
    vf = jax.vmap(field, in_axes=(0, 0, None))

    def fb(t, y):
        return vf(t, y, args)

    if event_fn is not None:
        ev = jax.vmap(event_fn, in_axes=(0, 0, None))

        def eb(t, y):
            return ev(t, y, args)

    t = jnp.full((B,), t0, dt)
    f0 = fb(t, y0)
    early = save_ts <= t0
    saves = jnp.where(early[None, :, None], y0[:, None, :], jnp.full((B, S, P), jnp.nan, dt))
    idx = jnp.full((B,), jnp.sum(early), jnp.int32)
    scale = atol[:, None] + rtol * jnp.abs(y0)
    d0, d1 = _rms(y0 / scale), _rms(f0 / scale)
    h = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.where(d1 > 0, d1, 1.0))
    h = jnp.minimum(h, t1 - t0)
    mode = jnp.full((B,), 1 if opts.method == "stiff" else 0, jnp.int32)
    v = jax.random.normal(jax.random.PRNGKey(0), (B, P), dt)
    ib = jnp.zeros((B,), jnp.int32)
    zf = jnp.zeros((B,), dt)
    E = 0
    g_prev = jnp.zeros((B, 0), dt)
    if event_fn is not None:
        g_prev = eb(t, y0)
        E = g_prev.shape[1]
    c = dict(t=t, y=y0, f=f0, h=h, h_prev=zf, err_prev=jnp.ones((B,), dt), mode=mode, rho=zf, v=v,
             since_rho=jnp.full((B,), opts.rho_every, jnp.int32), stiff_cnt=ib, ns_cnt=ib, back_cnt=ib,
             status=jnp.zeros((B,), jnp.int32), event=jnp.full((B,), -1, jnp.int32), g_prev=g_prev,
             saves=saves, idx=idx, n_steps=ib, n_acc=ib, n_rej=ib, n_f=jnp.ones((B,), jnp.int32), n_rkc=ib,
             rate_e=zf, rate_r=zf, n_since=ib, need_stiff=jnp.full((B,), opts.stiff_after, jnp.int32),
             n_rho=ib, t_switch=jnp.full((B,), jnp.inf, dt), n_switch=ib, max_s=ib, loops=jnp.int32(0),
             batched_f=jnp.int32(1))

    def cond(c):
        return jnp.any(c["status"] == RUNNING)

    def body(c):
        c = dict(c)
        active = c["status"] == RUNNING
        t, y, f0 = c["t"], c["y"], c["f"]
        to_end = t1 - t
        h = jnp.minimum(c["h"], to_end)
        is_r = c["mode"] == 1
        # spectral radius for members in RKC mode (warm-started power method, one gradient per iteration)
        need = active & is_r & (c["since_rho"] >= opts.rho_every)
        n_it = jnp.where(need, jnp.where(c["rho"] == 0, opts.rho_iters0, opts.rho_iters), 0).astype(jnp.int32)

        def do_rho(_):
            r, vv = spectral_radius(fb, t, y, f0, c["v"], n_it)
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
            any_e, lambda _: dopri5_step(fb, t, y, f0, h), lambda _: (zeros_y, zeros_y, zeros_y, zero_dense, zf), None)
        yr, fr, errr, dense_r = jax.lax.cond(
            any_r, lambda _: rkc_step(fb, t, y, f0, h, s), lambda _: (zeros_y, zeros_y, zeros_y, zero_dense), None)
        c["batched_f"] += jnp.where(any_e, 6, 0) + jnp.where(any_r, jnp.max(s), 0)
        y1 = jnp.where(is_r[:, None], yr, ye)
        f1 = jnp.where(is_r[:, None], fr, fe)
        dense = _tree_where(is_r, dense_r, dense_e)
        sc = atol[:, None] + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y1))
        tol_fac = jnp.where(is_r, opts.stiff_tol_factor, opts.explicit_tol_factor)
        err = _rms(jnp.where(is_r[:, None], errr, erre) / sc) / tol_fac
        ok = jnp.isfinite(err) & jnp.all(jnp.isfinite(y1), axis=-1)
        err = jnp.where(ok, err, jnp.inf)
        accept = active & (err <= 1.0)
        c["n_f"] += jnp.where(use_e, 6, 0) + jnp.where(use_r, s, 0)
        t_new = jnp.where(hit_end, t1, t + h)

        fired = jnp.zeros((B,), bool)
        if event_fn is not None:
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

                lo, hi = jax.lax.fori_loop(0, 60, bis, (lo, hi))
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
            rows = jnp.arange(B)
            cur = saves[rows, ic]
            saves = saves.at[rows, ic].set(jnp.where(m[:, None], val, cur))
            return idx + m, saves

        c["idx"], c["saves"] = jax.lax.while_loop(save_cond, save_body, (c["idx"], c["saves"]))

        # step-size control: PI for DOPRI5 (error of order 5), rkc.f's predictive controller for RKC (order 3)
        err_s = jnp.maximum(err, 1e-10)
        fac_e = 0.9 * err_s ** (-(opts.pcoeff + opts.icoeff) / 5.0) * c["err_prev"] ** (opts.pcoeff / 5.0)
        first = c["h_prev"] <= 0
        fac_r = jnp.where(first, 0.8 / jnp.cbrt(err_s),
                          0.8 * (h / jnp.where(first, 1.0, c["h_prev"])) * jnp.cbrt(c["err_prev"]) / jnp.cbrt(err_s) ** 2)
        fac_acc = jnp.clip(jnp.where(is_r, fac_r, fac_e), 0.1, 10.0)
        fac_rej = jnp.clip(jnp.where(is_r, 0.8 / jnp.cbrt(err_s), 0.9 * err_s ** -0.2), 0.1, 0.9)
        # a step shortened to land on t1 says nothing about the step the controller would like: keep the old one
        h_next = jnp.where(accept, jnp.where(hit_end & ~is_r, jnp.maximum(h * fac_acc, c["h"]), h * fac_acc), h * fac_rej)
        h_next = jnp.where(ok, h_next, h * 0.1)
        c["err_prev"] = jnp.where(accept, err_s, c["err_prev"])
        c["h_prev"] = jnp.where(accept, h, c["h_prev"])
        c["since_rho"] = jnp.where(accept, c["since_rho"] + 1, jnp.where(use_r, opts.rho_every, c["since_rho"]))

        mode = c["mode"]
        if opts.method == "auto":
            stiff = use_e & (h * rho_e > opts.stiff_ratio)
            c["stiff_cnt"] = jnp.where(stiff, c["stiff_cnt"] + 1, c["stiff_cnt"])
            c["ns_cnt"] = jnp.where(stiff, 0, jnp.where(use_e, c["ns_cnt"] + 1, c["ns_cnt"]))
            c["stiff_cnt"] = jnp.where(c["ns_cnt"] >= 6, 0, c["stiff_cnt"])
            to_r = use_e & (c["stiff_cnt"] >= c["need_stiff"])
            easy = use_r & accept & (s == 2) & (h * rho < opts.nonstiff_ratio)
            c["back_cnt"] = jnp.where(easy, c["back_cnt"] + 1, jnp.where(use_r & accept, 0, c["back_cnt"]))
            # cost per unit time of each method (exponential averages over accepted steps)
            hh = jnp.where(h > 0, h, 1.0)
            c["rate_e"] = jnp.where(use_e & accept, 0.7 * c["rate_e"] + 0.3 * 6.0 / hh, c["rate_e"])
            c["rate_r"] = jnp.where(use_r & accept, jnp.where(c["n_since"] == 0, s / hh,
                                                             0.7 * c["rate_r"] + 0.3 * s / hh), c["rate_r"])
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
        tiny = 1e-14 * jnp.maximum(jnp.abs(t), 1.0)
        status = jnp.where(active & (status == RUNNING) & (c["h"] < tiny), UNDERFLOW, status)
        c["status"] = status
        c["loops"] += 1
        return c

    c = jax.lax.while_loop(cond, body, c)
    stats = {k: c[k] for k in ("n_steps", "n_acc", "n_rej", "n_f", "n_rkc", "n_rho", "t_switch", "n_switch", "max_s",
                               "rho", "loops", "batched_f")}
    return c["saves"], c["idx"], c["t"], c["y"], c["status"], c["event"], stats


@dataclasses.dataclass(frozen=True)
class BatchSolution:
    """Solution of :func:`ode_batch`.

    Attributes:
        ts: the save times (S,). ys: saved states (B, S, P), NaN after a member stopped early.
        t_end, y_end: where each member stopped (B,), (B, P). status: (B,) codes, ``reasons``: readable outcomes.
        event: index of the event that stopped each member (-1 if none).
        stats: per-member arrays: ``num_steps``, ``num_accepted_steps``, ``num_rejected_steps``, ``grad_evals``
            (evaluations of ``f`` made for that member: 6 per DOPRI5 step, ``s`` per RKC step, one per power
            iteration, one at the start), ``num_stiff_steps``, ``t_switch``; and batch totals ``loop_iterations`` and
            ``batched_evals`` (evaluations of the batched ``f``, what the lock step really paid).
    """

    ts: np.ndarray
    ys: np.ndarray
    t_end: np.ndarray
    y_end: np.ndarray
    status: np.ndarray
    event: np.ndarray
    stats: dict

    @property
    def success(self) -> np.ndarray:
        return np.isin(self.status, (REACHED, EVENT))

    @property
    def reasons(self) -> list[str]:
        return [STATUS_MESSAGES.get(int(s), "running") for s in self.status]


def _stats_dict(stats) -> dict:
    st = {k: np.asarray(v) for k, v in stats.items()}
    return {
        "num_steps": st["n_steps"], "num_accepted_steps": st["n_acc"], "num_rejected_steps": st["n_rej"],
        "grad_evals": st["n_f"], "num_stiff_steps": st["n_rkc"], "num_rho_estimates": st["n_rho"],
        "t_switch": st["t_switch"], "num_switches": st["n_switch"], "max_stages": st["max_s"],
        "spectral_radius": st["rho"], "loop_iterations": int(st["loops"]), "batched_evals": int(st["batched_f"]),
    }


def _check_positive(name, value):
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"`{name}` must be a finite number > 0; got {value!r}.")
    return v


def ode_batch(f: Callable, y0, t1: float, *, args=None, ts=None, t0: float = 0.0, rtol: float = 1e-8,
              atol=None, method: str = "auto", event=None, max_steps: int = 1_000_000,
              options: EngineOptions | None = None) -> BatchSolution:
    """Integrate ``dy/dt = f(t, y, args)`` from many initial states at once in one compiled loop.

    Each member has its own adaptive step (DOPRI5 while non-stiff, the Runge-Kutta-Chebyshev method RKC2 once its
    steps become stability-limited; see docs/performance.md). Use it for batches of gradient flows, or any flow whose
    Jacobian has a real (or nearly real) spectrum, e.g. the normalised ascent ``du/ds = f(u)`` of an NCF.

    Arguments:
        f: ``f(t, y, args) -> dy/dt`` on ONE member (``y`` of shape (P,)); it is vmapped. Pass a module-level function
            (it is a static argument of the compiled loop: a new closure recompiles).
        y0: initial states (B, P) (a (P,) vector is a batch of one).
        t1: final time (> t0). args: a pytree passed to ``f``.
        ts: save times in [t0, t1] (default ``[t0, t1]``).
        rtol, atol: tolerances of the mixed error test ``|err| <= atol + rtol max(|y0|, |y1|)`` (RMS over components);
            ``atol`` defaults to ``rtol * ||y0[b]||`` per member.
        method: ``'auto'`` (default), ``'stiff'`` or ``'explicit'`` (see :class:`EngineOptions`).
        event: optional ``g(t, y, args) -> (E,)``: a member stops where a component of ``g`` changes sign.
        max_steps: per member.
        options: :class:`EngineOptions` (``method`` there is overridden by ``method`` here).

    Returns:
        A :class:`BatchSolution`.

    Raises:
        ValueError: for bad shapes, times or tolerances (named).
    """
    y0 = jnp.asarray(y0)
    if not jnp.issubdtype(y0.dtype, jnp.floating):
        y0 = y0.astype(jnp.result_type(float))
    if y0.ndim == 1:
        y0 = y0[None]
    if y0.ndim != 2 or y0.shape[0] < 1:
        raise ValueError(f"`y0` must have shape (batch, P); got {y0.shape}.")
    if not bool(jnp.all(jnp.isfinite(y0))):
        raise ValueError("`y0` holds NaN or inf.")
    t0, t1 = float(t0), float(t1)
    if not (math.isfinite(t1) and t1 > t0):
        raise ValueError(f"`t1` must be a finite time > t0 = {t0:g}; got {t1!r}.")
    ts = np.array([t0, t1]) if ts is None else np.asarray(ts, dtype=float)
    if ts.ndim != 1 or ts.size < 1 or np.any(np.diff(ts) <= 0) or ts[0] < t0 or ts[-1] > t1:
        raise ValueError("`ts` must be increasing times in [t0, t1].")
    rtol = _check_positive("rtol", rtol)
    if atol is None:
        atol_v = rtol * jnp.maximum(jnp.linalg.norm(y0, axis=1), 1e-300)
    else:
        atol_v = jnp.broadcast_to(jnp.asarray(atol, y0.dtype), (y0.shape[0],))
        if not bool(jnp.all(atol_v > 0)):
            raise ValueError(f"`atol` must be > 0; got {atol!r}.")
    opts = dataclasses.replace(options or EngineOptions(), method=method)
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive integer; got {max_steps!r}.")
    saves, idx, t_end, y_end, status, ev, stats = _engine(
        f, args, y0, jnp.asarray(t0, y0.dtype), jnp.asarray(t1, y0.dtype), jnp.asarray(ts, y0.dtype),
        jnp.asarray(rtol, y0.dtype), atol_v.astype(y0.dtype), event, opts, int(max_steps))
    return BatchSolution(ts=ts, ys=np.asarray(saves), t_end=np.asarray(t_end), y_end=np.asarray(y_end),
                         status=np.asarray(status), event=np.asarray(ev), stats=_stats_dict(stats))
