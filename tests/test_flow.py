"""Gradient flow: conserved quantities, an independent SciPy reference, events, the log-time late phase, batches."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from homflow.activations import relu, relu_power
from homflow.data import Dataset, gaussian_toy
from homflow.flow import (RESULTS, Diffrax, LossBelow, NormAbove, NormBelow, SolverError, gradient_flow, gradient_flow_batch,
                          log_times, make_problem)
from homflow.losses import smoothed_margin
from homflow.models import MLP, TwoLayer, flatten


def small_problem(seed=0, n=10, d=3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = np.sign(X @ rng.standard_normal(d) + 0.3 * np.maximum(X[:, 0], 0) ** 2)
    return Dataset(X, y)


@pytest.mark.parametrize("p", [2, 3])
def test_balance_is_conserved_along_the_flow(p):
    """For a two-layer net with p-homogeneous activation, p a_j^2 - ||w_j||^2 is constant along gradient flow."""
    data = small_problem()
    model = TwoLayer(3, 5, relu_power(p), key=jax.random.PRNGKey(1), scale=0.5)
    tr = gradient_flow(model, data, loss="square", t1=30.0, rtol=1e-10)
    assert tr.success
    balance = np.array([p * tr.model_at(i).a ** 2 - np.sum(tr.model_at(i).W ** 2, axis=1) for i in range(len(tr))])
    drift = np.max(np.abs(balance - balance[0]))
    scale = np.max(tr.norm) ** 2
    assert drift <= 1e-8 * scale, drift
    assert tr.loss[-1] < tr.loss[0]  # and the flow did something


def test_flow_agrees_with_scipy_dop853_reference():
    data = small_problem(seed=2)
    model = TwoLayer(3, 5, relu_power(2), key=jax.random.PRNGKey(2), scale=0.3)
    objective, theta0 = make_problem(model, data, "square")
    grad = jax.jit(lambda th: objective.grad(th))
    ts = np.array([0.0, 1.0, 5.0, 20.0, 40.0])
    ref = solve_ivp(lambda t, y: -np.asarray(grad(jnp.asarray(y))), (0, 40.0), np.asarray(theta0), method="DOP853",
                    rtol=1e-12, atol=1e-14, t_eval=ts)
    for solver in ("auto", "tsit5", "dopri8"):
        tr = gradient_flow(model, data, loss="square", t1=40.0, ts=ts, rtol=1e-10, solver=solver)
        assert tr.success, tr.result
        np.testing.assert_allclose(tr.ts, ts)
        err = np.linalg.norm(tr.thetas - ref.y.T, axis=1) / np.linalg.norm(ref.y.T, axis=1)
        assert err.max() < 1e-6, (solver, err)
        assert tr.stats["num_steps"] == tr.stats["num_accepted_steps"] + tr.stats["num_rejected_steps"]
        if solver == "tsit5":  # first-same-as-last: 6 evaluations per attempted step, one at the start
            assert tr.stats["grad_evals"] == 6 * tr.stats["num_steps"] + 1


def test_events_stop_where_asked():
    data = small_problem(seed=3)
    model = TwoLayer(3, 5, relu_power(2), key=jax.random.PRNGKey(3), scale=1e-2)
    tr = gradient_flow(model, data, loss="square", t1=1e4, events=NormAbove(0.1))
    assert tr.success and tr.event == "norm_above_0.1"
    assert tr.norm[-1] == pytest.approx(0.1, rel=1e-8)
    assert np.all(tr.norm[:-1] < 0.1)
    tr2 = gradient_flow(model, data, loss="square", t1=1e4, events=[NormBelow(1e-5), LossBelow(4.0)])
    assert tr2.event == "loss_below_4"
    assert tr2.loss[-1] == pytest.approx(4.0, rel=1e-8)


def test_late_phase_in_log_time_reaches_t_1e12():
    """Exponential loss on separable data: the loss falls like 1/t up to t = 1e12 in few steps, nothing underflows,
    and the smoothed margin is non-decreasing once the loss is below 1 (Lyu & Li, Thm 4.1)."""
    data = gaussian_toy(40, seed=0)
    model = TwoLayer(2, 4, relu, key=jax.random.PRNGKey(0), scale=1.0)
    tr = gradient_flow(model, data, loss="exponential", t1=1e12, rtol=1e-9, n_save=60)
    assert tr.success and tr.stats["log_time"]
    assert tr.stats["num_steps"] < 5000
    assert np.all(np.isfinite(tr.log_loss))
    # L ~ 1/(c t) late: log L + log t tends to a constant
    late = tr.ts > 1e8
    slope = np.polyfit(np.log(tr.ts[late]), tr.log_loss[late], 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.05)
    sm = np.array([float(smoothed_margin(tr.model_at(i), data)) for i in range(len(tr)) if tr.log_loss[i] < 0])
    assert np.all(np.diff(sm) >= -1e-7 * np.abs(sm).max())
    # log time and linear time both agree with a tight Dormand-Prince 8 reference (a smooth net: ReLU kinks amplify
    # solver differences). ReLU^2 is only C^1, so global errors are ~100x the local tolerance: compare at 1e-6.
    model = TwoLayer(2, 4, relu_power(2), key=jax.random.PRNGKey(0), scale=1.0)
    kw = dict(loss="exponential", t1=50.0, ts=[0.0, 10.0, 50.0])
    ref = gradient_flow(model, data, time="linear", rtol=1e-13, atol=1e-14, solver="dopri8", **kw)
    for time in ("log", "linear"):
        a = gradient_flow(model, data, time=time, rtol=1e-10, **kw)
        np.testing.assert_allclose(a.thetas, ref.thetas, rtol=1e-6, atol=1e-9)


def test_stiff_flow_is_diagnosed_not_silently_slow():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 4)) * np.array([100.0, 1.0, 0.1, 0.01])
    data = Dataset(X, rng.standard_normal(20))
    model = MLP(4, (), None, key=jax.random.PRNGKey(0))
    tr = gradient_flow(model, data, loss="square", t1=1e3, max_steps=2000, solver="tsit5", throw=False)
    assert not tr.success and tr.result == RESULTS.stiff_limit
    assert "stiff" in tr.reason and "max_steps" in tr.reason
    with pytest.raises(SolverError, match="stiff") as info:  # throw=True (the default) raises, not a ValueError
        gradient_flow(model, data, loss="square", t1=1e3, max_steps=2000, solver="tsit5")
    assert not isinstance(info.value, ValueError) and info.value.result == RESULTS.stiff_limit
    assert len(tr.ts) >= 2 and tr.ts[-1] < 1e3  # what was computed is kept


@pytest.mark.slow  # four compiled solvers (single/vmapped Tsit5, the engine for one and for three members)
def test_batch_of_initial_conditions_matches_single_calls():
    """Every batch method ('map', 'vmap' of diffrax Tsit5, homflow's lock-step 'batched' engine) agrees with single calls
    of the same solver, and both with a tight reference, to the accuracy the solver delivers at rtol 1e-9.

    'map' runs the very same compiled solve per member: equal to rounding. 'vmap' and 'batched' evaluate the gradient
    of all members at once (a different summation order), and an adaptive solver turns rounding-level differences into
    different accepted steps: their results then differ by up to the global error of the solve (measured 1.4e-7 for
    vmapped Tsit5 here), not by rounding. The justified bound is the solver's error against a reference at rtol 1e-12:
    each run within 1e-6 of it, so any two runs within 2e-6 of each other."""
    data = small_problem(seed=4)
    model = TwoLayer(3, 4, relu_power(2), key=jax.random.PRNGKey(4))
    P = flatten(model)[0].size
    rng = np.random.default_rng(0)
    thetas0 = rng.standard_normal((3, P))
    thetas0 *= 0.1 / np.linalg.norm(thetas0, axis=1, keepdims=True)
    ts = [0.0, 5.0, 10.0]
    kw = dict(loss="square", t1=10.0, rtol=1e-9, atol=1e-11, ts=ts)
    refs = [gradient_flow(model, data, theta0=th, loss="square", t1=10.0, rtol=1e-12, atol=1e-15, ts=ts,
                          solver="tsit5").thetas for th in thetas0]

    def rel(a, b):
        return (np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max()

    for solver, methods in ((Diffrax(diffrax.Tsit5(), batch="vmap"), ("map", "batched")), ("auto", ("map", "batched"))):
        singles = [gradient_flow(model, data, theta0=th, solver=solver, **kw) for th in thetas0]
        for s, ref in zip(singles, refs):
            assert s.success and rel(s.thetas, ref) < 1e-6, (solver, rel(s.thetas, ref))
        for method in methods:
            batch = gradient_flow_batch(model, data, thetas0, method=method, solver=solver, **kw)
            for s, b, ref in zip(singles, batch, refs):
                np.testing.assert_allclose(b.ts, s.ts)
                assert b.success and rel(b.thetas, ref) < 1e-6, (solver, method, rel(b.thetas, ref))
                if method == "map":
                    np.testing.assert_allclose(b.thetas, s.thetas, rtol=1e-12, atol=1e-15)
                else:
                    assert rel(b.thetas, s.thetas) < 2e-6, (solver, method, rel(b.thetas, s.thetas))


def test_bad_arguments_are_named():
    data = small_problem()
    model = TwoLayer(3, 4, relu, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="`rtol`"):
        gradient_flow(model, data, t1=1.0, rtol=1e-17)
    with pytest.raises(ValueError, match="`t1`"):
        gradient_flow(model, data, t1=-1.0)
    with pytest.raises(ValueError, match="`solver`"):
        gradient_flow(model, data, t1=1.0, solver="rk99")
    with pytest.raises(ValueError, match="`time`"):
        gradient_flow(model, data, t1=1.0, time="sqrt")
    with pytest.raises(ValueError, match="labels"):
        gradient_flow(model, Dataset(data.X, np.asarray(data.y) * 0.5), t1=1.0, loss="logistic")
    with pytest.raises(ValueError, match="`level`"):
        NormAbove(-1.0)
    np.testing.assert_allclose(log_times(1e3, 3), [0.0, 1e-3, 1e3])
