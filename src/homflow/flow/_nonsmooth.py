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
from functools import partial
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._block_factor import block_normals, block_slots
from ._factor_cache import FactorCache
from ._clarke import KinkedProblem, _padded, clarke_min_norm, jit, mode_slopes, default_kink_tol, default_slope_tol, is_kinked, make_kinked
from ._nonsmooth_kernel import BUDGET, SAVE, UNDERFLOW, Controls, _aug_field, advance, as_factor, unpack
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
        slope_noise: a sliding slope that rounding cannot resolve to ``slope_tol`` gets a tolerance of its own,
            ``slope_noise`` times its measured rounding sensitivity (default 8; ``None``: off). At an event where a
            sliding slope reached a bound, the driver evaluates the slopes at two states within ``4 eps`` (relative,
            per entry) of the located one; a unit whose slope moves by more than ``slope_tol / slope_noise`` keeps
            the larger tolerance while it slides, and the event is no event when the target's slope lies within its
            tolerance of ``[alpha, 1]`` (``stats['slope_noise_keeps']``). Seen near Clarke-critical points, where the
            velocity is a small residue of large per-sample forces and a unit's slope, the ratio of two small
            numbers, moved by 1e-7 to 5e-5 under a perturbation of ``theta`` at rounding level while the velocity
            moved by 3.5e-4 of itself: slope events there followed rounding, up to ~1,000 per 1e-3 of log time.
            A slope off by less than its rounding sensitivity moves the velocity by about as much as that rounding
            does (docs/nonsmooth.md).
        n_slope_iters: BVLS re-linearisations of the mode decision at an event for nets with several hidden layers
            (the gradient is multilinear in the slopes there; two-layer nets need one and get one).
        pcoeff, icoeff: PI controller coefficients; safety, factor_min, factor_max: step-size factor limits.
        max_steps: attempted steps (including event-location steps) before giving up.
        max_locate: regula-falsi iterations per event; zeno_limit: consecutive events without progress in time before
            the solve stops (a Zeno point or an inconsistent mode). zeno_progress: an event less than this far (relative
            to ``max(|u|, 1)``) after the previous one counts as no progress (default 1e-10; two modes alternating with
            progress ~1e-11 per event are a stall, not a flow).
        rest_test: stop integrating where the flow is at rest to the tolerance: by Cauchy-Schwarz and the energy
            identity (``L >= 0``) the state moves by at most ``sqrt((t1 - t) L(theta(t)))`` after ``t``; once that
            is below ``rtol ||theta|| + atol`` the remaining saves are the current state (``stats['at_rest_from']``,
            ``stats['rest_bound']``). A square-loss flow that interpolates gets there (its loss decays
            exponentially); classification losses decay like ``1/t`` and do not. Tested every save and every 50
            events.
        project: project onto the sliding set's kink surfaces after every accepted step (exact for two-layer nets, a
            Gauss-Newton step for deeper ones).
        zeno_escape, escape_after, max_escapes: escape steps (docs/nonsmooth.md, item 10). After ``escape_after``
            consecutive events without progress in time (a point where no mode the decision builds is consistent:
            seen where a deep net's sliding slopes, coupled through shared weights, leave ``[alpha, 1]`` for every
            sliding set the first-order sides allow) the driver takes one explicit Euler step of the inclusion along
            the minimal-norm element of the Clarke set there, moving ``theta`` by at most ``zeno_escape ||theta||``
            (default 1e-10; ``None``: no escapes), and decides the mode again where it lands (``_Driver.escape``).
            escape_growth, zeno_escape_max: an escape that lands in another stall (no progress in time since the
            previous one) is ``escape_growth`` times longer than the previous, up to ``zeno_escape_max ||theta||``
            (defaults 10 and 1e-6); after progress the next starts at ``zeno_escape`` again.
            ``stats['zeno_escapes']`` counts them; after ``max_escapes`` in one solve a stall is a Zeno stop.
        chatter_limit: a unit flipped this many times in consecutive events without progress in time is chattering
            at its kink; when the mode decision would flip it again it slides instead (its slope from the sliding
            field, which must lie in ``[alpha, 1]``; docs/nonsmooth.md).
        cycle_limit: a stall (events without progress in time) in which the decision returns to one mode this many
            times is a cycle of modes that no further decision leaves (seen: a wide depth-3 net's unit entering and
            leaving a sliding set of 113 at one time, ~0.6 s per event): the escape step is taken at once instead of
            after ``escape_after`` events (default 6: after the chatter rule has had its ``chatter_limit`` flips).
        method: ``'auto'`` (default: Dormand-Prince 5(4), switching to Runge-Kutta-Chebyshev while the step is limited by
            stability rather than accuracy, on to the linearly implicit Rosenbrock pair of ode23s while RKC's steps
            are limited by its stage budget or cost more stages than a Rosenbrock step, and back down),
            ``'explicit'`` (DOPRI5 throughout), ``'stiff'`` (RKC throughout) or ``'implicit'`` (Rosenbrock
            throughout). The late phase of a flow is often stiff (the spectral radius of the loss's Hessian reaches
            1e3..1e4 while the state barely moves; log time multiplies it by ``1 + t``): RKC's stage count grows like
            ``sqrt(h rho)``, DOPRI5's step count like ``h rho``, and the Rosenbrock step (one Jacobian and LU per
            step) is limited by accuracy only (flow/_nonsmooth_kernel.py).
        stiff_ratio, stiff_after: switch to RKC after ``stiff_after`` accepted DOPRI5 steps with ``h rho > stiff_ratio``
            (``rho`` the pair's free estimate; its stability bound is 3.3), counted until a call with mostly non-stiff
            steps; nonstiff_ratio, nonstiff_after: back to DOPRI5 after ``nonstiff_after`` accepted 2-stage RKC steps
            with ``h rho < nonstiff_ratio``. s_max: most RKC stages per step; rho_every: accepted RKC steps between
            spectral-radius re-estimates (rkc.f's 25). implicit_max_params: the Rosenbrock rung is used only for
            problems with at most this many parameters (its Jacobian is ``P x P``, its LU ``O(P^3)`` per step).
        crossings: pass transversal crossings (one unit at its kink, both one-sided fields moving it across, the
            sliding slopes still admissible) inside the compiled loop as sign flips, instead of returning to the host
            for the mode decision (which gives the same flip there; flow/_nonsmooth_kernel.py). Every other event
            goes to the host. ``stats['crossings_in_loop']`` counts them.
        factor_updates: for nets with one hidden layer, form the sliding factor of a new sliding set by bordering the
            inverse Gram matrix of a recent set that differs by a few units (Schur complements, ``O(k^2)``) instead of
            from scratch (``O(K^2 P + K^3)`` at the padded capacity ``K``), with safeguards and a from-scratch refresh
            (flow/_factor_cache.py). ``stats['factors_built']``, ``stats['factors_updated']`` count them. Used when
            ``block_factors`` is off (and, without bordering, for the joint narrow + wide problem).
        block_factors: for nets with one hidden layer, use the block-diagonal structure of the kink normals' Gram
            matrix (one block per neuron or channel, flow/_block_factor.py): the compiled loop forms a sliding set's
            factor itself, so new sliding sets cost the host nothing and an evaluation ``O(K w)`` (``w`` the fan-in);
            the mode decision's BVLS takes the neurons as its components.
        event_guess, guess_evals: at an event, first try the mode of the event's own change (the unit that reached
            its kink slides; the sliding unit whose slope reached a bound leaves on that side) and accept it, or a
            mode the consistency checks reach from it within ``guess_evals`` field evaluations, when it is
            consistent (a first-order point of the minimal-norm problem) and its velocity no longer than the one the
            flow arrived with (which the minimal-norm element's cannot exceed; ``_Driver.resolve``), so the
            minimal-norm element (a BVLS over the candidates' slopes, re-linearised for deep nets, on a dense
            ``P x K`` Jacobian) is formed only where the guess fails. ``None`` (default): on for nets with several
            hidden layers, where that BVLS was ~30 ms of a ~60 ms decision (a (30, 30) MLP with 130 units sliding);
            nets with one hidden layer have cheap block-wise BVLS and keep the direct decision.
            ``stats['decisions_guessed']`` counts the decisions taken this way.
        repelling: what the flow does where a sliding mode turns repelling (nets with one hidden layer: the unit's
            adjoint ``dF/dh_e`` turns negative, e.g. its neuron's output weight passes through 0 while it slides;
            both one-sided fields then point away from the kink and the inclusion's solution is not unique;
            docs/nonsmooth.md). ``'leave'`` (default): the unit leaves the sliding set at the first compiled call
            that starts with it repelling, to the side of the bound its slope is nearer (``1`` above
            ``(1 + alpha) / 2``, else ``alpha``: a GD iterate zig-zagging across an attracting kink spends the share
            ``(s - alpha) / (1 - alpha)`` of its steps on the positive side, so that is the side it is likelier to
            be on when the kink turns repelling), as a perturbed flow or GD with a small step would
            (``stats['repelling_left']``; measured: GD converges to it at first order where it did not converge to
            the sliding one). ``'stay'``: keep the minimal-norm sliding solution (also a solution of the inclusion,
            but one no perturbation follows). Both report the point (``stats['repelling_from']``, the reason).
            Neither side rule is the limit of GD in every case (GD's side depends on the phase of its zig-zag).
        pivot: what the mode decision's consistency loop (``_Driver._settle``) does first with a unit at its kink whose
            field points into the other side. ``'slide'``: it joins the sliding set and its sliding slope decides
            (Murty's least-index pivot of the box complementarity problem a consistent mode solves; flipped only if
            it comes back beyond the near bound). ``'flip'``: it crosses at once, and slides if it comes back.
            ``'auto'`` (default): ``'slide'`` for nets with several hidden layers, where flipping first cycled
            (measured on a depth-3 ReLU net: 69 of 122 decisions inconsistent after ``2|C| + 2`` evaluations, the
            flow held at t ~ 26; with ``'slide'`` none, and it reaches t1), ``'flip'`` for one hidden layer, whose
            minimal-norm element is exact (a convex problem): there the loop only meets units whose slope the BVLS
            left at a bound within its tolerance, both rules end in equally consistent modes, and ``'flip'`` keeps
            the flows measured before (docs/nonsmooth.md, "Status, December 5, 2026, night").
    """

    rtol: float = 1e-8
    atol: float | None = None
    kink_tol: float | None = None
    slope_tol: float | None = None
    slope_noise: float | None = 8.0
    n_slope_iters: int = 2
    pcoeff: float = 0.4
    icoeff: float = 0.3
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    max_steps: int = 1_000_000
    max_locate: int = 60
    zeno_limit: int = 200
    zeno_progress: float = 1e-10
    rest_test: bool = True
    project: bool = True
    zeno_escape: float | None = 1e-10
    escape_growth: float = 10.0
    zeno_escape_max: float = 1e-6
    escape_after: int = 50
    max_escapes: int = 1000
    chatter_limit: int = 3
    cycle_limit: int = 6
    crossings: bool = True
    method: str = "auto"
    stiff_ratio: float = 2.5
    stiff_after: int = 15
    nonstiff_ratio: float = 0.5
    nonstiff_after: int = 25
    s_max: int = 250
    rho_every: int = 25
    implicit_max_params: int = 2000
    factor_updates: bool = True
    block_factors: bool = True
    event_guess: bool | None = None
    guess_evals: int = 3
    repelling: str = "leave"
    pivot: str = "auto"

    def __post_init__(self):
        if self.repelling not in ("stay", "leave"):
            raise ValueError(f"`repelling` must be 'stay' or 'leave'; got {self.repelling!r}.")
        if self.pivot not in ("auto", "slide", "flip"):
            raise ValueError(f"`pivot` must be 'auto', 'slide' or 'flip'; got {self.pivot!r}.")
        if self.method not in ("auto", "explicit", "stiff", "implicit"):
            raise ValueError(f"`method` must be 'auto', 'explicit', 'stiff' or 'implicit'; got {self.method!r}.")
        for name in ("rtol", "safety", "factor_max", "stiff_ratio", "nonstiff_ratio", "zeno_progress"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"`{name}` must be a finite number > 0; got {v!r}.")
        for name in ("atol", "kink_tol", "slope_tol", "zeno_escape", "slope_noise"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"`{name}` must be None or a finite number > 0; got {v!r}.")
        if not (isinstance(self.escape_growth, (int, float)) and math.isfinite(self.escape_growth)
                and self.escape_growth >= 1):
            raise ValueError(f"`escape_growth` must be a finite number >= 1; got {self.escape_growth!r}.")
        v = self.zeno_escape_max
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"`zeno_escape_max` must be a finite number > 0; got {v!r}.")
        if self.zeno_escape is not None and v < self.zeno_escape:
            raise ValueError(f"`zeno_escape_max` must be >= zeno_escape = {self.zeno_escape!r}; got {v!r}.")
        if not 0 < self.factor_min < 1:
            raise ValueError(f"`factor_min` must lie in (0, 1); got {self.factor_min!r}.")
        for name in ("n_slope_iters", "max_steps", "max_locate", "zeno_limit", "escape_after", "max_escapes",
                     "chatter_limit", "stiff_after", "nonstiff_after", "rho_every", "implicit_max_params",
                     "guess_evals", "cycle_limit"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {v!r}.")
        if isinstance(self.s_max, bool) or not isinstance(self.s_max, (int, np.integer)) or self.s_max < 2:
            raise ValueError(f"`s_max` must be an integer >= 2; got {self.s_max!r}.")
        if self.event_guess is not None and not isinstance(self.event_guess, (bool, np.bool_)):
            raise ValueError(f"`event_guess` must be None, True or False; got {self.event_guess!r}.")
        for name in ("project", "crossings", "rest_test", "factor_updates", "block_factors"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"`{name}` must be True or False; got {getattr(self, name)!r}.")


# ----------------------------------------------------------------------------------------------------------------------
# Compiled pieces (one compilation per architecture, data shape and sliding-set capacity K); the per-step loop is
# flow/_nonsmooth_kernel.py.

@jit
def _preacts(problem, theta):
    return problem.preactivations(theta)


def _dz_of(problem, theta, v, signs, idx, valid, s):
    """``dz/dt`` of every pre-activation along ``v`` in the mode ``(signs, idx, valid)`` with slopes ``s`` at ``idx``
    (:func:`~homflow.flow._clarke.mode_slopes`)."""
    S = mode_slopes(signs, problem.alpha, idx, valid, s, theta.dtype)
    return jax.jvp(lambda th: problem.preactivations_at(th, S), (theta,), (v,))[1]


_dz = jit(_dz_of)


@partial(jit, static_argnames=("log_time",))
def _field_dz(problem, y, u, signs, idx, valid, fac, log_time):
    """The augmented field of the mode ``(signs, idx, valid)`` at ``y``, its sliding slopes and ``dz/du`` of every
    pre-activation along it (:func:`_dz`): one compiled call per candidate mode of a mode decision."""
    f, s = _aug_field(problem, y, u, log_time, signs, idx, valid, as_factor(fac, idx, valid))
    return f, s, _dz_of(problem, y[:-1], f[:-1], signs, idx, valid, s)


@jit
def _diag(problem, thetas):
    return jax.vmap(lambda th: (problem.log_loss(th), jnp.linalg.norm(th)))(thetas)


# ----------------------------------------------------------------------------------------------------------------------
# The host-side driver: one compiled call per save time / event; the mode decision at events.

_CALL_STEPS = 20_000  # attempted steps per compiled call at most (the host checks max_steps and reports between calls)


class _Mode:
    """Activation pattern and sliding set, with the padded arrays the compiled pieces take."""

    def __init__(self, signs: np.ndarray, sliding=(), layout=None):
        self.signs = np.asarray(signs).astype(np.int8)
        self.sliding = sorted(int(e) for e in sliding)
        self.layout = layout
        if layout is None:  # capacity 16, 64, 256, ...: one compilation each
            idx, valid = _padded(self.sliding)
            self.slot = np.arange(len(self.sliding))
        else:  # the slots of a block-diagonal factor (flow/_block_factor.py)
            idx, valid, self.slot = layout(self.sliding)
        self._arrays = (self.signs, idx, valid)

    def like(self, signs, sliding):
        """A mode with the same layout."""
        return _Mode(signs, sliding, self.layout)

    def arrays(self):
        """``(signs, idx, valid)``; ``idx[slot[k]]`` is the ``k``-th sliding unit."""
        return self._arrays

    def key(self):
        return self.signs.tobytes(), tuple(self.sliding)


class _Driver:
    """Host-side state of one non-smooth solve: the problem, options, tolerances and statistics."""

    def __init__(self, problem: KinkedProblem, sol: ClarkeFlow, theta0, log_time: bool):
        self.problem, self.sol, self.log_time = problem, sol, log_time
        dtype = theta0.dtype
        self.dtype = dtype
        self.kt = default_kink_tol(dtype) if sol.kink_tol is None else sol.kink_tol
        self.st = default_slope_tol(dtype) if sol.slope_tol is None else sol.slope_tol
        self.alpha = problem.alpha
        self.slope_noise: dict[int, float] = {}  # sliding unit -> its slope tolerance, where above slope_tol
        self._noise_rng = np.random.default_rng(0)
        nrm0 = float(jnp.linalg.norm(theta0))
        self.nrm0 = nrm0
        atol = sol.atol if sol.atol is not None else 0.1 * sol.rtol * max(nrm0, float(jnp.finfo(dtype).tiny))
        self.atol = atol
        A = self.A
        self.ctl = Controls(rtol=A(sol.rtol), atol=A(atol), kt=A(self.kt), st=A(self.st), alpha=A(self.alpha),
                            pcoeff=A(sol.pcoeff), icoeff=A(sol.icoeff), safety=A(sol.safety),
                            factor_min=A(sol.factor_min), factor_max=A(sol.factor_max),
                            max_locate=jnp.asarray(sol.max_locate, jnp.int32),
                            rho_every=jnp.asarray(sol.rho_every, jnp.int32), s_max=jnp.asarray(sol.s_max, jnp.int32),
                            s_switch=jnp.asarray(self._s_switch(sol, theta0.shape[0]), jnp.int32),
                            stiff_ratio=A(sol.stiff_ratio), nonstiff_ratio=A(sol.nonstiff_ratio),
                            switch_after=jnp.asarray(2**30, jnp.int32))
        # calls of a rung with a rung above (method 'auto') end once the switch up is due
        self.ctl_up = eqx.tree_at(lambda c: c.switch_after, self.ctl, jnp.asarray(sol.stiff_after, jnp.int32))
        self.level = {"auto": "dopri5", "explicit": "dopri5", "stiff": "rkc", "implicit": "ros2"}[sol.method]
        self._implicit_ok = theta0.shape[0] <= sol.implicit_max_params
        self._stiff_cnt = self._easy_cnt = 0
        self._v_rho = None  # the power method's direction, warm-starting every RKC call
        self.switched = False  # set when a call switched methods: the controller's error memory is reset
        self.explicit_once = False  # the next stepping call uses DOPRI5 (a crossing a stiff rung did not locate)
        self.last_method = "dopri5"  # the method of the last stepping call
        self.repelling: set[int] = set()  # sliding units seen with a repelling mode (note_repelling)
        self.repelling_now = np.zeros(0, np.int64)  # those of the last call's start
        self.left_repelling: set[int] = set()  # units that left a repelling mode, until off their kink (_candidates)
        self.proj_iters = 1 if problem.n_hidden == 1 else 2
        self.event_guess = problem.n_hidden > 1 if sol.event_guess is None else bool(sol.event_guess)
        self.slide_first = problem.n_hidden > 1 if sol.pivot == "auto" else sol.pivot == "slide"  # ClarkeFlow.pivot
        # a plain one-hidden-layer problem: block-diagonal factors formed in the compiled loop, modes laid out in
        # their slots (flow/_block_factor.py); otherwise sliding set -> SlidingFactor (flow/_clarke.py), bordered from
        # the last ones (flow/_factor_cache.py; a joint problem's pair of factors from scratch)
        self._blocks, self.layout, self._groups = None, None, None
        if problem.n_hidden == 1 and isinstance(problem, KinkedProblem) and sol.block_factors:
            self._blocks = block_normals(problem, theta0)
        if problem.n_hidden > 1:
            # normals and their Gram matrix are formed at every evaluation, at the padded capacity: capacities that
            # double (16, 32, 64, ...) instead of growing 4-fold cost a compilation more per doubling but halve the
            # padding (the Gram matrix of 97 units at capacity 256 was ~10 ms of an evaluation, at 128 ~4 times
            # less); from 128 on also the capacities halfway (192, 384, ...): a wide net's set of 260 units at 384
            # instead of 512 (the Gram matrix and its factor grow with the square and the cube of the capacity)
            self.layout = lambda sliding: (*_padded(sliding, growth=2, halves_from=128), np.arange(len(sliding)))
        if self._blocks is not None:
            group, m = np.asarray(self._blocks.group), self._blocks.n_groups
            slots = {}  # sliding set -> its slots: the mode decision lays out the same few sets again and again

            def layout(sliding):
                key = tuple(sliding)
                if key not in slots:
                    if len(slots) >= 4096:
                        slots.clear()
                    arrays = block_slots(group, m, sliding)
                    for a in arrays:
                        a.flags.writeable = False  # shared by every mode with this set
                    slots[key] = arrays
                return slots[key]

            self.layout = layout
            cols = np.asarray(self._blocks.cols)
            width = np.asarray(self._blocks.width)
            self._groups = (group, [cols[j, :width[j]] for j in range(m)])  # the BVLS's components
        self._fcache = (FactorCache(problem, theta0, border=isinstance(problem, KinkedProblem) and sol.factor_updates)
                        if problem.n_hidden == 1 and self._blocks is None else None)
        self.stats = dict(num_steps=0, num_accepted_steps=0, num_rejected_steps=0, num_locate_steps=0,
                          grad_evals=0, kink_normals=0, events=0, pattern_changes=0, sliding_entered=0,
                          sliding_left=0, max_sliding=0, max_constraint_drift=0.0, max_constraint_residual=0.0,
                          chatter_slides=0, decisions_guessed=0, zeno_escapes=0, crossings_in_loop=0,
                          slope_noise_keeps=0, slope_noise_units=0, relocations=0,
                          step_verdicts=0, stiff_steps=0, repelling_units=0, repelling_from=None,
                          repelling_unit=None, repelling_left=0,
                          implicit_steps=0, switches_to_stiff=0, switches_to_implicit=0, switches_to_explicit=0,
                          spectral_radius=0.0, solver="clarke", log_time=bool(log_time))

    def A(self, x):
        return np.asarray(x, self.dtype)

    @staticmethod
    def _s_switch(sol, P):
        """RKC stages per step beyond which the Rosenbrock step is the cheaper one: its cost counted as ``3 + P``
        evaluations (three fields and a Jacobian of ``P`` forward-mode columns; measured on the sweep's problems, P 40
        to 430: 0.3 to 1.7 times that in wall time). ``s_max`` where the Rosenbrock rung is not used."""
        return min(sol.s_max, 3 + P) if P <= sol.implicit_max_params else sol.s_max

    def evaluate(self, y, u, mode):
        """``(f, s, z, scale)`` at ``y``: the augmented field of ``mode``, its sliding slopes, the pre-activations and
        their bounds (the compiled loop called for no step)."""
        out = self.advance(y, u, 0.0, 1.0, u, mode, 0)
        return out["f0"], out["s0"], out["z0"], out["scale0"]

    def st_slots(self, mode):
        """The slope tolerance of every slot of ``mode`` where it exceeds ``slope_tol`` (0 elsewhere: the compiled
        loop takes the larger of the two)."""
        out = np.zeros(mode.arrays()[1].shape[0], self.dtype)
        if self.slope_noise:
            for k, e in enumerate(mode.sliding):
                out[mode.slot[k]] = self.slope_noise.get(e, 0.0)
        return out

    def slope_tols(self, units):
        """The slope tolerance of each of ``units`` (``slope_tol`` or its own, :meth:`measure_slope_noise`)."""
        return np.asarray([max(self.st, self.slope_noise.get(int(e), 0.0)) for e in units], float)

    def measure_slope_noise(self, y, u, mode, s0):
        """How far rounding moves the sliding slopes of ``mode`` at ``y`` (slopes ``s0``, per slot): the largest
        change at two states within ``4 eps`` of ``y`` (each entry of ``theta`` times ``1 +- 4 eps``, signs drawn
        once per call). Units whose change times ``slope_noise`` exceeds ``slope_tol`` keep that as their own slope
        tolerance (the largest measured) while they slide (``ClarkeFlow.slope_noise``)."""
        theta = np.asarray(y[:-1])
        eps = float(np.finfo(self.dtype).eps)
        d = np.zeros(len(mode.sliding))
        for _ in range(2):
            y1 = np.array(y, dtype=self.dtype)
            y1[:-1] = theta * (1.0 + 4 * eps * self._noise_rng.choice([-1.0, 1.0], theta.shape[0]))
            _, s1, _, _ = self.evaluate(y1, u, mode)
            d = np.maximum(d, np.abs(np.asarray(s1)[mode.slot] - np.asarray(s0)[mode.slot]))
        tol = self.sol.slope_noise * d
        for e, t in zip(mode.sliding, tol):
            if t > max(self.st, self.slope_noise.get(e, 0.0)):
                self.stats["slope_noise_units"] += int(e not in self.slope_noise)
                self.slope_noise[e] = float(t)

    def rounding_event(self, y, u, mode, k, s0):
        """Whether the event of slot ``k``'s sliding slope reaching a bound (at ``y``, slopes ``s0``) is rounding's:
        after :meth:`measure_slope_noise`, the unit's slope lies within its own tolerance (above ``slope_tol``) of
        ``[alpha, 1]``. The mode is then kept (``stats['slope_noise_keeps']``)."""
        e = int(mode.arrays()[1][k])
        if e not in mode.sliding:
            return False
        self.measure_slope_noise(y, u, mode, s0)
        tol = float(self.slope_tols([e])[0])
        s = float(np.asarray(s0)[k])
        if tol > self.st and self.alpha - tol <= s <= 1.0 + tol:
            self.stats["slope_noise_keeps"] += 1
            return True
        return False

    def forget_slope_noise(self, mode):
        """Units that left the sliding set lose their own slope tolerance (measured again if they come back)."""
        if self.slope_noise:
            keep = set(mode.sliding)
            for e in [e for e in self.slope_noise if e not in keep]:
                del self.slope_noise[e]

    def advance(self, y, u, h, err_prev, u_stop, mode, n_max, project_first=False):
        """Many steps of ``mode`` in one compiled call (flow/_nonsmooth_kernel.py); updates the statistics."""
        signs, idx, valid = mode.arrays()
        # evaluations (n_max = 0) use the DOPRI5 kernel: no spectral radius needed
        method = self.level if n_max > 0 else "dopri5"
        override = n_max > 0 and self.explicit_once  # one call of DOPRI5 after a crossing left unlocated
        if override:
            method, self.explicit_once = "dopri5", False
        if n_max > 0:
            self.last_method = method
        extra = {}
        if method != "dopri5":
            v = self._v_rho
            if v is None:  # a generic start: every direction of the state (a joint flow's wide half off T theta too)
                v = np.random.default_rng(0).standard_normal(y.shape[0] - 1).astype(self.dtype)
            extra = dict(method=method, v_rho=v, rho_iters0=np.asarray(6, np.int32))
        has_up = self.sol.method == "auto" and (method == "dopri5" or (method == "rkc" and self._implicit_ok))
        ctl = self.ctl_up if n_max > 0 and has_up else self.ctl
        out = advance(self.problem, y, self.A(u), self.A(h), self.A(err_prev), self.A(u_stop), signs, idx, valid,
                      ctl, np.asarray(n_max, np.int32), np.asarray(bool(project_first)), self.log_time,
                      bool(self.sol.project), self.proj_iters, bool(self.sol.crossings), self.factor(mode),
                      st_slot=self.st_slots(mode), **extra)
        out = unpack(jax.device_get(out))
        self.repelling_now = np.zeros(0, np.int64)
        if mode.sliding and n_max > 0:  # stepping calls: the flow's own mode (evaluations may try others)
            self.note_repelling(mode, out["c0"], u)
        st = self.stats
        if n_max > 0 and self.sol.repelling == "leave" and self.repelling_now.size:
            # the host leaves the repelling units at the call's start (integrate_nonsmooth): its steps are not taken
            st["grad_evals"] += int(out["n_ev"])
            return out
        n_att, n_loc, n_acc = int(out["n_att"]), int(out["n_loc"]), int(out["n_acc"])
        st["num_steps"] += n_att + n_loc
        st["num_accepted_steps"] += n_acc
        st["num_rejected_steps"] += int(out["n_rej"])
        st["num_locate_steps"] += n_loc
        n_ev = int(out["n_ev"])  # the start value, the stages of every step, power iterations, Jacobian columns
        st["grad_evals"] += n_ev
        st["kink_normals"] += len(mode.sliding) * n_ev
        if method != "dopri5":
            self._v_rho = out["v_rho"]
            st["stiff_steps" if method == "rkc" else "implicit_steps"] += n_acc
            st["spectral_radius"] = float(out["rho"])
        if n_max > 0 and self.sol.method == "auto" and not override:
            self._switch(method, n_acc, int(out["n_stiff"]), int(out["n_easy"]))
        st["max_constraint_drift"] = max(st["max_constraint_drift"], float(out["drift"]))
        st["max_constraint_residual"] = max(st["max_constraint_residual"], float(out["resid"]))
        n_cross = int(out["n_cross"])
        if n_cross:
            st["events"] += n_cross
            st["pattern_changes"] += n_cross
            st["crossings_in_loop"] += n_cross
        return out

    def note_repelling(self, mode, c0, u):
        """Record sliding units of ``mode`` whose mode repels at the call's start ``u`` (one hidden layer: the
        adjoint ``c_e = dF/dh_e < 0``, :func:`~homflow.flow._nonsmooth_kernel.slot_adjoint`; below ``-64 eps`` times
        the set's largest ``|c_e|``). There both one-sided fields point away from the kink and the inclusion has other
        solutions (GD, and any perturbed flow, leave the kink to one side); what the flow does is
        ``ClarkeFlow.repelling`` (``repelling_now`` holds this call's units). ``stats['repelling_units']`` counts the
        units, ``stats['repelling_from']`` / ``['repelling_unit']`` the first time and unit; the reason says so."""
        c = np.asarray(c0)[mode.slot]
        if not c.size or not np.any(c):
            return
        thr = 64 * float(np.finfo(c.dtype).eps) * float(np.max(np.abs(c)))
        rep = np.asarray(mode.sliding, np.int64)[c < -thr]
        self.repelling_now = rep
        new = set(rep.tolist()) - self.repelling
        if new:
            self.repelling |= new
            st = self.stats
            st["repelling_units"] = len(self.repelling)
            if st["repelling_from"] is None:
                st["repelling_from"], st["repelling_unit"] = _t(u, self.log_time), int(rep[0])

    def nearer_side(self, s):
        """The side (+1 / -1) of the slope bound (``1`` / ``alpha``) nearer to the slope(s) ``s``: where a unit at its
        kink leaves to when its slope is at a bound, or when it leaves a repelling sliding mode."""
        return np.where(np.asarray(s) > 0.5 * (1.0 + self.alpha), 1, -1)

    def leave_repelling(self, mode, s0):
        """``mode`` less the units of :attr:`repelling_now`, each on the side of its slope's nearer bound (``s0``:
        the slopes per slot at the call's start; ``ClarkeFlow.repelling = 'leave'``); they keep that side in the mode
        decisions until off their kink (:meth:`_candidates`)."""
        signs, slide = mode.signs.copy(), set(mode.sliding)
        s0 = np.asarray(s0)
        for e in self.repelling_now.tolist():
            signs[e] = self.nearer_side(s0[mode.slot[mode.sliding.index(e)]])
            slide.discard(e)
            self.left_repelling.add(e)
        self.stats["repelling_left"] += int(self.repelling_now.size)
        self.stats["sliding_left"] += int(self.repelling_now.size)
        new = mode.like(signs, slide)
        self.forget_slope_noise(new)
        return new

    def _switch(self, method, n_acc, n_stiff, n_easy):
        """The automatic method ladder DOPRI5 -> RKC -> Rosenbrock (``ClarkeFlow.method = 'auto'``): up after
        ``stiff_after`` accepted steps limited by stability or cost (DOPRI5: ``h rho > stiff_ratio``; RKC: the step
        shortened to fit ``s_max`` stages, or taking more stages than a Rosenbrock step costs, :meth:`_s_switch`),
        counted until a call with mostly unlimited steps; down after ``nonstiff_after`` easy steps (RKC: 2 stages with
        ``h rho < nonstiff_ratio``; Rosenbrock: steps RKC would take with under half the stages of
        :meth:`_s_switch`)."""
        st = self.stats
        up = {"dopri5": "rkc", "rkc": "ros2" if self._implicit_ok else None, "ros2": None}[method]
        down = {"dopri5": None, "rkc": "dopri5", "ros2": "rkc"}[method]
        if up is not None:
            if n_acc >= 6 and 2 * n_stiff < n_acc:
                self._stiff_cnt = 0
            self._stiff_cnt += n_stiff
            if self._stiff_cnt >= self.sol.stiff_after:
                self.level, self._stiff_cnt, self._easy_cnt, self.switched = up, 0, 0, True
                st["switches_to_stiff" if up == "rkc" else "switches_to_implicit"] += 1
                return
        if down is not None:
            self._easy_cnt += n_easy
            if self._easy_cnt >= self.sol.nonstiff_after:
                self.level, self._stiff_cnt, self._easy_cnt, self.switched = down, 0, 0, True
                st["switches_to_explicit" if down == "dopri5" else "switches_to_stiff"] += 1

    def factor(self, mode):
        """What the compiled loop applies for nets whose kink normals do not move with ``theta`` (one hidden layer):
        the problem's :class:`~homflow.flow._block_factor.BlockNormals` (the loop forms the set's factor), or the
        sliding set's :class:`~homflow.flow._clarke.SlidingFactor`, the last 32 sets kept (:class:`FactorCache`);
        ``None`` otherwise."""
        if self._blocks is not None:
            return self._blocks
        return None if self._fcache is None else self._fcache.get(tuple(mode.sliding))

    def step_verdict(self, y, u, mode, target, chatter=()):
        """The mode after an event where the mode decision kept the mode the step left. That mode would find the same
        event again within a step (its target sits at the kink or slope bound and the step moved it across), so the
        flow would stop or creep (seen: 200 events at one time; or events 5e-10 apart with a slope at its bound).
        Why the decision kept it: the target's first-order motion is below the decision's rounding threshold
        (``_tiny_dz``, a slope within ``slope_tol`` of its bound), so first order cannot tell its side, while the
        Runge-Kutta step of the mode moved it across (second order). Take the step's verdict: a free unit crosses
        (its sign flips; if that mode sends it back, the chatter rule makes it slide), a sliding unit whose slope left
        ``[alpha, 1]`` leaves the set on that bound's side.
        ``stats['step_verdicts']`` counts them.

        A free target in ``chatter`` (flipped back and forth by earlier verdicts at this time: second order moves it
        across from either side while first order cannot tell its side) slides instead when its slope in that mode
        is admissible (within ``slope_tol`` of ``[alpha, 1]``): the mode decision's chatter rule needs a first-order
        motion to see the unit sent back, which such a unit never shows (seen: a depth-3 MLP's layer-2 unit flipped
        by 190 verdicts at one time, a Zeno stop)."""
        signs, slide = mode.signs.copy(), set(mode.sliding)
        N = signs.shape[0]
        if target < N and target in chatter:
            trial = mode.like(signs, slide | {target})
            _, s, _, _ = self.evaluate(y, u, trial)
            st = float(s[trial.slot[trial.sliding.index(target)]])
            tol = float(self.slope_tols([target])[0])
            if self.alpha - tol <= st <= 1.0 + tol:
                self.stats["step_verdicts"] += 1
                self.stats["chatter_slides"] += 1
                self.stats["sliding_entered"] += 1
                self.stats["max_sliding"] = max(self.stats["max_sliding"], len(trial.sliding))
                return trial
        if target < N:
            signs[target] = -signs[target]
        else:
            k = target - N
            e = int(mode.arrays()[1][k])  # event values of sliding units are per slot
            _, s, _, _ = self.evaluate(y, u, mode)
            slide.discard(e)
            signs[e] = self.nearer_side(s[k])
        self.stats["step_verdicts"] += 1
        return mode.like(signs, slide)

    def _tiny_dz(self, theta, v, sc, ids):
        return self.kt * sc[ids] * (np.linalg.norm(v) / max(float(np.linalg.norm(theta)), np.finfo(float).tiny))

    def _min_norm(self, theta, mode, C):
        """The minimal-norm element of the Clarke set over the units ``C`` (:meth:`_candidates`; the others keep
        ``mode``'s signs), :func:`clarke_min_norm`."""
        mn = clarke_min_norm(self.problem, theta, signs=mode.signs, kinks=C, kink_tol=self.kt, slope_tol=self.st,
                             n_slope_iters=self.sol.n_slope_iters, groups=self._groups)
        self.stats["grad_evals"] += 1
        self.stats["kink_normals"] += len(C)
        return mn

    def _dz_min_norm(self, theta, mode, C, mn):
        """``dz/dtheta . (-m)`` of every unit along the minimal-norm element ``mn`` over the units ``C``, with its
        slopes at ``C``."""
        idx, valid = _padded(C)
        s_pad = np.zeros(idx.shape[0], self.dtype)
        s_pad[:C.size] = mn.slopes
        return np.asarray(_dz(self.problem, self.A(theta), self.A(-np.asarray(mn.m)), mode.signs, idx, valid, s_pad))

    def escape(self, y, u, mode, cands, z, sc, scale=None):
        """One explicit Euler step of the inclusion along the minimal-norm element ``m`` of the Clarke set at ``y``
        (``ClarkeFlow.zeno_escape``): ``theta - a m`` with ``a`` the smaller of ``zeno_escape ||theta|| / ||m||`` and
        half the distance, along ``-m`` at first order, to the kink of the nearest unit outside the decision's set
        (a step across a kink the decision did not consider would move on a gradient it did not choose). In time
        ``t`` the step is ``dtheta/dt = -e^F m`` for ``dt = a e^{-F}`` (``F = log L`` for classification losses, whose
        ``m`` is that of ``log L``; ``F = 0`` else), so the energy grows by ``int ||dtheta/dt||^2 = a e^F ||m||^2``
        and log time by ``log(1 + dt / (1 + t))``. The length is set by
        the displacement, not by time: late in a log-time flow ``1e-8`` in ``u`` is ``1e-8 (1 + t)`` in ``t`` and
        jumped across kinks (measured: ``||dtheta|| = 0.015``, the loss up by 8e-3 at t = 1.5e5). Returns ``(y, u)``
        where it lands."""
        theta = np.asarray(y[:-1])
        C = self._candidates(mode, cands, z, sc)
        mn = self._min_norm(theta, mode, C)
        m = np.asarray(mn.m)
        nm = float(np.linalg.norm(m))
        scale = self.sol.zeno_escape if scale is None else scale
        a = scale * max(float(np.linalg.norm(theta)), self.atol) / max(nm, np.finfo(float).tiny)
        if nm > 0:
            dz = self._dz_min_norm(theta, mode, C, mn)
            out = np.ones(z.shape[0], bool)
            out[C] = False
            toward = out & (z * dz < 0)
            if toward.any():
                a = min(a, 0.5 * float(np.min(np.abs(z[toward] / dz[toward]))))
        F = mn.value if self.problem.classification else 0.0
        gain = math.exp(F)  # dtheta/dt = -e^F m
        dt = a / gain
        h = math.log1p(dt / math.exp(u)) if self.log_time else dt  # u = log(1 + t): du = log(1 + dt / (1 + t))
        y1 = np.array(y, dtype=self.dtype)
        y1[:-1] = theta - a * m
        y1[-1] = y1[-1] + a * gain * nm ** 2
        self.stats["zeno_escapes"] += 1
        return y1, u + h

    def _candidates(self, mode, cands, z, sc):
        """The units a mode decision considers: the sliding set and ``cands``, less the units whose input is
        identically zero (a deep net's sample with every unit of the layer below at or under its kink,
        :meth:`KinkedProblem.no_input`). Such a unit is not a kink of its own: ``z_e = 0`` stays so while those units
        stay off, and its normal lies in theirs (the Gram matrix of a set holding it is singular). It keeps its sign;
        when a unit below turns on, ``z_e`` leaves 0 on one side at once and the mode decision then sets it (a
        documented simplification of the minimal-norm element there: its slope is not optimised)."""
        C = np.asarray(sorted(set(mode.sliding) | set(int(c) for c in cands)), np.int64)
        C = C[~self.problem.no_input(z, sc, self.kt)[C]]
        if self.left_repelling:
            # units that left a repelling sliding mode (ClarkeFlow.repelling = 'leave') keep their side until they
            # are off their kink (beyond 10 kink_tol): the minimal-norm decision would put them back on it at once
            self.left_repelling = {e for e in self.left_repelling if abs(z[e]) <= 10 * self.kt * sc[e]}
            C = C[~np.isin(C, list(self.left_repelling))]
        return C

    def guess(self, mode, target, s0):
        """The mode an event's own change gives (``ClarkeFlow.event_guess``): a free unit that reached its kink
        slides; a sliding unit whose slope reached a bound (slot ``target - N``, its slope ``s0``) leaves on that
        bound's side."""
        N = mode.signs.shape[0]
        signs, slide = mode.signs.copy(), set(mode.sliding)
        if target < N:
            if target in slide:
                return None
            slide.add(int(target))
        else:
            k = target - N
            e = int(mode.arrays()[1][k])
            if e not in slide:
                return None
            slide.discard(e)
            signs[e] = self.nearer_side(s0[k])
        return mode.like(signs, slide)

    def resolve(self, y, u, mode, cands, chatter=(), z=None, sc=None, guess=None, v_ref=None):
        """The mode after an event at ``y``: from the minimal-norm element (interior slope: slides; bound: crosses to
        the side its velocity points to), then made consistent: a sliding slope of the new mode outside ``[alpha, 1]``
        leaves on that bound's side; a unit at its kink whose new field points into the other side slides (and
        crosses when its sliding slope then leaves the box at the far bound), and is flipped only if it comes back;
        for one hidden layer it is flipped first and slides if it comes back (``ClarkeFlow.pivot``, :meth:`_settle`).
        Units in ``chatter`` (at their kink and crossing back and forth without progress in time) slide when the new
        mode would flip them again and their slope is admissible.
        ``z``, ``sc``: the pre-activations at ``y`` and their bounds when known.

        ``guess``: a mode to try first (:meth:`guess`, the event's own change), with ``v_ref`` the velocity of the
        mode the flow arrived in, at ``y`` (one element of the Clarke set there: at the event its slopes are in
        ``[alpha, 1]``). When the consistency checks above accept the guess, or a mode they reach from it within
        ``ClarkeFlow.guess_evals`` field evaluations, and its velocity is no longer than ``v_ref`` (to ``1e-8``
        relative), that mode is the decision and the minimal-norm element is not formed. A consistent mode is a
        first-order (KKT) point of the box-constrained least-squares problem over the slopes that defines the
        minimal-norm element (a sliding unit's slope interior and its ``z_e`` held; a unit at its kink outside the
        set at the bound whose one-sided field moves it to its own side, the sign of that slope's multiplier). For
        nets with one hidden layer (``g`` affine in the slopes, a convex problem) that is the minimal-norm element
        itself; for deeper nets the problem is not convex and has other stationary points (seen: a guess consistent
        at once with a velocity 3.5 times that of the minimal-norm element, whose units of other samples slide
        instead), which the norm test against the arrival velocity turns away to the full decision.
        ``stats['decisions_guessed']`` counts the decisions taken from the guess."""
        theta = y[:-1]
        if z is None or sc is None:
            _, _, z, sc = self.evaluate(y, u, mode)
        z, sc = np.asarray(z), np.asarray(sc)
        C = self._candidates(mode, cands, z, sc)
        chatter = set(int(e) for e in chatter) & set(C.tolist())
        if guess is not None:
            signs = guess.signs.copy()
            slide = set(guess.sliding) & set(C.tolist())
            away = self._away(C, z, sc, slide, signs)
            new, ok, f, slid = self._settle(y, u, mode, C, signs, slide, away, chatter, z, sc, self.sol.guess_evals)
            short = ok and (v_ref is None or np.linalg.norm(np.asarray(f[:-1]))
                            <= (1 + 1e-8) * np.linalg.norm(np.asarray(v_ref)) + np.finfo(float).tiny)
            if short and new.key() != mode.key():
                self.stats["decisions_guessed"] += 1
                self.stats["chatter_slides"] += slid
                return self._finish(mode, new, C, z, sc)
        mn = self._min_norm(theta, mode, C)
        slide = set(C[mn.interior].tolist())
        signs = mode.signs.copy()
        bound = C[~mn.interior]
        if bound.size:
            v = -np.asarray(mn.m)
            dz = self._dz_min_norm(theta, mode, C, mn)[bound]
            side = self.nearer_side(mn.slopes[~mn.interior])
            signs[bound] = np.where(np.abs(dz) > self._tiny_dz(theta, v, sc, bound), np.sign(dz), side)
        away = self._away(C, z, sc, slide, signs)
        new, _, _, slid = self._settle(y, u, mode, C, signs, slide, away, chatter, z, sc, 2 * len(C) + 2)
        self.stats["chatter_slides"] += slid
        return self._finish(mode, new, C, z, sc)

    def _away(self, C, z, sc, slide, signs):
        """A candidate beyond kink_tol (within 10 kink_tol: the projection of a deep net's sliding set moves nearby
        pre-activations by its correction) is not at its kink: unless it slides it keeps the side it is on through
        the whole decision, and crosses later as an event of its own. Deciding the others as if it had crossed, and
        putting it back afterwards, leaves a mode whose sliding slopes or sides assumed the other sign (seen: a unit
        freed by that assumption chattering at its kink, 200 events at one time, depth-3 MLP). Sets their signs in
        ``signs``; returns them."""
        away = C[np.abs(z[C]) > self.kt * sc[C]]
        away = away[~np.isin(away, list(slide))]
        signs[away] = np.sign(z[away]).astype(np.int8)
        return set(away.tolist())

    def _settle(self, y, u, mode, C, signs, slide, away, chatter, z, sc, max_evals):
        """The consistency loop of :meth:`resolve` from the mode ``(signs, slide)``, at most ``max_evals`` field
        evaluations: ``(mode, consistent, its field at y, chattering units it made slide)``.

        One change per evaluation after the sliding slopes outside the box have left (those as a block). With
        ``ClarkeFlow.pivot = 'slide'`` (the default for several hidden layers) the free unit
        of least index whose field points into the other side joins the sliding set, the pivot of Murty's least-index
        method for the box-constrained complementarity problem ``s_e = alpha -> dz_e <= 0``, ``s_e = 1 -> dz_e >= 0``,
        interior ``-> dz_e = 0`` that a consistent mode solves. Its slope then decides: inside the box it slides,
        beyond the far bound it leaves there (a crossing, in two evaluations). Where the unit's own coupling is
        attracting (``d dz_e / d s_e < 0``: ``dF/dh_e > 0`` for one hidden layer, whose problem is then linear with a
        P-matrix; a deep net's is nonlinear in the slopes of samples kinked in two layers) the method ends at the
        unique solution; a unit that comes back beyond the near bound (a repelling coupling, whose
        other side is then consistent) is flipped the next time. Flipping first (before December 5, 2026, night)
        moved a unit across the whole box at once, which on a depth-3 ReLU net knocked the slopes of others sliding
        with it out of the box and cycled: 69 of 122 minimal-norm decisions of sweep problem 0 at t ~ 26 ended
        inconsistent after their 2|C| + 2 evaluations (~0.5 s each), against 0 of 454 (median 2 evaluations) with
        this rule (docs/nonsmooth.md). With ``'flip'`` (one hidden layer) it crosses first and slides if it comes
        back (the rule before; every unit it flips is then tried sliding, so the loop's modes are the same kind)."""
        theta = y[:-1]
        flipped, tried, slid = set(), set(), 0
        new = mode.like(signs, slide)
        for _ in range(max_evals):
            signs_n, idx_n, valid_n = new.arrays()
            f, s, dz_all = jax.device_get(_field_dz(self.problem, y, self.A(u), signs_n, idx_n, valid_n,
                                                    self.factor(new), self.log_time))
            self.stats["grad_evals"] += 1
            self.stats["kink_normals"] += len(new.sliding)
            ss = s[new.slot]
            tol = self.slope_tols(new.sliding)
            out = (ss < self.alpha - tol) | (ss > 1.0 + tol)
            if out.any():
                left = np.asarray(new.sliding, np.int64)[out]
                slide.difference_update(left.tolist())
                signs[left] = np.where(ss[out] > 1.0, 1, -1)
                new = mode.like(signs, slide)
                continue
            rest = C[~np.isin(C, list(slide | away))]
            if rest.size == 0:
                return new, True, f, slid
            v = np.asarray(f[:-1])
            dz = dz_all[rest]
            wrong = rest[signs[rest] * dz < -self._tiny_dz(theta, v, sc, rest)]
            if wrong.size == 0:
                return new, True, f, slid
            e = int(wrong[0])
            if (self.slide_first and e not in tried) or e in flipped or e in chatter:
                slide.add(e)
                slid += int(e in chatter and e not in flipped and not (self.slide_first and e in tried))
                tried.add(e)
            else:
                signs[e] = -signs[e]
                flipped.add(e)
            new = mode.like(signs, slide)
        return new, False, None, slid

    def _finish(self, mode, new, C, z, sc):
        """A unit that is not sliding must start on its side of the kink: one beyond kink_tol on the other side (the
        projection of a deep net's sliding set moves nearby pre-activations by its correction) keeps the side it is
        on, and crosses later as an event of its own. Counts the decision's changes."""
        new_sliding = set(new.sliding)
        free = np.asarray([e for e in C if e not in new_sliding], np.int64)
        if free.size:
            off = free[new.signs[free] * z[free] < -self.kt * sc[free]]
            if off.size:
                signs = new.signs.copy()
                signs[off] = np.sign(z[off]).astype(np.int8)
                new = mode.like(signs, new.sliding)
        old_s, new_s = set(mode.sliding), set(new.sliding)
        both_out = np.asarray([e for e in C if e not in old_s and e not in new_s], np.int64)
        if both_out.size:
            self.stats["pattern_changes"] += int(np.sum(mode.signs[both_out] != new.signs[both_out]))
        self.stats["sliding_entered"] += len(new_s - old_s)
        self.stats["sliding_left"] += len(old_s - new_s)
        self.stats["max_sliding"] = max(self.stats["max_sliding"], len(new_s))
        return new


def integrate_nonsmooth(problem: KinkedProblem, theta0, ts, t1: float, *, log_time: bool = False,
                        solver: ClarkeFlow | None = None, progress=None) -> Trajectory:
    """Integrate the minimal-norm flow of ``problem`` from ``theta0``, saving at ``ts`` (increasing, from 0, within
    ``[0, t1]``). ``log_time``: integrate in ``u = log(1 + t)``. Returns a :class:`Trajectory` whose ``stats`` count
    steps, gradient evaluations, events, sliding modes entered and left and pattern changes (and, for nets with one
    hidden layer, where a sliding mode turned repelling and the solution stopped being unique:
    ``stats['repelling_from']``, :meth:`_Driver.note_repelling`, docs/nonsmooth.md), and whose
    ``extras['energy']`` holds ``int_0^t ||dtheta/dt||^2`` at the saved times. ``progress(t, stats)`` is called
    between compiled calls (at save times, events and every ``_CALL_STEPS`` steps)."""
    sol = solver or ClarkeFlow()
    theta0 = jnp.asarray(theta0)
    dtype = theta0.dtype
    D = _Driver(problem, sol, theta0, log_time)
    stats = D.stats
    ts = np.asarray(ts, float)
    us = np.log1p(ts) if log_time else ts.copy()
    t_start = _time.perf_counter()
    tiny_h = 16 * float(np.finfo(float).eps)

    theta = np.asarray(theta0)
    z, sc = (np.asarray(a) for a in _preacts(problem, theta))
    mode = _Mode(np.where(z > 0, 1, -1), (), D.layout)
    y = np.concatenate([theta, np.zeros((1,), dtype)])
    u = 0.0
    near = np.flatnonzero(np.abs(z) <= D.kt * sc)
    if near.size:
        stats["events"] += 1
        mode = D.resolve(y, u, mode, near)
    out = D.advance(y, u, 0.0, 1.0, u, mode, 0, project_first=True)  # onto the sliding set's surfaces; f(0)
    y, f0 = out["y0"], out["f0"]
    pending_projection = False
    v0 = float(np.linalg.norm(f0[:-1]))
    u_end = float(us[-1])
    h = min(u_end, 0.01 * max(D.nrm0, D.atol) / v0) if v0 > 0 else max(u_end, tiny_h)
    h = max(h, tiny_h)
    saves_th, saves_E, saves_t = [np.asarray(y[:-1])], [0.0], [0.0]
    k_save = 1 if us[0] == 0.0 else 0
    err_prev = 1.0
    stall = _Stall(sol, tiny_h)  # the current run of events without progress in time
    # the next escape's relative length; whether the flow made progress in time since the last escape
    esc_scale, progressed = sol.zeno_escape, True
    reason, success, failure = None, True, None

    # the rest test (every save and every 50 events): one flow problem (a joint flow has two losses), L >= 0
    check_rest = sol.rest_test and getattr(problem, "n_error", None) is None
    last_rest_check = [0, 0]
    stats["at_rest_from"], stats["rest_bound"] = None, None
    while k_save < len(us):
        if stats["num_steps"] >= sol.max_steps:
            success, failure = False, "max_steps"
            reason = (f"max_steps = {sol.max_steps} reached at t = {_t(u, log_time):.6g} before t1 = {t1:g} "
                      f"({stats['events']} events, {len(mode.sliding)} units sliding); raise max_steps")
            break
        if check_rest and (k_save > last_rest_check[0] or stats["events"] >= last_rest_check[1] + 50):
            last_rest_check[:] = [k_save, stats["events"]]
            th = np.asarray(y[:-1])
            log_l = float(np.asarray(_diag(problem, jnp.asarray(th)[None])[0])[0])
            t_now = _t(u, log_time)
            bound = math.sqrt(max(t1 - t_now, 0.0)) * math.exp(0.5 * log_l)
            if bound <= sol.rtol * float(np.linalg.norm(th)) + D.atol:
                # at rest: the flow moves by at most sqrt((t1 - t) L) from here (Cauchy-Schwarz and the energy
                # identity, L >= 0), below the tolerance; the remaining saves are this state
                for k in range(k_save, len(us)):
                    saves_th.append(th)
                    saves_E.append(float(y[-1]))
                    saves_t.append(float(ts[k]))
                k_save = len(us)
                stats["at_rest_from"], stats["rest_bound"] = t_now, bound
                break
        n_max = min(_CALL_STEPS, sol.max_steps - stats["num_steps"])
        out = D.advance(y, u, h, err_prev, float(us[k_save]), mode, n_max, project_first=pending_projection)
        if sol.repelling == "leave" and D.repelling_now.size:
            # sliding units whose mode repels at the call's start leave to the side of their slope's nearer bound
            # (ClarkeFlow.repelling); from the projected start state, the call's steps not taken
            y, mode = out["y0"], D.leave_repelling(mode, out["s0"])
            pending_projection = True
            if progress is not None:
                progress(_t(u, log_time), stats)
            continue
        if D.switched:
            out["err_prev"], D.switched = 1.0, False
        if int(out["n_cross"]):  # crossings passed inside the compiled loop: the pattern it ended in
            mode = mode.like(np.asarray(out["signs"]), mode.sliding)
        pending_projection = False
        status = int(out["status"])
        if status in (SAVE, BUDGET):
            y, u, h, err_prev = out["y"], float(out["u"]), float(out["h"]), float(out["err_prev"])
            if int(out["n_acc"]):
                stall.reset()
                progressed = True
            if status == SAVE:
                saves_th.append(np.asarray(out["y"][:-1]))
                saves_E.append(float(out["y"][-1]))
                saves_t.append(float(ts[k_save]))
                k_save += 1
                h = max(h, float(out["last_h"]))
        elif status == UNDERFLOW:
            y, u = out["y"], float(out["u"])
            success, failure = False, "underflow"
            reason = (f"the step size underflowed at t = {_t(u, log_time):.6g}: the state became non-finite or the "
                      "field is not resolved (diverging flow?)")
            break
        else:  # EVENT
            stats["events"] += 1
            u0 = float(out["u"])
            hc, h_step = float(out["h_event"]), float(out["h_step"])
            y, u = out["y_event"], u0 + hc
            err_prev = float(out["err_prev"])
            if not np.all(np.isfinite(y)):  # the compiled loop returns a finite located state; a guard, not a path
                success, failure = False, "underflow"
                y, u = out["y"], u0
                reason = (f"the state at an event near t = {_t(u0, log_time):.6g} is not finite (the mode's field "
                          "failed there)")
                break
            if stall.event(u):
                progressed = True
            if (sol.zeno_escape is not None and (stall.count >= sol.escape_after or stall.cycling())
                    and stats["zeno_escapes"] < sol.max_escapes):
                # no mode the decision builds is consistent here: one Euler step of the inclusion (ClarkeFlow)
                # an escape that lands in another stall (no progress in time since the previous one) is followed by
                # a longer one: escape_growth times, up to zeno_escape_max ||theta||
                esc_scale = (sol.zeno_escape if progressed
                             else min(esc_scale * sol.escape_growth, sol.zeno_escape_max))
                progressed = False
                pre = D.advance(y, u, 0.0, 1.0, u, mode, 0, project_first=True)
                y, u = D.escape(pre["y0"], u, mode, _near(pre["z0"], pre["scale0"], D.kt), pre["z0"], pre["scale0"],
                                esc_scale)
                ev = D.advance(y, u, 0.0, 1.0, u, mode, 0)
                mode = D.resolve(y, u, mode, _near(ev["z0"], ev["scale0"], D.kt), (), z=ev["z0"], sc=ev["scale0"])
                D.forget_slope_noise(mode)
                stall.reset(u)
                pending_projection = True
                h = max(h_step, tiny_h * max(abs(u), 1.0) * 2)
                if progress is not None:
                    progress(_t(u, log_time), stats)
                continue
            if stall.count > sol.zeno_limit:
                success, failure = False, "zeno"
                reason = (f"{stall.count} events without progress in time at t = {_t(u, log_time):.6g}: a Zeno point "
                          "or a kink where no mode is consistent (try a larger kink_tol)")
                break
            zc, scc = np.asarray(out["z_event"]), np.asarray(out["scale_event"])
            cands = _near(zc, scc, D.kt)
            target = int(out["target"])
            N = mode.signs.shape[0]
            if target < N and D.last_method != "dopri5" and target not in cands:
                # a crossing a stiff rung did not locate, its target not among the candidates (its trials' states
                # are not smooth in the trial's length where h rho >> 1; measured, depth 3, log time: a Rosenbrock
                # location ended 3.9e-5 scale_e short of the kink, and deciding the unit's mode there moved theta by
                # 4.7e-4 onto it and raised the loss by 1.1e-4, outside the energy identity): not an event; from the
                # last trial before it (a state of the flow) one call of DOPRI5, whose short trials vary smoothly
                # with their length, locates it (if that call does not either, the event is decided where it ended)
                stats["relocations"] += 1
                stats["events"] -= 1
                if mode.signs[target] * zc[target] < 0:  # the location's last trial is past the kink: the step's start
                    y, u = out["y"], u0
                D.explicit_once = D.switched = True
                pending_projection = True
                h = max(h_step / 4, tiny_h * max(abs(u), 1.0) * 2)
                if progress is not None:
                    progress(_t(u, log_time), stats)
                continue
            if target < N:
                cands = np.union1d(cands, [target])
            chatter = stall.chattering()
            # the located state is a Runge-Kutta trial of the mode: onto its sliding set's kink surfaces first (for
            # deep nets a step moves z_e of a sliding unit by its local error, ~rtol, not ~kink_tol: a unit leaving
            # the set would start on the wrong side of its kink by that much and stop the flow at once)
            pre = D.advance(y, u, 0.0, 1.0, u, mode, 0, project_first=True)
            y = pre["y0"]
            if target >= N and sol.slope_noise is not None and D.rounding_event(y, u, mode, target - N, pre["s0"]):
                new = mode  # a sliding slope at its bound within rounding: no event (ClarkeFlow.slope_noise)
            else:
                guess = D.guess(mode, target, pre["s0"]) if D.event_guess else None
                new = D.resolve(y, u, mode, cands, chatter, z=pre["z0"], sc=pre["scale0"], guess=guess,
                                v_ref=pre["f0"][:-1])
                if new.key() == mode.key():  # kept: the same event would be found again at once (docstring)
                    new = D.step_verdict(y, u, mode, target, chatter)
            stall.decided(mode, new)
            mode = new
            D.forget_slope_noise(mode)
            pending_projection = True  # onto the new sliding set's kink surfaces, at the start of the next call
            h = max(h_step - hc, h_step / 4) if hc < h_step else h_step
            if stall.count:  # an event right after the previous one: the next is likely as close (a stall)
                h = min(h, 1e3 * max(hc, tiny_h * max(abs(u), 1.0)))
            h = max(h, tiny_h * max(abs(u), 1.0) * 2)
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
    if D._fcache is not None:
        stats["factors_built"], stats["factors_updated"] = D._fcache.stats["built"], D._fcache.stats["updated"]
    if success:
        result = RESULTS.successful
        reason = (f"reached t1 = {t1:g} ({stats['events']} events: {stats['pattern_changes']} pattern changes, "
                  f"{stats['sliding_entered']} sliding modes entered, {stats['sliding_left']} left)")
        if stats["repelling_from"] is not None:
            reason += (f"; from t = {stats['repelling_from']:.6g} a sliding mode repels (unit "
                       f"{stats['repelling_unit']}, {stats['repelling_units']} units in all: both one-sided fields "
                       "point away from the kink), where the solution is not unique: "
                       + ("the units left the kink to the side of their slope's nearer bound (repelling='leave')"
                          if sol.repelling == "leave" else
                          "GD and perturbed flows leave the kink, this flow keeps the minimal-norm sliding one")
                       + " (docs/nonsmooth.md)")
        if stats["at_rest_from"] is not None:
            reason += (f"; at rest from t = {stats['at_rest_from']:.6g} (it moves by at most "
                       f"sqrt((t1 - t) L) = {stats['rest_bound']:.2e} after that)")
    else:
        result = _FAILURES[failure]
    return Trajectory(ts=np.asarray(saves_t), thetas=thetas, loss=np.exp(log_l), log_loss=log_l, norm=norm,
                      stats=stats, result=result, reason=reason, unflatten=problem.unflatten,
                      degree=problem.unflatten(jnp.asarray(thetas[0])).degree,
                      extras={"energy": np.asarray(saves_E), "sliding_units": np.asarray(mode.sliding, np.int64)})


def _near(z, sc, kt):
    """The mode decision's candidates: units within 10 kink tolerances of their kink."""
    z, sc = np.asarray(z), np.asarray(sc)
    return np.flatnonzero(np.abs(z) <= 10 * kt * sc)


class _Stall:
    """The current run of events without progress in time (a stall, ended by progress in time, accepted steps or an
    escape): how many events, the units flipped in it (a unit flipped ``chatter_limit`` times chatters) and the modes
    decided in it with how often each (a mode decided ``cycle_limit`` times is a cycle of decisions: each mode leads to
    the next event at once, and no further decision leaves it)."""

    def __init__(self, sol, tiny_h):
        self.sol, self.tiny_h = sol, tiny_h
        self.u_mark = 0.0  # u at the last event
        self.reset()

    def reset(self, u=None):
        self.count, self.flips, self.modes = 0, [], {}
        if u is not None:
            self.u_mark = u

    def event(self, u):
        """An event at ``u``: whether the flow progressed in time since the previous one (not accepted steps: a
        stall's steps are as short as its events are close), which ends the stall; else the stall goes on."""
        progressed = u - self.u_mark > max(self.tiny_h, self.sol.zeno_progress) * max(abs(u), 1.0)
        if progressed:
            self.reset()
        else:
            self.count += 1
        self.u_mark = u
        return progressed

    def cycling(self):
        return self.count > 0 and max(self.modes.values(), default=0) >= self.sol.cycle_limit

    def chattering(self):
        """Units flipped at least ``chatter_limit`` times in the stall."""
        if not self.count or not self.flips:
            return set()
        vals, counts = np.unique(np.asarray(self.flips), return_counts=True)
        return set(int(v) for v in vals[counts >= self.sol.chatter_limit])

    def decided(self, old, new):
        """Record a mode decision ``old -> new`` (the first event of a possible stall keeps its flips only)."""
        flips = [int(e) for e in np.flatnonzero(new.signs != old.signs)]
        if not self.count:
            self.flips = flips
            return
        self.flips = (self.flips + flips)[-64 * max(self.sol.chatter_limit, 1):]
        self.modes[new.key()] = self.modes.get(new.key(), 0) + 1


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
