"""The stiff-aware integrator: orders and stability of its steps, and gradient flows against analytic solutions and an
independent SciPy reference, with automatic switching, events and saving."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from homflow.activations import relu_power
from homflow.data import Dataset
from homflow.flow import LossBelow, gradient_flow, make_problem
from homflow.flow._stiff import dense_eval, dopri5_step, rkc_stages, rkc_step, spectral_radius
from homflow.models import MLP, TwoLayer


def _field(t, y):
    return -y + jnp.sin(t)[:, None] * y**2


def _integrate(step, n, *extra):
    y = jnp.array([[0.5, 0.2]])
    t = jnp.zeros(1)
    h = jnp.full(1, 1.0 / n)
    for _ in range(n):
        y = step(_field, t, y, _field(t, y), h, *extra)[0]
        t = t + h
    return np.asarray(y)


def _reference():
    sol = solve_ivp(lambda t, y: -y + np.sin(t) * y**2, (0, 1), [0.5, 0.2], method="DOP853", rtol=1e-13, atol=1e-15)
    return sol.y[:, -1]


@pytest.mark.parametrize("name, order", [("rkc", 2), ("dopri5", 5)])
def test_steps_converge_at_their_order(name, order):
    ref = _reference()
    raw = (lambda f, t, y, f0, h: rkc_step(f, t, y, f0, h, jnp.array([7]))) if name == "rkc" else dopri5_step
    step = jax.jit(raw, static_argnums=0)
    errs = [np.abs(_integrate(step, n) - ref).max() for n in (8, 16, 32)]
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(np.abs(rates - order) < 0.25), rates


def test_rkc_is_stable_on_its_interval_of_the_negative_axis():
    """One RKC step on y' = -lam y with s = rkc_stages(h, lam): the amplification stays in [-1, 1] up to h lam ~ 0.65 s^2."""
    lam = jnp.asarray(np.geomspace(1.0, 2e4, 200))
    h = jnp.ones_like(lam)
    s, h = rkc_stages(h, lam, 250)
    y = jnp.ones((lam.size, 1))
    f = lambda t, y: -lam[:, None] * y  # noqa: E731
    y1 = jax.jit(rkc_step, static_argnums=0)(f, jnp.zeros_like(lam), y, f(None, y), h, s)[0][:, 0]
    assert np.all(np.abs(np.asarray(y1)) <= 1.0), np.abs(np.asarray(y1)).max()
    assert float(jnp.max(h * lam)) == pytest.approx(2e4)  # no step was shortened: 176 stages cover h lam = 2e4
    assert int(jnp.max(s)) < 250 and int(jnp.min(s)) == 2


def test_dense_output_interpolates_to_high_order():
    """Dormand-Prince's continuous extension is of order 4: its error inside a step falls like h^5."""
    t = jnp.zeros(1)
    y0 = jnp.array([[0.5, 0.2]])
    errs = []
    for h in (0.4, 0.2, 0.1):
        _, _, _, dense, _ = dopri5_step(_field, t, y0, _field(t, y0), jnp.full(1, h))
        ref = solve_ivp(lambda t, y: -y + np.sin(t) * y**2, (0, h), [0.5, 0.2], method="DOP853", rtol=1e-13,
                        atol=1e-15, t_eval=[0.37 * h]).y[:, 0]
        errs.append(np.abs(np.asarray(dense_eval(dense, jnp.array([0.37])))[0] - ref).max())
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(rates > 4.5), (errs, rates)


def test_power_method_finds_the_spectral_radius():
    lam = jnp.asarray(np.linspace(1.0, 300.0, 40))
    f = lambda t, y: -lam[None, :] * y  # noqa: E731
    y = jnp.ones((1, 40))
    v = jax.random.normal(jax.random.PRNGKey(1), (1, 40))
    rho, _ = spectral_radius(f, jnp.zeros(1), y, f(None, y), v, 60)
    assert float(rho[0]) == pytest.approx(300.0, rel=0.03)


def _stiff_linear_problem():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 4)) * np.array([30.0, 3.0, 1.0, 0.3])
    return Dataset(X, rng.standard_normal(12))


