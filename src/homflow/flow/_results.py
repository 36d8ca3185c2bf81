"""One result type for every flow: the :class:`RESULTS` enumeration, :class:`SolverError`, and the one-line reasons.

:class:`RESULTS` extends diffrax's enumeration (which extends optimistix's), so a diffrax outcome is promoted into it
with ``RESULTS.promote(sol.result)`` and compared with ``==``; no private field of another library is read. The codes
homflow adds are defined here and only here; a new solver that needs a new outcome adds one line to the class body.
Outcomes that are not failures but facts about the path (a non-smooth flow entering or leaving a sliding mode, the
switch from DOPRI5 to RKC) are ``stats``, not codes.
"""

from __future__ import annotations

import diffrax
import numpy as np

__all__ = ["RESULTS", "SolverError", "result_name", "is_success", "reason_for", "classify_max_steps"]


class RESULTS(diffrax.RESULTS):  # pyright: ignore
    """Outcomes of a flow (diffrax's codes, among them ``successful``, ``event_occurred``, ``max_steps_reached``,
    ``nonfinite``, plus homflow's below). Compare with ``==``; ``RESULTS[item]`` is the message."""

    stiff_limit = (
        "The step budget ran out while explicit steps were capped by stability (the flow is stiff): use the "
        "stiff-aware solver `Auto()` (the default) or `RKC()`, or raise `max_steps`."
    )
    sliding_mode = (
        "A smooth solver stalled at an activation kink (a sliding mode of the differential inclusion of a ReLU-type "
        "network): use the non-smooth solver, an activation of degree p >= 2, or a discrete method."
    )
    step_size_underflow = (
        "The step size underflowed: the state became non-finite or the flow diverged."
    )


# Names in the order of the checks in `result_name` (homflow's own first, then diffrax's and optimistix's).
_NAMES = ("successful", "event_occurred", "max_steps_reached", "stiff_limit", "sliding_mode", "nonfinite",
          "step_size_underflow", "dt_min_reached", "max_steps_rejected", "nonfinite_input", "singular", "breakdown",
          "stagnation", "conlim", "nonlinear_max_steps_reached", "nonlinear_divergence", "internal_error")


def result_name(result) -> str:
    """The name of a (scalar) :class:`RESULTS` item, e.g. ``'stiff_limit'``."""
    for name in _NAMES:
        if bool(np.asarray(result == getattr(RESULTS, name))):
            return name
    return "unknown"


def is_success(result) -> bool:
    """``True`` for ``successful`` and ``event_occurred`` (a requested stop)."""
    return bool(np.asarray((result == RESULTS.successful) | (result == RESULTS.event_occurred)))


class SolverError(RuntimeError):
    """A flow failed numerically (not a user mistake: those raise ``ValueError``). ``result`` is the :class:`RESULTS`
    item, ``reason`` the one-line reason with advice, ``trajectory`` what was computed up to the failure."""

    def __init__(self, reason: str, result=None, trajectory=None):
        super().__init__(reason)
        self.reason = reason
        self.result = result
        self.trajectory = trajectory


def classify_max_steps(lam_max: float, mean_dt: float, rate: float, rtol: float, *, stability: float = 3.3,
                       stiff_band: tuple[float, float] = (0.2, 20.0), kink_power: float = 1.0 / 3.0):
    """Tell why an explicit solver ran out of steps, from the largest Hessian eigenvalue ``lam_max`` at the end, the
    mean step ``mean_dt``, the field's own rate ``rate = ||f(y)|| / ||y||`` at the end and the tolerance ``rtol``.

    * ``stiff_limit``: ``|lam_max| mean_dt`` within ``stiff_band`` of the stability bound (explicit steps are capped
      near ``stability / lam_max``; Tsit5/DOPRI5: ``~3.3``);
    * ``sliding_mode``: the mean step far below that bound and far below the smooth-accuracy step: a 5th-order method
      on a smooth field takes ``mean_dt * rate ~ rtol^(1/5)``; across a discontinuity of the field (an activation kink)
      its local error is first order and the steps shrink to ``mean_dt * rate ~ rtol``; the threshold is
      ``rtol ** kink_power`` (default 1/3: 2e-3 at rtol 1e-8);
    * ``max_steps_reached`` otherwise (the budget was simply too small for the accuracy asked).
    """
    ratio = abs(lam_max) * mean_dt
    if stiff_band[0] <= ratio < stiff_band[1]:
        return RESULTS.stiff_limit
    if ratio < stiff_band[0] and mean_dt * rate < rtol**kink_power:
        return RESULTS.sliding_mode
    return RESULTS.max_steps_reached


def reason_for(result, *, t_end: float, t1: float, stats: dict, event: str | None = None,
               lam_max: float | None = None) -> str:
    """The one-line reason (with advice) of a flow's outcome: where it stopped, why, and what to do."""
    name = result_name(result)
    solver = stats.get("solver", "")
    if name == "successful":
        return f"reached t1 = {t1:g} ({solver}, {stats.get('grad_evals')} gradient evaluations)"
    if name == "event_occurred":
        return f"event {event or 'event'} at t = {t_end:.6g}"
    n = stats.get("num_steps")
    where = f"max_steps = {n} reached at t = {t_end:.6g} before t1 = {t1:g}"
    if name == "stiff_limit":
        lam = f"largest Hessian eigenvalue ~ {lam_max:.3g}, " if lam_max is not None else ""
        return (f"{where}: the flow is stiff ({lam}explicit steps capped by stability); use solver='auto' (the "
                "stiff-aware default) or 'rkc', or raise max_steps")
    if name == "sliding_mode":
        return (f"{where}: the steps shrank to the size of the tolerance, far below the stability bound, so this is "
                "not stiffness but a discontinuous vector field (a ReLU kink: a pre-activation sitting at zero on a "
                "data point, a sliding mode of the differential inclusion); use the non-smooth solver, an activation "
                "of degree p >= 2, a looser rtol, or a discrete method")
    if name == "max_steps_reached":
        extra = ""
        if stats.get("num_stiff_steps"):
            extra = (f" ({stats['num_stiff_steps']} stiff RKC steps, spectral radius ~ "
                     f"{stats.get('spectral_radius', float('nan')):.3g})")
        return f"{where}{extra}; raise max_steps"
    if name in ("nonfinite", "nonfinite_input"):
        return (f"the vector field became non-finite near t = {t_end:.6g} (the loss or its gradient overflows: start "
                "at a smaller scale, or use a classification loss, which homflow evaluates in log space)")
    if name == "step_size_underflow":
        return (f"the step size underflowed near t = {t_end:.6g}: the flow blows up there (a finite-time blow-up, e.g. "
                "the NCF flow of a network of degree L > 2: stop it with an event such as NormAbove)")
    return f"solver stopped at t = {t_end:.6g}: {RESULTS[result]}"

