"""Narrow and wide gradient flows integrated as ONE ODE, so that ``eta(t) = T theta(t)`` holds to rounding.

Solved separately, the narrow flow ``theta' = -grad L(theta)`` and the wide flow ``eta' = -grad L~(eta)`` choose their
own adaptive steps, and ``||eta(t) - T theta(t)||`` is the global integration error of the two solves (about
``1e5 rtol``), not a property of ``T``. Here the concatenated state ``(theta, eta)`` is one ODE with one step-size
controller: both halves take every step together. Each Runge-Kutta stage is a linear combination of vector-field
values, and ``T`` commutes with the vector field (``grad L~(T theta) = T grad L(theta)``, arXiv 2505.12419), so if
``eta_k = T theta_k`` then every stage of the wide half is ``T`` of the narrow stage and ``eta_{k+1} = T theta_{k+1}``
up to the rounding of the arithmetic. The measured ``max_t ||eta(t) - T theta(t)||`` is therefore a test of the
embedding principle for the flow at rounding level, like GD with identical steps.

Error norm of the step-size controller (``error_norm``):

* ``'narrow'`` (default): RMS of the scaled local error of the narrow half only. The narrow half then takes exactly the
  steps a diffrax solve of the narrow flow alone would take (same solver, tolerances and first step), and the wide
  half is carried along; the wide error estimate is ``T`` of the narrow one anyway.
* ``'full'``: RMS over the whole state ``(theta, eta)``.
"""

from __future__ import annotations


import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from ..flow import FlowResult, Trajectory, make_objective
from ..flow._ode import _check_tolerance, _initial_step, check_max_steps, check_times
from ..losses import get_loss
from ._split import AbstractSplit

__all__ = ["joint_flow", "JOINT_SOLVERS", "ERROR_NORMS"]

JOINT_SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8, "bosh3": diffrax.Bosh3}
ERROR_NORMS = ("narrow", "full")


def _narrow_rms(err):
    return optx.rms_norm(err[0])


@eqx.filter_jit
def _solve(obj_n, obj_w, theta0, eta0, ts, t1, rtol, atol, dt0, pcoeff, icoeff, solver, error_norm: str,
           max_steps: int):
    def vf(t, y, args):
        return obj_n.velocity(y[0]), obj_w.velocity(y[1])

    def diag(t, y, args):
        return {"theta": y[0], "eta": y[1], "log_loss_n": obj_n.log_loss(y[0]), "log_loss_w": obj_w.log_loss(y[1])}

    norm = _narrow_rms if error_norm == "narrow" else optx.rms_norm
    controller = diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=pcoeff, icoeff=icoeff, norm=norm)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf), solver, t0=ts[0], t1=t1, dt0=dt0, y0=(theta0, eta0), saveat=diffrax.SaveAt(ts=ts, fn=diag),
        stepsize_controller=controller, max_steps=max_steps, throw=False,
    )
    return sol.ys, sol.stats, sol.result._value


def joint_flow(
    split: AbstractSplit,
    narrow,
    data,
    *,
    loss="exponential",
    t1: float,
    ts=None,
    n_save: int = 50,
    rtol: float = 1e-10,
    atol: float | None = None,
    solver: str = "tsit5",
    error_norm: str = "narrow",
    max_steps: int = 1_000_000,
    pcoeff: float = 0.4,
    icoeff: float = 0.3,
) -> tuple[Trajectory, Trajectory]:
    """Gradient flows of ``narrow`` (``theta``) and of ``split(narrow)`` (``eta``) integrated as one ODE in
    ``(theta, eta)`` that shares every adaptive step (module docstring; arXiv 2505.12419, MATH.md section 5).

    Arguments:
        split: the embedding ``T``; narrow: a network of its narrow architecture (``theta(0)``;
            ``eta(0) = T theta(0)``).
        data: a ``Dataset``; loss: the training loss (summed over samples).
        t1: final time; ts: save times in ``[0, t1]`` (default :func:`homflow.flow.log_times` ``(t1, n_save)``).
        rtol: relative tolerance of the PID controller (default 1e-10); atol: absolute tolerance (default
            ``0.1 * rtol * ||theta(0)||``, as in :func:`homflow.flow.gradient_flow`).
        solver: an explicit Runge-Kutta method, one of ``JOINT_SOLVERS`` (``'tsit5'`` default).
        error_norm: ``'narrow'`` (default: the controller looks at the narrow half only) or ``'full'`` (RMS over
            ``(theta, eta)``).
        max_steps: the solve gives up after this many steps (``result.success`` is then False).
        pcoeff, icoeff: PID controller coefficients (those of :func:`homflow.flow.gradient_flow`).

    Returns:
        ``(narrow_trajectory, wide_trajectory)``, two :class:`homflow.flow.Trajectory` saved at the same times (compare
        them with :func:`trajectory_error`); ``stats`` (shared) holds the step counts.

    Raises:
        ValueError: on an unknown solver or error norm, bad times or tolerances, or a network that does not fit.
    """
    if error_norm not in ERROR_NORMS:
        raise ValueError(f"`error_norm` must be one of {ERROR_NORMS}; got {error_norm!r}.")
    if isinstance(solver, str) and solver.lower() in JOINT_SOLVERS:
        solver_obj = JOINT_SOLVERS[solver.lower()]()
    else:
        raise ValueError(f"`solver` must be one of {tuple(JOINT_SOLVERS)}; got {solver!r}.")
    t1, ts = check_times(t1, ts, n_save)
    max_steps = check_max_steps(max_steps)
    loss = get_loss(loss)
    obj_n, theta0 = make_objective(narrow, data, loss)
    obj_w, _ = make_objective(split.wide, data, loss)
    eta0 = split.apply_flat(theta0)
    dtype = theta0.dtype
    rtol = _check_tolerance("rtol", rtol, dtype)
    nrm = float(jnp.linalg.norm(theta0))
    atol = _check_tolerance("atol", 0.1 * rtol * max(nrm, 1e-300) if atol is None else atol, dtype)
    dt0 = _initial_step(obj_n, theta0, t1)
    f = lambda x: jnp.asarray(x, dtype=dtype)  # noqa: E731  (arrays, not Python floats: no recompilation)
    ys, stats, code = _solve(obj_n, obj_w, theta0, eta0, f(ts), f(t1), f(rtol), f(atol), f(dt0), f(pcoeff), f(icoeff),
                             solver_obj, error_norm, int(max_steps))
    code = int(code)
    st = {"num_steps": int(stats["num_steps"]), "num_accepted_steps": int(stats["num_accepted_steps"]),
          "num_rejected_steps": int(stats["num_rejected_steps"]), "error_norm": error_norm, "solver": solver.lower()}
    ok = code == 0 and bool(np.all(np.isfinite(np.asarray(ys["eta"]))))
    result = FlowResult(True, f"reached t1 = {t1:g} (joint solve, {st['num_steps']} shared steps)") if ok else \
        FlowResult(False, f"the joint solve stopped early (diffrax result code {code}; {st['num_steps']} steps)")
    out = []
    for key, ll, obj in (("theta", "log_loss_n", obj_n), ("eta", "log_loss_w", obj_w)):
        th, log_l = np.asarray(ys[key]), np.asarray(ys[ll])
        out.append(Trajectory(ts=ts, thetas=th, loss=np.exp(log_l), log_loss=log_l,
                              norm=np.linalg.norm(th, axis=1), stats=st, result=result, unflatten=obj.unflatten,
                              degree=obj.degree))
    return out[0], out[1]
