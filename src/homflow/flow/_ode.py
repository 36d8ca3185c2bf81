"""``gradient_flow`` and ``gradient_flow_batch``: the gradient flow ``d theta/dt = -grad L(theta)`` of a network on a
data set, to a stated tolerance (float64), as thin callers of :func:`homflow.flow.integrate`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..models import AbstractHomogeneousModel
from ._integrate import integrate
from ._problem import Problem, make_problem
from ._solvers import as_solver

__all__ = ["gradient_flow", "gradient_flow_batch", "largest_hessian_eigenvalue", "select_solver"]


def largest_hessian_eigenvalue(problem: Problem, theta, iters: int = 50, *, key=None) -> float:
    """Largest-magnitude eigenvalue of ``Hess L(theta)`` by power iteration with Hessian-vector products."""
    key = jax.random.PRNGKey(0) if key is None else key
    v = jax.random.normal(key, theta.shape, theta.dtype)
    v = v / jnp.linalg.norm(v)
    tiny = jnp.finfo(theta.dtype).tiny

    @jax.jit
    def body(v, _):
        hv = problem.hvp(theta, v)
        lam = jnp.dot(v, hv)
        return hv / jnp.maximum(jnp.linalg.norm(hv), tiny), lam

    v, lams = jax.lax.scan(body, v, None, length=iters)
    return float(lams[-1])


def _setup(model, data, loss, theta0):
    problem, theta = make_problem(model, data, loss)
    if theta0 is not None:
        theta0 = jnp.asarray(theta0, dtype=theta.dtype)
        if theta0.shape != theta.shape:
            raise ValueError(f"`theta0` must have shape {theta.shape}; got {theta0.shape}.")
        theta = theta0
    if not bool(jnp.all(jnp.isfinite(theta))):
        raise ValueError("the initial parameters hold NaN or inf.")
    return problem, theta


def select_solver(problem: Problem, theta0, solver=None, *, events=None, rtol: float | None = None,
                  atol: float | None = None):
    """The solver object of a gradient flow of ``problem`` from ``theta0`` ((P,) or (B, P)): the one selection rule of
    :func:`gradient_flow` and of every flow built on it (the checkpointed segments of ``homflow run``, the built-ins).

    ``solver=None`` (the default) picks the non-smooth solver :class:`homflow.flow.Clarke` (docs/nonsmooth.md) for
    networks with kinked degree-1 activations (ReLU, leaky ReLU) when there are no ``events`` (it does not support
    them yet), else :class:`homflow.flow.Auto`; any other ``solver`` (a name of :data:`homflow.flow.SOLVERS`, a solver
    object, a diffrax solver) is taken as given. ``rtol`` / ``atol`` replace the solver's tolerances where given.

    Raises:
        ValueError: for an unknown solver name or type (:func:`homflow.flow.as_solver`).
    """
    if solver is None:  # kinked (ReLU-type) nets: the flow is a differential inclusion (docs/nonsmooth.md)
        from ._nonsmooth import Clarke, kinked_default

        solver = Clarke() if not events and kinked_default(problem, theta0) else "auto"
    return as_solver(solver, rtol=rtol, atol=atol)


def gradient_flow(
    model: AbstractHomogeneousModel,
    data,
    *,
    loss="square",
    t1: float,
    rtol: float | None = None,
    atol: float | None = None,
    ts=None,
    n_save: int = 200,
    solver=None,
    time: str = "auto",
    events=None,
    max_steps: int = 1_000_000,
    theta0=None,
    throw: bool = True,
):
    """Integrate the gradient flow ``d theta/dt = -grad L(theta)`` from ``model`` to ``t1`` (docs/math.md section 2).

    Arguments:
        model: the network at ``t = 0`` (its parameters are ``theta(0)``).
        data: a :class:`homflow.data.Dataset`.
        loss: ``'square'``, ``'logistic'``, ``'exponential'`` or a :class:`homflow.losses.Loss` (summed over samples).
        t1: final time.
        solver: a solver object (:class:`Auto`, :class:`RKC`, :class:`DOPRI5`, :class:`Diffrax`, ...), a name of
            :data:`SOLVERS` (``'auto'``: DOPRI5 switching to RKC2 when the flow turns stiff; ``'clarke'``: the
            non-smooth solver; ``'rkc'``; ``'tsit5'``, ``'dopri5'``, ``'dopri8'``, ``'bosh3'``, ``'kvaerno5'``,
            ``'kvaerno3'``), or a diffrax solver.
            ``stats['grad_evals']`` counts gradient evaluations. Default ``None``: the non-smooth solver
            :class:`Clarke` (docs/nonsmooth.md) for ReLU / leaky-ReLU networks without ``events``, else ``'auto'``
            (:func:`select_solver`, the one rule).
        rtol, atol: tolerances replacing the solver's (``rtol`` default 1e-8; ``atol`` default
            ``0.1 * rtol * ||theta(0)||``, :func:`default_atol`).
        ts: save times (default :func:`log_times` ``(t1, n_save)``: 0 and log-spaced times).
        time: ``'linear'``, ``'log'`` (in ``u = log(1 + t)``), or ``'auto'`` (log when ``t1 > 1e4``).
        events: :class:`LossBelow`, :class:`NormAbove`, :class:`NormBelow` (or a sequence): stop at the first one.
        max_steps: the solver gives up after this many steps and says why (stiffness or a kink diagnosed).
        theta0: optional flat initial vector overriding ``model``'s parameters (same architecture).
        throw: raise :class:`SolverError` on failure (default), or return the trajectory with its ``result``.

    Returns:
        A :class:`Trajectory` (``.ts``, ``.thetas``, ``.loss``, ``.log_loss``, ``.norm``, ``.final``, ``.stats``,
        ``.result``, ``.reason``). The last saved state is the state at the end (``t1`` or the event time).

    Raises:
        ValueError: on bad arguments (named), e.g. ``rtol`` below the precision of the dtype in use.
        SolverError: when the flow fails and ``throw``.
    """
    problem, theta = _setup(model, data, loss, theta0)
    return integrate(problem, select_solver(problem, theta, solver, events=events, rtol=rtol, atol=atol), theta,
                     t1=t1, ts=ts, n_save=n_save, time=time, events=events, max_steps=max_steps, throw=throw)


def gradient_flow_batch(model: AbstractHomogeneousModel, data, thetas0, *, method: str = "batched", loss="square",
                        solver=None, rtol: float | None = None, atol: float | None = None, **kwargs):
    """Gradient flows from many initial vectors ``thetas0`` (B, P) of ``model``'s architecture in one call.

    ``method='batched'`` (default) hands the whole batch to the solver: homflow's engine (:class:`Auto`, :class:`RKC`,
    :class:`DOPRI5`) integrates all members in one compiled lock-step loop, each with its own step size, error control
    and stiffness switch, one batched gradient per stage; a :class:`Diffrax` solver and the non-smooth solver
    :class:`Clarke` run member by member (``Diffrax(batch='vmap')`` vectorises). ``method='map'`` runs one compiled
    single flow per member. ``solver``: as :func:`gradient_flow` (default ``None``: :func:`select_solver`, the one
    rule, so a ReLU-type network gets :class:`Clarke`). Keyword arguments are those of :func:`gradient_flow`; the
    default ``atol`` is per member. Returns a list of :class:`Trajectory`.
    """
    thetas0 = np.asarray(thetas0)
    problem, theta = make_problem(model, data, loss)
    P = theta.size
    if thetas0.ndim != 2 or thetas0.shape[1] != P:
        raise ValueError(f"`thetas0` must have shape (batch, {P}); got {thetas0.shape}.")
    if method not in ("map", "batched"):
        raise ValueError(f"`method` must be 'map' or 'batched'; got {method!r}.")
    if not np.all(np.isfinite(thetas0)):
        raise ValueError("`thetas0` holds NaN or inf.")
    solver = select_solver(problem, thetas0, solver, events=kwargs.get("events"), rtol=rtol, atol=atol)
    if method == "map":
        return [integrate(problem, solver, th, **kwargs) for th in thetas0]
    return integrate(problem, solver, thetas0, **kwargs)
