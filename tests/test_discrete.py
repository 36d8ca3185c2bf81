"""Gradient descent, SGD and Adam against hand-written loops; the loss-based step size."""

import jax
import numpy as np
import pytest

from homflow.activations import leaky_relu, relu_power
from homflow.data import gaussian_toy
from homflow.flow import adam, gradient_descent, gradient_flow, make_objective, sgd, sgd_batches
from homflow.models import TwoLayer


@pytest.fixture
def setup():
    data = gaussian_toy(24, seed=0)
    model = TwoLayer(2, 3, leaky_relu(0.01), key=jax.random.PRNGKey(0), scale=0.5)
    return data, model


def test_gd_matches_a_hand_loop_and_tracks_the_flow(setup):
    data, model = setup
    obj, th = make_objective(model, data, "exponential")
    g = jax.jit(jax.grad(obj.value))
    ref = th
    for _ in range(50):
        ref = ref - 0.01 * g(ref)
    tr = gradient_descent(model, data, loss="exponential", lr=0.01, steps=50, save_every=10)
    np.testing.assert_allclose(tr.thetas[-1], ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(tr.steps, [0, 10, 20, 30, 40, 50])
    assert tr.ts[-1] == pytest.approx(0.5)
    # GD error against the flow is O(lr) on a smooth net (leaky ReLU kinks would spoil the rate)
    model = TwoLayer(2, 3, relu_power(2), key=jax.random.PRNGKey(0), scale=0.5)
    flow = gradient_flow(model, data, loss="exponential", t1=0.5, ts=[0.0, 0.5], rtol=1e-12, solver="dopri8")
    tr1 = gradient_descent(model, data, loss="exponential", lr=0.001, steps=500)
    tr2 = gradient_descent(model, data, loss="exponential", lr=0.0005, steps=1000)
    e1 = np.linalg.norm(tr1.thetas[-1] - flow.thetas[-1])
    e2 = np.linalg.norm(tr2.thetas[-1] - flow.thetas[-1])
    assert 1.8 < e1 / e2 < 2.2


def test_loss_based_schedule_decreases_the_loss_far_below_underflow(setup):
    data, model = setup
    tr = gradient_descent(model, data, loss="exponential", lr=0.1, steps=400, schedule="loss_based", save_every=5)
    assert np.all(np.isfinite(tr.thetas)) and np.all(np.isfinite(tr.log_loss))
    assert np.all(np.diff(tr.log_loss) <= 0)
    assert tr.log_loss[-1] < -800  # L < 1e-347: only representable in log space
    # the normalized margin (scale invariant) improves as the flow direction converges
    from homflow.losses import normalized_margin
    assert float(normalized_margin(tr.final, data)) > float(normalized_margin(tr.initial, data))


def test_sgd_replays_identical_batches(setup):
    data, model = setup
    b = sgd_batches(data.n, 8, 30, seed=1)
    assert b.shape == (30, 8)
    for epoch in range(10):  # each epoch is a permutation of the samples
        assert sorted(b[3 * epoch: 3 * epoch + 3].ravel()) == list(range(24))
    t1 = sgd(model, data, loss="exponential", lr=0.05, steps=30, batches=b)
    t2 = sgd(model, data, loss="exponential", lr=0.05, steps=30, batches=t1.extras["batches"])
    np.testing.assert_array_equal(t1.thetas, t2.thetas)
    obj, th = make_objective(model, data, "exponential")
    for k in range(30):
        th = th - 0.05 * jax.grad(obj.value)(th, obj.X[b[k]], obj.y[b[k]])
    np.testing.assert_allclose(t1.thetas[-1], th, rtol=1e-12)
    t3 = sgd(model, data, loss="exponential", lr=0.05, steps=30, batch_size=8, seed=2)
    assert np.abs(t3.thetas[-1] - t1.thetas[-1]).max() > 1e-6
    with pytest.raises(ValueError, match="batch_size"):
        sgd(model, data, loss="exponential", lr=0.05, steps=3, batch_size=100)


def test_adam_runs_and_is_coordinatewise(setup):
    data, model = setup
    tr = adam(model, data, loss="exponential", lr=0.01, steps=20)
    # the first Adam step moves every coordinate by about lr (sign of the gradient)
    tr1 = adam(model, data, loss="exponential", lr=0.01, steps=1, save_every=1)
    step = np.abs(tr1.thetas[1] - tr1.thetas[0])
    obj, th = make_objective(model, data, "exponential")
    nz = np.abs(np.asarray(obj.grad(th))) > 1e-12
    np.testing.assert_allclose(step[nz], 0.01, rtol=1e-3)
    assert tr.log_loss[-1] < tr.log_loss[0]
    with pytest.raises(ValueError, match="`lr`"):
        adam(model, data, loss="exponential", lr=0.0, steps=2)
