"""The lock-step batched integrator: each member as accurate as alone, own step sizes and stiffness, own events."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from homflow.activations import relu_power
from homflow.data import Dataset
from homflow.flow import NormAbove, gradient_flow, gradient_flow_batch, ode_batch
from homflow.models import TwoLayer, flatten


def _decay(t, y, lam):
    return -lam * y


def _decay_packed(t, z, args):
    """z = (y, lam) packed in one state: dy/dt = -lam y, dlam/dt = 0 (a per-member rate in a shared field)."""
    y, lam = jnp.split(z, 2)
    return jnp.concatenate([-lam * y, jnp.zeros_like(lam)])


def test_members_of_different_stiffness_each_match_the_exact_solution():
    lam = np.array([[1.0, 2.0, 3.0], [1.0, 1e2, 1e4], [0.5, 0.5, 2e3]])
    z0 = np.concatenate([np.ones((3, 3)), lam], axis=1)
    ts = np.array([0.0, 0.5, 2.0, 20.0])
    sol = ode_batch(_decay_packed, z0, 20.0, ts=ts, rtol=1e-9, atol=1e-12)
    assert sol.success.all()
    exact = np.exp(-lam[:, None, :] * ts[None, :, None])
    assert np.abs(sol.ys[:, :, :3] - exact).max() < 1e-6
    stiff = sol.stats["num_stiff_steps"]
    assert stiff[0] == 0 and stiff[1] > 0 and stiff[2] > 0  # only the stiff members switched to RKC
    assert sol.stats["grad_evals"][1] < 0.2 * 6 * 1e4 * 20 / 3.3  # far below the explicit stability bound
    # a member's result does not depend on its companions
    alone = ode_batch(_decay_packed, z0[:1], 20.0, ts=ts, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(alone.ys[0], sol.ys[0], rtol=1e-12, atol=1e-15)
    assert alone.stats["grad_evals"][0] == sol.stats["grad_evals"][0]


def _decay_event(t, z, args):
    """Fires where the first component falls through 0.3."""
    return jnp.stack([z[0] - 0.3])


def test_stage_lock_step_takes_each_members_own_steps():
    """The stage lock step (one batched evaluation per iteration, each member at its own stage) takes the same steps
    as the step lock step for every member, explicit and stiff ones mixed in one batch; both match the exact solution
    and stop at the same events; the stage lock step pays fewer batched evaluations."""
    lam = np.array([[1.0, 2.0, 3.0], [1.0, 1e2, 1e4], [0.05, 0.5, 2e3], [0.2, 3e2, 1.0], [4.0, 1.0, 1.0]])
    # 20 more (a batch above 16 ends the steps of at most a quarter of its members per iteration; the rest wait)
    rng = np.random.default_rng(0)
    lam = np.concatenate([lam, np.column_stack([rng.uniform(0.05, 3.0, 20), 10.0 ** rng.uniform(0, 4, (20, 2))])])
    B = lam.shape[0]
    z0 = np.concatenate([np.ones((B, 3)), lam], axis=1)
    ts = np.array([0.0, 0.5, 2.0, 20.0])
    kw = dict(ts=ts, rtol=1e-9, atol=1e-12, event=_decay_event)
    step = ode_batch(_decay_packed, z0, 20.0, lockstep="step", **kw)
    stage = ode_batch(_decay_packed, z0, 20.0, lockstep="stage", **kw)
    assert step.success.all() and stage.success.all()
    for k in ("num_steps", "num_accepted_steps", "num_stiff_steps", "grad_evals"):
        assert stage.stats[k].tolist() == step.stats[k].tolist(), k
    np.testing.assert_array_equal(stage.event, step.event)
    np.testing.assert_allclose(stage.t_end, step.t_end, rtol=1e-11)  # rounding of the located events
    np.testing.assert_allclose(stage.ys, step.ys, rtol=1e-10, atol=1e-14)
    exact_t = np.log(1 / 0.3) / lam[:, 0]  # y_0 = exp(-lam_0 t) reaches 0.3
    np.testing.assert_allclose(stage.t_end, np.minimum(exact_t, 20.0), rtol=1e-6)  # RKC: cubic Hermite events
    assert (step.stats["num_stiff_steps"][1:3] > 0).all() and step.stats["num_stiff_steps"][0] == 0
    # the stage lock step pays one batched evaluation per member evaluation of the longest-running member, plus the
    # iterations in which it waits for nobody: far fewer than the step lock step, which pays max(stages) per step
    assert stage.stats["batched_evals"] < step.stats["batched_evals"]
    small = ode_batch(_decay_packed, z0[:5], 20.0, lockstep="stage", **kw)  # every step end handled at once
    assert small.stats["batched_evals"] == int(small.stats["grad_evals"].max())
    assert small.stats["num_steps"].tolist() == step.stats["num_steps"][:5].tolist()


def test_stage_lock_step_budget_stops_members_together():
    lam = np.array([[1.0, 1e3], [2.0, 1.0], [1e4, 3.0]])
    z0 = np.concatenate([np.ones((3, 2)), lam], axis=1)
    sol = ode_batch(_decay_packed, z0, 50.0, rtol=1e-9, atol=1e-12, lockstep="stage", max_batched_evals=300)
    assert (sol.status == 3).all() and (sol.t_end < 50.0).all()
    # each stopped at the end of its first step after 300 batched evaluations: within one step's evaluations
    assert 300 <= sol.stats["batched_evals"] <= 300 + 252
    full = ode_batch(_decay_packed, z0, 50.0, rtol=1e-9, atol=1e-12, lockstep="stage")
    assert full.success.all()
    with pytest.raises(ValueError, match="`lockstep`"):
        ode_batch(_decay_packed, z0, 1.0, lockstep="member")
    with pytest.raises(ValueError, match="`max_batched_evals`"):
        ode_batch(_decay_packed, z0, 1.0, lockstep="stage", max_batched_evals=0)


def test_gradient_flow_batch_matches_single_calls():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((12, 3))
    data = Dataset(X, np.tanh(X[:, 0] - X[:, 1]))
    model = TwoLayer(3, 4, relu_power(2), key=jax.random.PRNGKey(4))
    P = flatten(model)[0].size
    thetas0 = rng.standard_normal((4, P))
    thetas0 *= np.array([1e-2, 0.1, 0.5, 1.0])[:, None] / np.linalg.norm(thetas0, axis=1, keepdims=True)
    kw = dict(loss="square", t1=40.0, rtol=1e-9, ts=[0.0, 1.0, 10.0, 40.0])
    batch = gradient_flow_batch(model, data, thetas0, method="batched", **kw)
    for th, b in zip(thetas0, batch):
        s = gradient_flow(model, data, theta0=th, **kw)
        np.testing.assert_allclose(b.ts, s.ts)
        # equal up to rounding-level differences of batched arithmetic, amplified at most to the solver's tolerance
        rel = np.linalg.norm(b.thetas - s.thetas, axis=1) / np.linalg.norm(s.thetas, axis=1)
        assert rel.max() < 1e-6, rel
        # each member takes its own steps, not the steps of the slowest member
        assert abs(b.stats["grad_evals"] - s.stats["grad_evals"]) <= 0.2 * s.stats["grad_evals"]


def test_each_member_stops_at_its_own_event():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((10, 3))
    data = Dataset(X, np.sign(X[:, 0]))
    model = TwoLayer(3, 5, relu_power(2), key=jax.random.PRNGKey(5))
    P = flatten(model)[0].size
    thetas0 = rng.standard_normal((3, P))
    thetas0 *= np.array([1e-2, 3e-2, 2.0])[:, None] / np.linalg.norm(thetas0, axis=1, keepdims=True)
    out = gradient_flow_batch(model, data, thetas0, method="batched", loss="square", t1=200.0, rtol=1e-8,
                              events=NormAbove(1.0), n_save=30)
    assert [o.event for o in out[:2]] == ["norm_above_1", "norm_above_1"]
    assert out[0].ts[-1] > out[1].ts[-1]  # the smaller start escapes later
    for o in out[:2]:
        assert o.norm[-1] == pytest.approx(1.0, rel=1e-8)
    assert out[2].event is None and out[2].ts[-1] == pytest.approx(200.0)  # started above the level


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`y0`"):
        ode_batch(_decay, np.array([[1.0, np.nan]]), 1.0, args=1.0)
    with pytest.raises(ValueError, match="`t1`"):
        ode_batch(_decay, np.ones((2, 2)), -1.0, args=1.0)
    with pytest.raises(ValueError, match="`ts`"):
        ode_batch(_decay, np.ones((2, 2)), 1.0, args=1.0, ts=[0.0, 2.0])
    with pytest.raises(ValueError, match="`method`"):
        ode_batch(_decay, np.ones((2, 2)), 1.0, args=1.0, method="rk4")
    model = TwoLayer(3, 4, relu_power(2), key=jax.random.PRNGKey(0))
    data = Dataset(np.ones((4, 3)), np.ones(4))
    with pytest.raises(ValueError, match="`solver`"):
        gradient_flow_batch(model, data, np.ones((2, 16)), method="batched", t1=1.0, solver="rk45")
    with pytest.raises(ValueError, match="`method`"):
        gradient_flow_batch(model, data, np.ones((2, 16)), method="pmap", t1=1.0)


@pytest.mark.parametrize("method", ["batched", "map"])
def test_a_batch_of_relu_flows_takes_the_nonsmooth_solver_and_each_member_is_its_single_flow(method):
    """The one selection rule holds for batches: ReLU members get the non-smooth solver (the smooth engine stalls at
    a sliding mode: 1,000,000 steps to t = 1.1 on this problem), run member by member, each equal to its own
    ``gradient_flow``; the loss of each never increases."""
    from homflow.activations import relu
    from homflow.data import sphere

    model = TwoLayer(5, 10, relu, key=jax.random.PRNGKey(0), scale=0.5)
    data = sphere(30, 5, seed=9)
    thetas0 = 0.3 * np.random.default_rng(0).standard_normal((3, flatten(model)[0].size))
    batch = gradient_flow_batch(model, data, thetas0, method=method, loss="logistic", t1=20.0, n_save=8)
    assert len(batch) == 3
    for b, tr in enumerate(batch):
        assert tr.success and tr.stats["solver"] == "clarke" and tr.stats["events"] > 0, tr.reason
        one = gradient_flow(model, data, loss="logistic", t1=20.0, n_save=8, theta0=thetas0[b])
        np.testing.assert_array_equal(tr.thetas, one.thetas)
        assert np.all(np.diff(tr.loss) <= 1e-14 * tr.loss[0])
