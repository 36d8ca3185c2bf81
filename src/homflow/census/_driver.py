"""Many gradient flows through the lock-step batched engine, in two phases per member (to the escape, then on to its
end), with refill: members that finish leave the batch and waiting members take their slots, so that the batched
gradient stays full.

The engine (:func:`homflow.flow.ode_batch`, homflow's stiff-aware DOPRI5/RKC integrator) advances a batch in lock step:
every loop iteration evaluates one batched gradient per stage, and a member that has finished rides along until the
slowest one is done. Here the batch is advanced in *chunks* of at most ``chunk_steps`` steps per member; between
chunks, finished members are replaced by waiting initial conditions (refill) and, once nothing waits, the batch is
halved while at most half of it is busy (compaction; each size compiles once). What a member needs of its own (its
escape level, the time left to its end) travels in its state as two constant components (scaled by ``2^-100`` so that
they do not enter the error norm, the first step or the spectral-radius estimate), so one compiled loop serves members
in different phases, with different initial scales and end times.

Utilisation is ``sum over members of their own gradient evaluations / (batch size * batched evaluations)``: the
fraction of the batched gradient work that advanced a member that still needed it.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..flow import EngineOptions, ode_batch
from ..flow._objective import Objective
from ..models import safe_norm

__all__ = ["DriverOptions", "DriverResult", "run_members", "default_batch_size", "precompile"]

_KAPPA = 2.0**-100  # exact power-of-two scale of the constant components (level, time left)
ESCAPE, AFTER, DONE = 0, 1, 2
# member outcomes
OK, NO_ESCAPE, FAILED = "ok", "no_escape", "failed"


def default_batch_size(n_members: int, n_params: int, *, device=None, memory_fraction: float = 0.25,
                       n_saves: int = 32) -> int:
    """A batch size for the device: on a CPU 128 (the batched gradient's cost grows linearly beyond a few dozen
    members, so a larger batch only lengthens the lock step); on an accelerator the largest power of two up to 65,536
    whose saved states (``n_saves`` per member, float64) fit in ``memory_fraction`` of the device memory. Never more
    than ``n_members`` (rounded up to a power of two)."""
    device = device or jax.devices()[0]
    cap = 128
    if device.platform != "cpu":
        stats = getattr(device, "memory_stats", lambda: None)() or {}
        mem = float(stats.get("bytes_limit", 16 * 2**30))
        per = 8.0 * (n_saves + 8) * (n_params + 2)
        cap = 2 ** int(math.floor(math.log2(max(memory_fraction * mem / per, 1.0))))
        cap = max(256, min(cap, 65_536))
    need = 2 ** int(math.ceil(math.log2(max(n_members, 1))))
    return int(min(cap, need))


@dataclasses.dataclass(frozen=True)
class DriverOptions:
    """How the members are batched.

    Attributes:
        batch_size: slots of the batch (``None``: :func:`default_batch_size`).
        refill: replace finished members by waiting ones between chunks and compact the batch at the tail (``False``:
            the classic lock step: a batch of members runs each phase to the end in one call, as
            ``gradient_flow_batch(method='batched')`` does).
        chunk_steps: engine steps per member per chunk (refill only); a chunk restarts each member's step-size and
            stiffness detection, which costs a few steps, so chunks should be long against that.
        min_batch: compaction never shrinks the batch below this.
        split_phases: (refill) advance the members still waiting for their escape and those past it in separate
            calls, each of the smallest size (a power of two, at least ``min_batch``) that holds it, so that
            early-phase members (explicit steps) do not pay for the RKC stages of stiff members past their escape.
            Off by default: on the quick census's problem (64 members, batch 16) it raised the busy utilisation from
            0.42 to 0.45 but the idle slots of the smaller calls cost more (927k vs 885k slot evaluations).
        n_saves: states saved per member per chunk, every ``save_dt`` of its time (the loss curve for the plateau
            detection; refill only: the classic call spreads them over its whole horizon).
        max_steps: most engine steps of one member over both phases.
        engine: :class:`homflow.flow.EngineOptions` of the stiff-aware engine.
        lockstep: ``'stage'`` (default: every loop iteration is one batched gradient that each member spends on its
            own next stage, so an explicit member never waits for a stiff member's Chebyshev stages) or ``'step'``
            (an iteration is one step of every member; see :func:`homflow.flow.ode_batch`).
        chunk_evals: (refill with the stage lock step) batched gradients per chunk; members stop at the end of
            their first step after that many, so that the whole batch stops together (``chunk_steps`` bounds the
            step lock step's chunks instead).
    """

    batch_size: int | None = None
    refill: bool = True
    chunk_steps: int = 400
    min_batch: int = 4
    split_phases: bool = False
    n_saves: int = 32
    max_steps: int = 2_000_000
    engine: EngineOptions = EngineOptions()
    lockstep: str = "stage"
    chunk_evals: int = 8000

    def __post_init__(self):
        if self.lockstep not in ("stage", "step"):
            raise ValueError(f"`lockstep` must be 'stage' or 'step'; got {self.lockstep!r}.")
        for name in ("chunk_steps", "min_batch", "n_saves", "max_steps", "chunk_evals"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {v!r}.")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"`batch_size` must be a positive integer or None; got {self.batch_size!r}.")


@dataclasses.dataclass
class DriverResult:
    """Per-member outcomes of :func:`run_members` and the cost of the batch.

    Attributes:
        t_escape: time the norm reached the member's level (``inf``: not by its horizon); theta_escape: the state then.
        t_end, theta_end: where the member stopped; outcome: ``'ok'``, ``'no_escape'`` or ``'failed'`` (``reason``).
        curve_t, curve_loss, curve_groups: per member, the saved times, losses and zero-preserving group norms.
        grad_evals: per member, its own gradient evaluations; steps: its engine steps.
        batched_evals: evaluations of the batched gradient, summed over calls; slot_evals: the same times the batch
            size of each call (what the lock step paid, in member-gradients); utilisation: ``grad_evals.sum() /
            slot_evals``; calls: engine calls; batch_sizes: the sizes used.
        idle_evals: the part of ``slot_evals`` spent on slots whose member had stopped (or was empty), counted per
            loop iteration at the call's mean cost per iteration; the rest of the waste is the lock step's mixing of
            methods and stage counts (a DOPRI5 member pays for the RKC stages of a stiff one in the same iteration).
    """

    t_escape: np.ndarray
    theta_escape: np.ndarray
    t_end: np.ndarray
    theta_end: np.ndarray
    outcome: list
    reason: list
    curve_t: list
    curve_loss: list
    curve_groups: list
    grad_evals: np.ndarray
    steps: np.ndarray
    batched_evals: int
    slot_evals: int
    calls: int
    batch_sizes: tuple
    idle_evals: float = 0.0

    @property
    def utilisation(self) -> float:
        return float(self.grad_evals.sum() / self.slot_evals) if self.slot_evals else float("nan")

    @property
    def busy_utilisation(self) -> float:
        """Utilisation of the slots while their member was running (idle slots left out)."""
        busy = self.slot_evals - self.idle_evals
        return float(self.grad_evals.sum() / busy) if busy > 0 else float("nan")


def _field(t, y, objective):
    v = objective.velocity(y[:-2])
    return jnp.concatenate([v, jnp.zeros((2,), y.dtype)])


def _event(t, y, objective):
    level = y[-2] / _KAPPA
    left = y[-1] / _KAPPA
    g_escape = jnp.where(level > 0, safe_norm(y[:-2]) - level, -1.0)
    return jnp.stack([g_escape, t - left])


@eqx.filter_jit
def _diagnostics(objective: Objective, thetas):
    return jax.vmap(objective.log_loss)(thetas)


def run_members(objective: Objective, thetas0, *, levels, horizons, ends=None, t_after=None, rtol: float = 1e-8,
                atol=None, groups=(), save_dt: float, options: DriverOptions = DriverOptions(),
                progress=None) -> DriverResult:
    """Integrate ``d theta/dt = -grad L`` from every row of ``thetas0`` through its escape and on to its end.

    Member ``i`` first runs until ``||theta|| = levels[i]`` (the escape; it gives up at ``horizons[i]``), then on to
    ``ends[i]`` (an absolute time) or for ``t_after`` after its escape.

    Arguments:
        objective: the loss (:func:`homflow.flow.make_objective`).
        thetas0: initial states (N, P). levels, horizons: (N,) escape levels and give-up times.
        ends: (N,) absolute end times, or None with ``t_after`` (a duration after each member's escape).
        rtol, atol: tolerances of the engine (``atol`` per member; default ``0.1 rtol ||theta0[i]||`` as in
            :func:`homflow.flow.gradient_flow`).
        groups: zero-preserving groups whose norms are recorded along each member's curve.
        save_dt: spacing of the saved states (member time).
        options: :class:`DriverOptions`.
        progress: optional ``progress(fraction_done, message)``.

    Returns:
        A :class:`DriverResult`.
    """
    th0 = np.asarray(thetas0, dtype=float)
    if th0.ndim != 2 or th0.shape[0] < 1:
        raise ValueError(f"`thetas0` must have shape (members, P); got {th0.shape}.")
    N, P = th0.shape
    levels = np.broadcast_to(np.asarray(levels, float), (N,)).copy()
    horizons = np.broadcast_to(np.asarray(horizons, float), (N,)).copy()
    if (ends is None) == (t_after is None):
        raise ValueError("give exactly one of `ends` (absolute end times) and `t_after` (a duration after the escape).")
    ends = None if ends is None else np.broadcast_to(np.asarray(ends, float), (N,)).copy()
    if not (save_dt > 0 and math.isfinite(save_dt)):
        raise ValueError(f"`save_dt` must be a finite time > 0; got {save_dt!r}.")
    norms0 = np.linalg.norm(th0, axis=1)
    atol_v = (0.1 * rtol * norms0) if atol is None else np.broadcast_to(np.asarray(atol, float), (N,)).copy()
    B_full = options.batch_size or default_batch_size(N, P, n_saves=options.n_saves)
    B_full = int(min(B_full, 2 ** int(math.ceil(math.log2(N)))))
    gnorms = GroupNorms(groups)

    state = th0.copy()
    clock = np.zeros(N)
    phase = np.full(N, ESCAPE)
    t_esc = np.full(N, np.inf)
    th_esc = np.full((N, P), np.nan)
    outcome = [OK] * N
    reason = [""] * N
    curve_t = [[0.0] for _ in range(N)]
    log_l0 = np.asarray(_diagnostics(objective, jnp.asarray(th0)))
    curve_l = [[float(v)] for v in log_l0]
    g0 = gnorms(th0)
    curve_g = [[g0[i]] for i in range(N)]
    evals = np.zeros(N, np.int64)
    steps = np.zeros(N, np.int64)
    batched = slot = calls = 0
    idle = 0.0
    sizes = []
    queue = list(range(N))
    slots: list[int] = []
    B = B_full

    def member_end(i):
        return ends[i] if ends is not None else t_esc[i] + t_after

    while queue or slots:
        if options.refill:
            while queue and len(slots) < B:
                slots.append(queue.pop(0))
            while not queue and B > options.min_batch and len(slots) <= B // 2:
                B //= 2
        elif not slots:
            slots, queue = queue[:B], queue[B:]
        keep = []
        B_cap = B
        if options.refill and options.split_phases:  # members in their escape and after it, in separate calls
            groups = [[i for i in slots if phase[i] == ESCAPE], [i for i in slots if phase[i] != ESCAPE]]
        else:
            groups = [list(slots)]
        for active in groups:
            if not active:
                continue
            B_call = B_cap
            while options.refill and options.split_phases and B_call // 2 >= max(len(active), options.min_batch):
                B_call //= 2
            n = len(active)
            B = B_call
            level = np.where(phase[active] == ESCAPE, levels[active], 0.0)
            left = np.array([(horizons[i] if phase[i] == ESCAPE else member_end(i)) - clock[i] for i in active])
            left = np.maximum(left, 0.0)
            y0 = np.zeros((B, P + 2))
            y0[:n, :P] = state[active]
            y0[:n, P] = level * _KAPPA
            y0[:n, P + 1] = left * _KAPPA
            y0[n:, P + 1] = 1e-6 * _KAPPA  # idle slots: stop at once
            at = np.ones(B)
            at[:n] = atol_v[active]
            span = float(max(left.max(initial=0.0), 1e-6))
            stage = options.lockstep == "stage"
            if options.refill:
                save_ts = save_dt * np.arange(1, options.n_saves + 1)
            else:
                save_ts = span * np.arange(1, options.n_saves + 1) / options.n_saves
            t1 = max(span, float(save_ts[-1])) * (1 + 1e-12)
            sol = ode_batch(_field, y0, t1, args=objective, ts=np.concatenate([[0.0], save_ts]), rtol=rtol, atol=at,
                            event=_event, options=options.engine, method=options.engine.method,
                            lockstep=options.lockstep, **_call_bounds(options))
            calls += 1
            sizes.append(B)
            n_batched = int(sol.stats["batched_evals"])
            batched += n_batched
            slot += B * n_batched
            if stage:  # every slot evaluation of a running member is one of its own: the rest were idle
                idle += B * n_batched - float(np.sum(sol.stats["grad_evals"][:n]))
            else:
                loops = max(int(sol.stats["loop_iterations"]), 1)
                idle += (B * loops - float(np.sum(sol.stats["num_steps"][:n]))) * n_batched / loops
            ys_all = sol.ys[:, 1:, :P]
            ok_all = np.all(np.isfinite(ys_all), axis=-1)
            # losses of every slot's saves and end in one fixed shape (B * (S + 1), P): compiled once per batch size
            flat = np.concatenate([np.where(ok_all[..., None], ys_all, 0.0).reshape(-1, P), sol.y_end[:, :P]])
            ll_all = np.asarray(_diagnostics(objective, jnp.asarray(flat)))
            ll = ll_all[: B * len(save_ts)].reshape(B, len(save_ts))[:n]
            ll_end = ll_all[B * len(save_ts):][:n]
            ys, ok_rows = ys_all[:n], ok_all[:n]
            y_end = sol.y_end[:n, :P]
            g_saves, g_end = gnorms(ys), gnorms(y_end)
            for k, i in enumerate(active):
                evals[i] += int(sol.stats["grad_evals"][k])
                steps[i] += int(sol.stats["num_steps"][k])
                t_loc = float(sol.t_end[k])
                for j in np.flatnonzero(ok_rows[k]):
                    if save_ts[j] < t_loc:
                        curve_t[i].append(clock[i] + float(save_ts[j]))
                        curve_l[i].append(float(ll[k, j]))
                        curve_g[i].append(g_saves[k, j])
                clock[i] += t_loc
                state[i] = y_end[k]
                curve_t[i].append(clock[i])
                curve_l[i].append(float(ll_end[k]))
                curve_g[i].append(g_end[k])
                code, ev = int(sol.status[k]), int(sol.event[k])
                if code == 2 and ev == 0:  # escaped
                    t_esc[i] = clock[i]
                    th_esc[i] = y_end[k]
                    phase[i] = AFTER
                    keep.append(i)
                elif code in (1, 2):  # reached the end of its phase
                    if phase[i] == ESCAPE:
                        outcome[i], reason[i] = NO_ESCAPE, f"the norm did not reach {levels[i]:.3g} by t = {clock[i]:.4g}"
                    phase[i] = DONE
                elif code == 3 and steps[i] < options.max_steps and options.refill:
                    keep.append(i)  # chunk done, member continues
                else:
                    outcome[i] = FAILED
                    reason[i] = sol.reasons[k] + f" at t = {clock[i]:.4g}"
                    phase[i] = DONE
        B = B_cap
        slots = keep if (options.refill or keep) else []
        if progress is not None:
            progress(float(np.mean(phase == DONE)), f"{int(np.sum(phase == DONE))}/{N} members done")
    return DriverResult(t_esc, th_esc, clock.copy(), state, outcome, reason, [np.asarray(c) for c in curve_t],
                        [np.exp(np.asarray(c)) for c in curve_l], [np.asarray(c) for c in curve_g], evals, steps,
                        batched, slot, calls, tuple(sizes), float(idle))


def _call_bounds(options: DriverOptions) -> dict:
    """``max_steps`` / ``max_batched_evals`` of one engine call: a refill chunk is bounded in batched gradients (stage
    lock step) or in steps per member (step lock step); the classic call runs each phase to its end."""
    stage = options.lockstep == "stage"
    chunked = options.refill and not stage
    return dict(max_steps=int(options.chunk_steps if chunked else options.max_steps),
                max_batched_evals=options.chunk_evals if (stage and options.refill) else None)


def _sizes(B_full: int, options: DriverOptions) -> list[int]:
    sizes, B = [B_full], B_full
    while options.refill and B > options.min_batch:
        B //= 2
        sizes.append(B)
    return sizes


def precompile(objective: Objective, n_members: int, n_params: int, options: DriverOptions = DriverOptions()
               ) -> list[int]:
    """Compile the engine for every batch size :func:`run_members` may use on ``n_members`` members of ``n_params``
    parameters (the full batch and, with refill, each compacted size), so that timings of a later run exclude
    compilation. Returns the sizes."""
    B_full = options.batch_size or default_batch_size(n_members, n_params, n_saves=options.n_saves)
    B_full = int(min(B_full, 2 ** int(math.ceil(math.log2(max(n_members, 1))))))
    sizes = _sizes(B_full, options)
    for B in sizes:
        y0 = np.zeros((B, n_params + 2))
        y0[:, n_params + 1] = 1e-6 * _KAPPA
        save_ts = np.arange(1, options.n_saves + 1) * 1e-3
        ode_batch(_field, y0, float(save_ts[-1]) * 2, args=objective, ts=np.concatenate([[0.0], save_ts]), rtol=1e-8,
                  atol=np.ones(B), event=_event, options=options.engine, method=options.engine.method,
                  lockstep=options.lockstep, **_call_bounds(options))
        _diagnostics(objective, jnp.zeros((B * (options.n_saves + 1), n_params)))
    _diagnostics(objective, jnp.zeros((n_members, n_params)))
    return sizes


class GroupNorms:
    """Norms of zero-preserving groups (index arrays into the flat vector) for any batch shape ``(..., P)``,
    vectorised over groups of equal size."""

    def __init__(self, groups):
        groups = [np.asarray(g, dtype=np.int64) for g in groups]
        self.n = len(groups)
        by_size: dict[int, list[int]] = {}
        for k, g in enumerate(groups):
            by_size.setdefault(g.size, []).append(k)
        self.blocks = [(np.asarray(ks), np.stack([groups[k] for k in ks])) for ks in by_size.values()]

    def __call__(self, thetas) -> np.ndarray:
        thetas = np.asarray(thetas)
        out = np.zeros(thetas.shape[:-1] + (self.n,))
        for ks, idx in self.blocks:
            out[..., ks] = np.sqrt(np.sum(thetas[..., idx] ** 2, axis=-1))
        return out