def _linear_solution(data, theta0, ts):
    """Square loss 1/2 ||X theta - y||^2: theta(t) = theta* + V exp(-D t) V^T (theta0 - theta*)."""
    X, y = np.asarray(data.X), np.asarray(data.y)
    H = X.T @ X
    d, V = np.linalg.eigh(H)
    star = np.linalg.solve(H, X.T @ y)
    return np.array([star + V @ (np.exp(-d * t) * (V.T @ (theta0 - star))) for t in ts])


def test_auto_switches_on_a_stiff_flow_and_matches_the_analytic_solution():
    data = _stiff_linear_problem()
    model = MLP(4, (), None, key=jax.random.PRNGKey(0))
    theta0 = np.asarray(model.weights[0]).ravel()
    ts = np.array([0.0, 0.01, 1.0, 10.0, 100.0, 300.0])
    tr = gradient_flow(model, data, loss="square", t1=300.0, ts=ts, rtol=1e-8)
    assert tr.success
    assert tr.stats["t_switch"] is not None and tr.stats["num_stiff_steps"] > 0
    np.testing.assert_allclose(tr.ts, ts)
    exact = _linear_solution(data, theta0, ts)
    err = np.linalg.norm(tr.thetas - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert err.max() < 1e-6, err
    lam_max = np.linalg.eigvalsh(np.asarray(data.X).T @ np.asarray(data.X)).max()
    explicit_evals = 6 * lam_max * 300.0 / 3.5  # an explicit 6-stage solver's steps are capped near 3.5 / lam_max
    assert tr.stats["grad_evals"] * 10 < explicit_evals, (tr.stats["grad_evals"], explicit_evals)


def test_stiff_solver_agrees_with_scipy_on_a_small_net_near_a_minimum():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((15, 3)) * np.array([2.0, 1.0, 0.3])
    data = Dataset(X, np.tanh(X[:, 0]))
    model = TwoLayer(3, 4, relu_power(2), key=jax.random.PRNGKey(3), scale=0.5)
    objective, theta0 = make_problem(model, data, "square")
    grad = jax.jit(lambda th: objective.grad(th))
    hess = jax.jit(jax.hessian(lambda th: objective.value(th)))
    ts = np.array([0.0, 2.0, 10.0, 30.0])
    ref = solve_ivp(lambda t, y: -np.asarray(grad(jnp.asarray(y))), (0, 30.0), np.asarray(theta0), method="LSODA",
                    rtol=1e-12, atol=1e-14, t_eval=ts, jac=lambda t, y: -np.asarray(hess(jnp.asarray(y))))
    # RKC is second order: its global error is a larger multiple of rtol than DOPRI5's (docs/performance.md)
    for solver, rtol, tol in (("auto", 1e-9, 1e-6), ("stiff", 1e-10, 1e-5)):
        tr = gradient_flow(model, data, loss="square", t1=30.0, ts=ts, rtol=rtol, solver=solver)
        assert tr.success
        err = np.linalg.norm(tr.thetas - ref.y.T, axis=1) / np.linalg.norm(ref.y.T, axis=1)
        assert err.max() < tol, (solver, err)
        # balance p a_j^2 - ||w_j||^2 is conserved along the flow
        bal = [2 * tr.model_at(i).a ** 2 - np.sum(tr.model_at(i).W ** 2, axis=1) for i in range(len(tr))]
        assert np.abs(np.array(bal) - bal[0]).max() < 1e-7 * tr.norm.max() ** 2


def test_events_and_saving_in_the_stiff_phase():
    data = _stiff_linear_problem()
    model = MLP(4, (), None, key=jax.random.PRNGKey(0))
    theta0 = np.asarray(model.weights[0]).ravel()
    objective, _ = make_problem(model, data, "square")
    loss_inf = float(objective.value(jnp.asarray(_linear_solution(data, theta0, [1e9])[0])))
    target = loss_inf * (1 + 1e-3)
    tr = gradient_flow(model, data, loss="square", t1=1e3, rtol=1e-8, events=LossBelow(target), n_save=50)
    assert tr.success and tr.event == LossBelow(target).name
    assert tr.stats["num_stiff_steps"] > 0  # the event was found while RKC was stepping
    assert tr.loss[-1] == pytest.approx(target, rel=1e-8)
    assert np.all(tr.loss[:-1] > target)
    exact = _linear_solution(data, theta0, tr.ts)
    err = np.linalg.norm(tr.thetas - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert err.max() < 1e-6, err  # the interpolated saves (and the event state) follow the flow
