"""A batch of ODEs ``dy/dt = f(t, y, args)`` integrated in lock step by homflow's stiff-aware engine (``_engine.py``):
:func:`ode_batch` for any vector field (e.g. the normalised NCF ascent, or a census of many initial conditions).
Gradient flows go through :func:`homflow.flow.integrate` with the solver objects :class:`homflow.flow.Auto` /
:class:`homflow.flow.RKC`, which drive the same engine.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._engine import EVENT, REACHED, EngineOptions, run_engine
from ._engine_stages import run_stage_engine
from ._solvers import default_atol

__all__ = ["ode_batch", "BatchSolution", "STATUS_MESSAGES", "EngineOptions"]

STATUS_MESSAGES = {
    REACHED: "reached t1",
    EVENT: "event",
    3: "max_steps reached",
    4: "the step size underflowed (the state became non-finite or the flow diverged?)",
}


class _ArgsField(eqx.Module):
    """``f(t, y, args)`` as a field of one member for the engine (``f`` static, ``args`` traced)."""

    f: Callable = eqx.field(static=True)
    args: Any

    def __call__(self, t, y):
        return self.f(t, y, self.args)


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


def stats_dict(state) -> dict:
    """Per-member statistics (numpy arrays) and batch totals of a final :class:`EngineState`."""
    st = {k: np.asarray(getattr(state, k)) for k in ("n_steps", "n_acc", "n_rej", "n_f", "n_rkc", "n_rho", "t_switch",
                                                     "n_switch", "max_s", "rho", "loops", "batched_f")}
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
              options: EngineOptions | None = None, lockstep: str = "step",
              max_batched_evals: int | None = None) -> BatchSolution:
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
            ``atol`` defaults to :func:`homflow.flow.default_atol` (``0.1 * rtol * ||y0[b]||``) per member.
        method: ``'auto'`` (default), ``'stiff'`` or ``'explicit'`` (see :class:`EngineOptions`).
        event: optional ``g(t, y, args) -> (E,)``: a member stops where a component of ``g`` changes sign.
        max_steps: per member.
        options: :class:`EngineOptions` (``method`` there is overridden by ``method`` here).
        lockstep: ``'step'`` (default: an iteration of the compiled loop is one step of every member; members wait
            for the most expensive step of the iteration) or ``'stage'`` (an iteration is one batched evaluation of
            ``f``, which every member spends on its own next stage: no member waits for another's RKC stages or
            spectral-radius iterations; for batches mixing explicit and stiff members, e.g. a census, see
            ``homflow/flow/_engine_stages.py``). Both take the same steps for every member.
        max_batched_evals: (``'stage'`` only) members stop (status ``max_steps reached``) at the end of their first
            step after this many batched evaluations; default: no bound.

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
        atol_v = jnp.asarray(default_atol(rtol, np.asarray(y0)), y0.dtype)
    else:
        atol_v = jnp.broadcast_to(jnp.asarray(atol, y0.dtype), (y0.shape[0],))
        if not bool(jnp.all(atol_v > 0)):
            raise ValueError(f"`atol` must be > 0; got {atol!r}.")
    opts = dataclasses.replace(options or EngineOptions(), method=method)
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive integer; got {max_steps!r}.")
    ev = None if event is None else _ArgsField(event, args)
    if lockstep not in ("step", "stage"):
        raise ValueError(f"`lockstep` must be 'step' or 'stage'; got {lockstep!r}.")
    if max_batched_evals is not None and (isinstance(max_batched_evals, bool) or
                                          not isinstance(max_batched_evals, (int, np.integer)) or max_batched_evals < 1):
        raise ValueError(f"`max_batched_evals` must be a positive integer or None; got {max_batched_evals!r}.")
    run_args = (_ArgsField(f, args), y0, jnp.asarray(t0, y0.dtype), jnp.asarray(t1, y0.dtype),
                jnp.asarray(ts, y0.dtype), jnp.asarray(rtol, y0.dtype), atol_v.astype(y0.dtype), ev, opts,
                int(max_steps))
    if lockstep == "step":
        st = run_engine(*run_args)
    else:
        bound = np.iinfo(np.int32).max if max_batched_evals is None else int(max_batched_evals)
        st = run_stage_engine(*run_args, jnp.asarray(bound, jnp.int32))
    return BatchSolution(ts=ts, ys=np.asarray(st.saves), t_end=np.asarray(st.t), y_end=np.asarray(st.y),
                         status=np.asarray(st.status), event=np.asarray(st.event), stats=stats_dict(st))
