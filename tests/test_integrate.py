"""The one integrate path: every solver against the closed-form linear flow and a tight reference, one compilation per
architecture, the segmented flow equal to the one-shot flow, and every result code produced by a case built for it."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from homflow.activations import relu, relu_power
from homflow.data import Dataset
from homflow.experiments import segmented_flow
from homflow.flow import (DOPRI5, RESULTS, RKC, SOLVERS, AbstractFlowSolver, Auto, Diffrax, NormAbove, SolverError,
                          as_solver, gradient_flow, integrate, make_problem)
from homflow.flow._engine import run_engine
from homflow.flow._solvers import _diffrax_solve
from homflow.models import MLP, TwoLayer


def _linear_problem(seed=0, n=20, scales=(3.0, 1.0, 0.3, 0.1)):
    """Square loss of the linear model w -> X w: the flow is w(t) = w* + V exp(-Lambda t) V^T (w0 - w*) with
    X^T X = V Lambda V^T and w* the least-squares solution (spectrum spread over ~3 decades: RKC engages)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, len(scales))) * np.asarray(scales)
    y = rng.standard_normal(n)
    model = MLP(len(scales), (), None, key=jax.random.PRNGKey(seed))
    lam, V = np.linalg.eigh(X.T @ X)
    w_star = np.linalg.lstsq(X, y, rcond=None)[0]

    def exact(w0, t):
        return w_star + V @ (np.exp(-lam * t) * (V.T @ (w0 - w_star)))

    return model, Dataset(X, y), exact


def _solvers():
    return [Auto(), RKC(), DOPRI5(), Diffrax(diffrax.Tsit5()),
            Diffrax(diffrax.Kvaerno5(root_finder=__import__("optimistix").Chord(rtol=1e-12, atol=1e-14)))]


