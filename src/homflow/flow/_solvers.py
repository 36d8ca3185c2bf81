"""Solver objects for :func:`homflow.flow.integrate`: tolerances and options in plain sight, one table of names.

* :class:`Auto` (the default everywhere): homflow's stiff-aware engine, Dormand-Prince 5(4) while the flow is
  non-stiff, switching per member to the Runge-Kutta-Chebyshev method RKC2 when its steps become stability-limited
  (``_engine.py``; docs/performance.md: 10x fewer gradient evaluations than Tsit5 on the canonical problem).
* :class:`RKC`: RKC2 throughout; :class:`DOPRI5`: the engine's Dormand-Prince 5(4) throughout (both lock-step batched).
* :class:`Diffrax`: any diffrax solver (``Diffrax(diffrax.Tsit5())``) with diffrax's PID controller, SaveAt, Event and
  RESULTS; a batch runs member by member through one compiled solve (``batch='map'``) or vectorised (``'vmap'``).

A solver for a new kind of flow (the non-smooth flow of ReLU networks) subclasses :class:`AbstractFlowSolver` and
implements :meth:`AbstractFlowSolver.run`; :func:`homflow.flow.integrate` (and every caller of it: ``gradient_flow``,
the checkpointed segments of ``homflow run``, the phase measurements, the joint narrow/wide flow) then uses it as is.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from ._engine import EVENT, MAX_STEPS, REACHED, UNDERFLOW, EngineOptions, first_step, run_engine
from ._results import RESULTS

__all__ = ["AbstractFlowSolver", "FlowOutput", "Auto", "RKC", "DOPRI5", "Diffrax", "SOLVERS", "as_solver",
           "default_atol"]


def default_atol(rtol: float, y0) -> np.ndarray:
    """The one default absolute tolerance of every flow: ``0.1 * rtol * ||y0[b]||`` per member (floored at the dtype's
    smallest normal number). It must follow the weight scale: from a tiny initialisation an absolute 1e-8 lets the
    early phase be taken in a few inaccurate steps; the factor 0.1 (about ``rtol`` times a typical weight) makes the
    control of individual weights relative (canonical problem to t = 250: endpoint error of ``Auto`` at rtol 1e-8 from
    1.1e-6 with ``rtol ||theta(0)||`` to 0.9e-7, docs/performance.md)."""
    y0 = np.atleast_2d(np.asarray(y0))
    tiny = float(np.finfo(y0.dtype).tiny) if np.issubdtype(y0.dtype, np.floating) else 1e-300
    return 0.1 * rtol * np.maximum(np.linalg.norm(y0, axis=1), tiny)


@dataclasses.dataclass(frozen=True)
class FlowOutput:
    """What a solver's :meth:`~AbstractFlowSolver.run` returns, per member b of the batch (numpy arrays).

    Attributes:
        ys: (B, S, P) states at the save times (rows past the member's end: anything, see ``n_saved``).
        n_saved: (B,) how many save times the member reached.
        t_end, y_end: (B,), (B, P): where each member stopped (``t1``, an event, or a failure).
        results: B :class:`RESULTS` items. event: (B,) index of the event that stopped the member (-1: none).
        stats: B dicts (``solver``, ``num_steps``, ``num_accepted_steps``, ``num_rejected_steps``, ``grad_evals``,
            and solver-specific counts). lam_max: (B,) largest Hessian eigenvalue estimate at the end (or ``None``),
            quoted in the reason of a stiffness stop. batch_stats: totals of a lock-step batch (or empty).
    """

    ys: np.ndarray
    n_saved: np.ndarray
    t_end: np.ndarray
    y_end: np.ndarray
    results: list
    event: np.ndarray
    stats: list
    lam_max: np.ndarray | None = None
    batch_stats: dict = dataclasses.field(default_factory=dict)


class AbstractFlowSolver(eqx.Module):
    """A flow solver: tolerances ``rtol`` / ``atol`` (``None``: :func:`default_atol`) and its options as fields.

    The plug-in point of :func:`homflow.flow.integrate`. A subclass implements one method,
    ``run(field, y0, t0, t1, save_ts, atol, events, max_steps) -> FlowOutput``:

    * ``field``: the vector field of ONE member, ``field(t, y) -> dy/dt``, an ``eqx.Module`` with ``field.problem``
      (the :class:`homflow.flow.Problem`: data, loss, architecture) and ``field.log_time``; a non-smooth solver reads
      the problem to build its own (Clarke) field and ignores ``field(t, y)``.
    * ``y0``: (B, P) initial states (a single flow is a batch of one); ``t0``, ``t1``: floats (in log time when
      ``field.log_time``); ``save_ts``: (S,) increasing save times in ``[t0, t1]`` (``save_ts[0] = t0``).
    * ``atol``: (B,) absolute tolerances (the default rule already applied); ``events``: ``None`` or
      ``events(t, y) -> (E,)`` (a member stops where a component changes sign); ``max_steps``: attempted steps.

    Everything else (validation, the default atol, log time, diagnostics, :class:`Trajectory` assembly, reasons,
    ``throw``) is :func:`integrate`'s, the same for every solver.
    """

    name: ClassVar[str] = "abstract"

    @abc.abstractmethod
    def run(self, field, y0, t0: float, t1: float, save_ts, atol, events, max_steps: int) -> FlowOutput:
        raise NotImplementedError

    def with_tolerances(self, rtol=None, atol=None) -> "AbstractFlowSolver":
        """A copy with ``rtol`` and/or ``atol`` replaced (``None`` keeps the current value)."""
        changes = {}
        if rtol is not None:
            changes["rtol"] = rtol
        if atol is not None:
            changes["atol"] = atol
        return dataclasses.replace(self, **changes) if changes else self


def _check_tol(name, v, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not (v > 0 and math.isfinite(v)):
        raise ValueError(f"`{name}` must be a finite number > 0{' or None' if allow_none else ''}; got {v!r}.")


# -- homflow's engine ---------------------------------------------------------------------------------------------------
_ENGINE_RESULTS = {REACHED: RESULTS.successful, EVENT: RESULTS.event_occurred, MAX_STEPS: RESULTS.max_steps_reached,
                   UNDERFLOW: RESULTS.step_size_underflow}


class _EngineSolver(AbstractFlowSolver):
    rtol: float = 1e-8
    atol: float | None = None
    options: EngineOptions = EngineOptions()
    method: ClassVar[str] = "auto"

    def __check_init__(self):
        _check_tol("rtol", self.rtol)
        _check_tol("atol", self.atol, allow_none=True)
        if not isinstance(self.options, EngineOptions):
            raise ValueError(f"`options` must be an EngineOptions; got {self.options!r}.")

    def run(self, field, y0, t0, t1, save_ts, atol, events, max_steps):
        dt = y0.dtype
        opts = dataclasses.replace(self.options, method=self.method)
        st = run_engine(field, y0, jnp.asarray(t0, dt), jnp.asarray(t1, dt), jnp.asarray(save_ts, dt),
                        jnp.asarray(self.rtol, dt), jnp.asarray(atol, dt), events, opts, int(max_steps))
        status, n_rkc = np.asarray(st.status), np.asarray(st.n_rkc)
        rho, t_sw = np.asarray(st.rho), np.asarray(st.t_switch)
        t_end, n_steps, n_rej = np.asarray(st.t), np.asarray(st.n_steps), np.asarray(st.n_rej)
        results, stats = [], []
        for b in range(y0.shape[0]):
            r = _ENGINE_RESULTS[int(status[b])]
            results.append(r)
            stats.append({
                "solver": self.name,
                "num_steps": int(n_steps[b]), "num_accepted_steps": int(np.asarray(st.n_acc)[b]),
                "num_rejected_steps": int(n_rej[b]), "grad_evals": int(np.asarray(st.n_f)[b]),
                "num_stiff_steps": int(n_rkc[b]), "num_rho_estimates": int(np.asarray(st.n_rho)[b]),
                "num_switches": int(np.asarray(st.n_switch)[b]), "max_stages": int(np.asarray(st.max_s)[b]),
                "spectral_radius": float(rho[b]),
                "t_switch": float(t_sw[b]) if np.isfinite(t_sw[b]) else None,
            })
        batch = {"loop_iterations": int(st.loops), "batched_evals": int(st.batched_f),
                 "utilisation": float(np.sum(n_steps)) / max(int(st.loops) * y0.shape[0], 1)}
        return FlowOutput(ys=np.asarray(st.saves), n_saved=np.asarray(st.idx), t_end=t_end, y_end=np.asarray(st.y),
                          results=results, event=np.asarray(st.event), stats=stats,
                          batch_stats=batch)


class Auto(_EngineSolver):
    """homflow's stiff-aware engine (the default solver): Dormand-Prince 5(4) while the flow is non-stiff, switching
    per member to RKC2 when ``stiff_after`` steps in a row are stability-limited (``h rho > stiff_ratio``), and back
    when RKC needs only 2 stages for ``nonstiff_after`` steps. Gradient evaluations: 6 per DOPRI5 step, ``s`` per
    ``s``-stage RKC step, one per power iteration of the spectral-radius estimate, one at the start; no Hessian.

    Arguments:
        rtol: relative tolerance (default 1e-8); atol: absolute tolerance (default ``None``: :func:`default_atol`).
        options: :class:`EngineOptions` (every constant of the loop, with documented defaults; its ``method`` is
            overridden by the solver class).
    """

    name: ClassVar[str] = "auto"
    method: ClassVar[str] = "auto"


class RKC(_EngineSolver):
    """The second-order Runge-Kutta-Chebyshev method (Sommeijer, Shampine & Verwer 1997) throughout, with rkc.f's
    spectral-radius estimate and predictive step-size controller (options as :class:`Auto`)."""

    name: ClassVar[str] = "rkc"
    method: ClassVar[str] = "stiff"


class DOPRI5(_EngineSolver):
    """The engine's Dormand-Prince 5(4) throughout (PI controller ``pcoeff`` / ``icoeff`` of :class:`EngineOptions`):
    an explicit method that batches in lock step; a max_steps stop is diagnosed (stiff / kink) from its free stiffness
    estimate."""

    name: ClassVar[str] = "dopri5-engine"
    method: ClassVar[str] = "explicit"


# -- diffrax -------------------------------------------------------------------------------------------------------------
# Vector-field evaluations per attempted step of the explicit diffrax solvers (first-same-as-last counted once).
_EVALS_PER_STEP = {diffrax.Tsit5: 6, diffrax.Dopri5: 6, diffrax.Dopri8: 12, diffrax.Bosh3: 3}


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)  # counts compilations: eqx.debug.get_num_traces(_diffrax_solve)
def _diffrax_solve(field, solver, y0, t0, t1, save_ts, rtol, atol, dt0, pcoeff, icoeff, events, n_events: int,
                   root_finder, error_mask, max_steps: int):
    def vf(t, y, args):
        return field(t, y)

    event = None
    if events is not None:
        conds = tuple((lambda e: (lambda t, y, args, **kw: events(t, y)[e]))(e) for e in range(n_events))
        event = diffrax.Event(conds if n_events > 1 else conds[0], root_finder=root_finder)
    norm = optx.rms_norm if error_mask is None else (lambda e: optx.rms_norm(e[: error_mask]))
    controller = diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=pcoeff, icoeff=icoeff, norm=norm)
    saveat = diffrax.SaveAt(subs=[diffrax.SubSaveAt(ts=save_ts), diffrax.SubSaveAt(t1=True)])
    sol = diffrax.diffeqsolve(diffrax.ODETerm(vf), solver, t0=t0, t1=t1, dt0=dt0, y0=y0, saveat=saveat,
                              stepsize_controller=controller, event=event, max_steps=max_steps, throw=False)
    mask = sol.event_mask if events is not None else None
    if mask is not None:
        mask = jnp.stack(mask) if isinstance(mask, (tuple, list)) else jnp.reshape(mask, (1,))
    return sol.ys, sol.ts[1][-1], sol.stats, RESULTS.promote(sol.result), mask


@eqx.filter_jit
def _first_steps(field, y0, t0, t1, rtol, atol, opts):
    f0 = jax.vmap(field)(jnp.full(y0.shape[:1], t0, y0.dtype), y0)
    n = getattr(field, "error_size", None) or y0.shape[1]
    return first_step(y0[:, :n], f0[:, :n], t0, t1, rtol, atol, opts)


class Diffrax(AbstractFlowSolver):
    """A diffrax solver with diffrax's PID step-size controller, events and saving.

    Arguments:
        solver: a ``diffrax.AbstractSolver`` instance (e.g. ``diffrax.Tsit5()``, ``diffrax.Kvaerno5(root_finder=...)``).
        rtol: relative tolerance (default 1e-8); atol: absolute tolerance (``None``: :func:`default_atol`).
        pcoeff, icoeff: PID coefficients (0.4 / 0.3 cut rejected steps by two thirds on the canonical problem).
        root_finder: locates events (default Newton at rtol 1e-10, atol 1e-12).
        batch: ``'map'`` (default: one compiled solve per member) or ``'vmap'`` (vectorised: every member then takes the
            steps of the stiffest; measured 7x slower on a CPU for spread-out problems).
    """

    solver: diffrax.AbstractSolver = diffrax.Tsit5()
    rtol: float = 1e-8
    atol: float | None = None
    pcoeff: float = 0.4
    icoeff: float = 0.3
    root_finder: optx.AbstractRootFinder = optx.Newton(rtol=1e-10, atol=1e-12)
    batch: str = eqx.field(default="map", static=True)

    def __check_init__(self):
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise ValueError(f"`solver` must be a diffrax solver instance; got {self.solver!r}.")
        _check_tol("rtol", self.rtol)
        _check_tol("atol", self.atol, allow_none=True)
        if self.batch not in ("map", "vmap"):
            raise ValueError(f"`batch` must be 'map' or 'vmap'; got {self.batch!r}.")

    @property
    def name(self) -> str:  # type: ignore[override]
        return type(self.solver).__name__.lower()

    def run(self, field, y0, t0, t1, save_ts, atol, events, max_steps):
        dt = y0.dtype
        B = y0.shape[0]
        f = lambda v: jnp.asarray(v, dtype=dt)  # noqa: E731  (arrays, not Python floats: no recompilation)
        atol = jnp.asarray(atol, dt)
        dt0s = _first_steps(field, y0, f(t0), f(t1), f(self.rtol), atol, EngineOptions())
        n_events = 0 if events is None else int(events.size)
        error_mask = getattr(field, "error_size", None)
        args = (f(t0), f(t1), jnp.asarray(save_ts, dt), f(self.rtol))

        def one(y, a, h0):
            return _diffrax_solve(field, self.solver, y, *args, a, h0, f(self.pcoeff), f(self.icoeff), events,
                                  n_events, self.root_finder, error_mask, int(max_steps))

        if self.batch == "vmap" and B > 1:
            outs = eqx.filter_vmap(one)(y0, atol, dt0s)
            pick = lambda tree, b: jax.tree_util.tree_map(lambda x: x[b] if np.ndim(x) > 0 else x, tree)  # noqa: E731
            members = [pick(outs, b) for b in range(B)]
        else:
            members = [one(y0[b], atol[b], dt0s[b]) for b in range(B)]
        evals = _EVALS_PER_STEP.get(type(self.solver))
        S = int(np.asarray(save_ts).shape[0])
        ys, n_saved, t_end, y_end, results, event, stats = [], [], [], [], [], [], []
        for b, (sol_ys, u_end, st, result, mask) in enumerate(members):
            sub, end = sol_ys
            sub = np.asarray(sub)
            u_end = float(u_end)
            ok_rows = np.all(np.isfinite(sub), axis=1) & (np.asarray(save_ts) <= u_end * (1 + 1e-12) + 1e-300)
            k = int(np.argmin(ok_rows)) if not ok_rows.all() else S
            n = int(st["num_steps"])
            s_b = {"solver": self.name, "num_steps": n, "num_accepted_steps": int(st["num_accepted_steps"]),
                   "num_rejected_steps": int(st["num_rejected_steps"]),
                   "grad_evals": evals * n + 1 if evals is not None else None,
                   "implicit": isinstance(self.solver, diffrax.AbstractImplicitSolver)}
            ev = -1
            if mask is not None and bool(result == RESULTS.event_occurred):
                fired = np.flatnonzero(np.asarray(mask))
                ev = int(fired[0]) if fired.size else -1
            ys.append(sub), n_saved.append(k), t_end.append(u_end), y_end.append(np.asarray(end)[-1])
            results.append(result), event.append(ev), stats.append(s_b)
        return FlowOutput(ys=np.stack(ys), n_saved=np.asarray(n_saved), t_end=np.asarray(t_end),
                          y_end=np.stack(y_end), results=results, event=np.asarray(event), stats=stats)


# -- the one table of names ---------------------------------------------------------------------------------------------
def _kvaerno(cls):
    return lambda rtol, atol: Diffrax(cls(root_finder=optx.Chord(rtol=1e-10, atol=1e-12)), rtol=rtol, atol=atol)


def _clarke(rtol, atol):
    from ._nonsmooth import Clarke  # the non-smooth solver builds on this module

    return Clarke(rtol=rtol, atol=atol)


SOLVERS = {
    "auto": lambda rtol, atol: Auto(rtol=rtol, atol=atol),
    "clarke": _clarke,
    "rkc": lambda rtol, atol: RKC(rtol=rtol, atol=atol),
    "stiff": lambda rtol, atol: RKC(rtol=rtol, atol=atol),
    "dopri5-engine": lambda rtol, atol: DOPRI5(rtol=rtol, atol=atol),
    "tsit5": lambda rtol, atol: Diffrax(diffrax.Tsit5(), rtol=rtol, atol=atol),
    "dopri5": lambda rtol, atol: Diffrax(diffrax.Dopri5(), rtol=rtol, atol=atol),
    "dopri8": lambda rtol, atol: Diffrax(diffrax.Dopri8(), rtol=rtol, atol=atol),
    "bosh3": lambda rtol, atol: Diffrax(diffrax.Bosh3(), rtol=rtol, atol=atol),
    "kvaerno5": _kvaerno(diffrax.Kvaerno5),
    "kvaerno3": _kvaerno(diffrax.Kvaerno3),
}
"""Names a config or a keyword may use for a solver, each with the object it builds from ``(rtol, atol)``: ``'auto'``
(:class:`Auto`, the default for smooth networks), ``'clarke'`` (:class:`homflow.flow.Clarke`, the non-smooth solver,
the default for ReLU-type networks), ``'rkc'`` / ``'stiff'`` (:class:`RKC`), ``'dopri5-engine'`` (:class:`DOPRI5`),
and the diffrax solvers ``'tsit5'``, ``'dopri5'``, ``'dopri8'``, ``'bosh3'``, ``'kvaerno5'``, ``'kvaerno3'``
(:class:`Diffrax`)."""


def as_solver(solver=None, *, rtol: float | None = None, atol: float | None = None) -> AbstractFlowSolver:
    """The solver object for ``solver``: an :class:`AbstractFlowSolver` (returned with ``rtol`` / ``atol`` replaced
    where given), a name of :data:`SOLVERS`, a diffrax solver instance (wrapped in :class:`Diffrax`), or ``None``
    (:class:`Auto`). ``rtol`` defaults to 1e-8 for names.

    Raises:
        ValueError: for an unknown name (the allowed names listed) or another type.
    """
    if isinstance(solver, AbstractFlowSolver):
        return solver.with_tolerances(rtol, atol)
    rt = 1e-8 if rtol is None else rtol
    if solver is None:
        return Auto(rtol=rt, atol=atol)
    if isinstance(solver, diffrax.AbstractSolver):
        return Diffrax(solver, rtol=rt, atol=atol)
    if isinstance(solver, str) and solver.lower() in SOLVERS:
        return SOLVERS[solver.lower()](rt, atol)
    raise ValueError(f"`solver` must be one of {tuple(SOLVERS)}, a solver object (Auto, RKC, DOPRI5, Diffrax, ...) "
                     f"or a diffrax solver; got {solver!r}.")