@pytest.mark.slow  # five compiled solvers
@pytest.mark.parametrize("solver", _solvers(), ids=lambda s: s.name)
def test_each_solver_matches_the_closed_form_linear_flow(solver):
    model, data, exact = _linear_problem()
    problem, w0 = make_problem(model, data, "square")
    ts = np.array([0.0, 0.1, 1.0, 10.0, 30.0])
    tr = integrate(problem, solver.with_tolerances(rtol=1e-10), w0, t1=30.0, ts=ts)
    ref = np.stack([exact(np.asarray(w0), t) for t in ts])
    err = np.linalg.norm(tr.thetas - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert tr.result == RESULTS.successful and np.allclose(tr.ts, ts)
    assert err.max() < 1e-7, (solver.name, err)
    assert tr.stats["num_steps"] == tr.stats["num_accepted_steps"] + tr.stats["num_rejected_steps"]
    if isinstance(solver, RKC):
        assert tr.stats["num_stiff_steps"] == tr.stats["num_steps"]


@pytest.mark.slow  # three compiled engine solvers and a SciPy reference
def test_engine_solvers_match_a_tight_reference_on_a_nonlinear_flow():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((10, 3))
    data = Dataset(X, np.sign(X[:, 0] + 0.3 * X[:, 1] ** 2))
    model = TwoLayer(3, 5, relu_power(2), key=jax.random.PRNGKey(2), scale=0.3)
    problem, theta0 = make_problem(model, data, "square")
    grad = jax.jit(lambda th: problem.grad(th))
    ts = np.array([0.0, 1.0, 5.0, 20.0, 40.0])
    ref = solve_ivp(lambda t, y: -np.asarray(grad(jnp.asarray(y))), (0, 40.0), np.asarray(theta0), method="DOP853",
                    rtol=1e-13, atol=1e-15, t_eval=ts).y.T
    for solver in (Auto(rtol=1e-10), RKC(rtol=1e-10), DOPRI5(rtol=1e-10)):
        tr = integrate(problem, solver, theta0, t1=40.0, ts=ts)
        err = np.linalg.norm(tr.thetas - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert err.max() < 1e-6, (solver.name, err)


def test_a_second_flow_of_the_same_architecture_does_not_recompile():
    """New weights, new data values, new horizon, tolerance and event level: the compiled engine solve is reused."""
    def flow(seed, t1, rtol, level):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((8, 3))
        model = TwoLayer(3, 4, relu_power(2), key=jax.random.PRNGKey(seed), scale=0.3)
        problem, theta0 = make_problem(model, Dataset(X, rng.standard_normal(8)), "square")
        return integrate(problem, Auto(rtol=rtol), theta0, t1=t1, n_save=5, events=NormAbove(level), throw=False)

    flow(0, 2.0, 1e-8, 10.0)
    before = eqx.debug.get_num_traces(run_engine)
    tr = flow(1, 3.0, 1e-9, 20.0)
    assert eqx.debug.get_num_traces(run_engine) == before
    assert tr.success


@pytest.mark.slow  # a diffrax solve and the segments
def test_diffrax_solves_and_segments_reuse_their_compilation():
    model, data, _ = _linear_problem(1)
    problem, w0 = make_problem(model, data, "square")
    integrate(problem, "tsit5", w0, t1=1.0, n_save=5)
    before = eqx.debug.get_num_traces(_diffrax_solve)
    integrate(problem, Diffrax(diffrax.Tsit5(), rtol=1e-9), 2.0 * w0, t1=2.0, n_save=5)
    assert eqx.debug.get_num_traces(_diffrax_solve) == before


@pytest.mark.slow  # the segmented flow and the one-shot flow
@pytest.mark.parametrize("solver", ["auto", "tsit5"])
def test_the_segmented_flow_equals_the_one_shot_flow(solver):
    """Segments restart the step-size controller at their boundaries, so they are not the one-shot flow bit for bit,
    but both are the flow to the tolerance: they agree to ~ the global error of each (1e-7 at rtol 1e-10 here)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((12, 3))
    data = Dataset(X, rng.standard_normal(12))
    model = TwoLayer(3, 5, relu_power(2), key=jax.random.PRNGKey(3), scale=0.5)
    seg = segmented_flow(model, data, loss="square", t1=40.0, segments=4, n_save=5, rtol=1e-10, solver=solver)
    one = gradient_flow(model, data, loss="square", t1=40.0, ts=seg.ts, rtol=1e-10, solver=solver)
    assert seg.success and seg.stats["segments"] == 4 and seg.stats["solver"] == as_solver(solver).name
    err = np.linalg.norm(seg.thetas - one.thetas, axis=1) / np.linalg.norm(one.thetas, axis=1)
    assert err.max() < 1e-7, err
    assert seg.stats["grad_evals"] > 0


def _kink_problem():
    """One ReLU neuron, two samples: sample 1 (label -20) pulls w . x1 down while it is positive, sample 2 (label 10)
    pushes it up: the flow slides along the kink w . x1 = 0 (a sliding mode of the differential inclusion)."""
    model = TwoLayer(2, 1, relu, key=jax.random.PRNGKey(0))
    model = eqx.tree_at(lambda m: (m.a, m.W), model, (jnp.array([1.0]), jnp.array([[0.5, 0.2]])))
    return model, Dataset(np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([-20.0, 10.0]))


def _stiff_linear():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 4)) * np.array([100.0, 1.0, 0.1, 0.01])
    return MLP(4, (), None, key=jax.random.PRNGKey(0)), Dataset(X, rng.standard_normal(20))


@pytest.mark.slow  # several compiled solves
def test_each_result_code_is_produced_by_a_case_built_for_it():
    # successful and event_occurred
    model, data = _stiff_linear()
    tr = gradient_flow(model, data, t1=1.0, n_save=5)
    assert tr.result == RESULTS.successful and tr.success and "reached t1" in tr.reason
    model2 = TwoLayer(3, 4, relu_power(2), key=jax.random.PRNGKey(3), scale=1e-2)
    X = np.random.default_rng(3).standard_normal((10, 3))
    d2 = Dataset(X, np.sign(X[:, 0]))
    tr = gradient_flow(model2, d2, t1=1e4, n_save=5, events=NormAbove(0.1))
    assert tr.result == RESULTS.event_occurred and tr.event == "norm_above_0.1"
    assert tr.norm[-1] == pytest.approx(0.1, rel=1e-8)
    # max_steps_reached: a benign flow with too small a budget
    tr = gradient_flow(model2, d2, t1=1e4, n_save=5, max_steps=5, throw=False)
    assert tr.result == RESULTS.max_steps_reached and "raise max_steps" in tr.reason
    # stiff_limit: an explicit solver on a stiff linear flow (lambda_max ~ 2e5)
    tr = gradient_flow(model, data, t1=1e3, n_save=5, max_steps=2000, solver="tsit5", throw=False)
    assert tr.result == RESULTS.stiff_limit and "stiff" in tr.reason
    # ... which the stiff-aware default integrates
    assert gradient_flow(model, data, t1=1e3, n_save=5, max_steps=2000, throw=False).result != RESULTS.stiff_limit
    # sliding_mode: a ReLU kink, for the explicit diffrax solver and for the engine
    km, kd = _kink_problem()
    for solver in ("tsit5", "auto"):
        tr = gradient_flow(km, kd, t1=5.0, n_save=5, max_steps=3000, solver=solver, throw=False)
        assert tr.result == RESULTS.sliding_mode and "kink" in tr.reason, (solver, tr.reason)
        assert abs(tr.thetas[-1][1]) < 1e-6  # w . x1 = w_1 held at the kink
    # nonfinite: the square loss overflows at the start
    problem, th = make_problem(model2, d2, "square")
    for solver in ("auto", "tsit5"):
        tr = integrate(problem, solver, 1e60 * th / jnp.linalg.norm(th), t1=1.0, max_steps=500, throw=False)
        assert tr.result == RESULTS.nonfinite, solver
    # step_size_underflow: the NCF flow of a degree-3 network blows up in finite time
    X3 = np.random.default_rng(0).standard_normal((10, 3))
    p3, u0 = make_problem(TwoLayer(3, 4, relu_power(2), key=jax.random.PRNGKey(1), scale=0.5), Dataset(X3, np.ones(10)),
                          "square")
    tr = integrate(p3, Auto(), u0, t1=1e8, field="ncf", throw=False)
    assert tr.result == RESULTS.step_size_underflow and tr.ts[-1] < 10.0 and "blows up" in tr.reason
    # throw=True raises SolverError, a RuntimeError and not a ValueError (the CLI: exit 1, not 2)
    with pytest.raises(SolverError) as info:
        gradient_flow(km, kd, t1=5.0, n_save=5, max_steps=3000, solver="tsit5")
    assert isinstance(info.value, RuntimeError) and not isinstance(info.value, ValueError)
    assert info.value.result == RESULTS.sliding_mode and info.value.trajectory is not None


def test_solver_objects_names_and_bad_input():
    assert set(SOLVERS) >= {"auto", "rkc", "tsit5", "dopri5", "dopri8", "bosh3", "kvaerno5"}
    for name in SOLVERS:
        s = as_solver(name, rtol=1e-7)
        assert isinstance(s, AbstractFlowSolver) and s.rtol == 1e-7
    assert isinstance(as_solver(None), Auto) and as_solver(None).rtol == 1e-8
    assert isinstance(as_solver(diffrax.Dopri8()), Diffrax)
    assert as_solver(Auto(rtol=1e-6), atol=1e-9).atol == 1e-9
    with pytest.raises(ValueError, match="`solver` must be one of"):
        as_solver("rk45")
    with pytest.raises(ValueError, match="`rtol`"):
        Auto(rtol=-1.0)
    with pytest.raises(ValueError, match="`batch`"):
        Diffrax(diffrax.Tsit5(), batch="pmap")
    model, data, _ = _linear_problem()
    problem, w0 = make_problem(model, data, "square")
    with pytest.raises(ValueError, match="`rtol`"):
        integrate(problem, Auto(rtol=1e-18), w0, t1=1.0)
    with pytest.raises(ValueError, match="`field`"):
        integrate(problem, "auto", w0, t1=1.0, field="hessian")
    with pytest.raises(ValueError, match="`theta0`"):
        integrate(problem, "auto", np.full(w0.shape, np.nan), t1=1.0)


@pytest.mark.slow  # compiles the RKC step for three stage counts
def test_rkc_step_is_second_order_and_stable_up_to_many_stages():
    """On y' = z y one RKC step (h = 1) gives R_s(z) = 1 + z + z^2/2 + O(z^3) and |R_s(z)| <= 1 on the interval
    the stage rule allots to s stages, z in [-((s-1)^2 - 1)/1.54, 0] (~ -0.653 s^2; Sommeijer, Shampine & Verwer
    1997), for s up to 250 (where w0^2 - 1 ~ 5e-6 is computed as e (2 + e), not by cancellation)."""
    from homflow.flow._stiff import rkc_step

    def R(s, z):
        zz = jnp.asarray(z)[:, None]
        n = zz.shape[0]
        y1 = rkc_step(lambda t, y: zz * y, jnp.zeros(n), jnp.ones((n, 1)), zz, jnp.ones(n), jnp.full(n, s))[0]
        return np.asarray(y1[:, 0])

    for s in (3, 50, 250):
        z = -np.array([1e-3, 2e-3, 4e-3])
        err = np.abs(R(s, z) - (1 + z + z**2 / 2))
        assert np.all(err <= 10 * np.abs(z) ** 3), (s, err)
        zs = -np.linspace(0.0, ((s - 1) ** 2 - 1) / 1.54, 200)
        assert np.all(np.abs(R(s, zs)) <= 1.0 + 1e-12), s


@pytest.mark.parametrize("act,loss", [(relu_power(2), "square"), (relu, "logistic")])
def test_a_flow_from_the_origin_stays_there_at_no_cost(act, loss):
    """theta = 0 is a critical point of a homogeneous net of degree >= 2 (L(theta) - L(0) = O(||theta||^2)): the flow
    is the constant, returned at once (the solvers' error control has no scale there: atol = 0.1 rtol ||theta(0)||
    = 0); in a batch, the other members are those of the batch without it."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((12, 3))
    data = Dataset(X, np.sign(X[:, 0]))
    model = TwoLayer(3, 4, act, key=jax.random.PRNGKey(4), scale=0.3)
    P = 16
    tr = gradient_flow(model, data, loss=loss, theta0=jnp.zeros(P), t1=50.0, n_save=7)
    assert tr.success and tr.stats["num_steps"] == 0 and tr.stats["at_rest"]
    np.testing.assert_array_equal(tr.thetas, np.zeros((7, P)))
    assert np.all(tr.log_loss == tr.log_loss[0])
    if act is relu:
        return  # the non-smooth solver has no batch form
    problem, theta = make_problem(model, data, loss)
    batch = integrate(problem, Auto(rtol=1e-9), jnp.stack([jnp.zeros(P), theta, 0.5 * theta]), t1=50.0, n_save=7)
    assert batch[0].stats["at_rest"] and batch[0].success
    moving = integrate(problem, Auto(rtol=1e-9), jnp.stack([theta, 0.5 * theta]), t1=50.0, n_save=7)
    for b, th in ((1, theta), (2, 0.5 * theta)):
        np.testing.assert_array_equal(batch[b].thetas, moving[b - 1].thetas)  # the same batch without the origin
        alone = integrate(problem, Auto(rtol=1e-9), th, t1=50.0, n_save=7)  # lock step: the same flow to tolerance
        np.testing.assert_allclose(batch[b].thetas, alone.thetas, rtol=1e-7, atol=0)
        assert "at_rest" not in batch[b].stats
