"""``embedding.joint_flow`` picks its solver by the one rule of ``gradient_flow`` (:func:`homflow.flow.select_solver`):
for a leaky-ReLU network the narrow and wide flows run as one non-smooth hybrid system
(:func:`homflow.flow.joint_nonsmooth_flow`). Checked against independent computations: the narrow half against the
non-smooth flow of the narrow network alone, ``eta(t) = T theta(t)`` to rounding (arXiv 2505.12419), and the energy
identity of the pair."""

import jax
import numpy as np
import pytest

from homflow.activations import leaky_relu
from homflow.data import gaussian_toy
from homflow.embedding import joint_flow, split, trajectory_error
from homflow.flow import nonsmooth_flow
from homflow.models import MLP


@pytest.mark.slow  # two non-smooth flows (~30-70 s under load)
def test_joint_flow_of_a_leaky_relu_net_is_the_nonsmooth_pair():
    data = gaussian_toy(30, separable=True, seed=2)
    m = MLP(2, (2,), leaky_relu(0.05), key=jax.random.PRNGKey(3), scale=0.5)
    s = split(m, layer=0, neuron=0, coeffs=[0.6, 0.8])
    ts = np.linspace(0.0, 4.0, 9)
    a, b = joint_flow(s, m, data, t1=4.0, ts=ts, rtol=1e-10)
    assert a.success and a.stats["solver"] == "clarke" and a.stats["error_norm"] == "narrow", a.reason
    assert np.allclose(a.ts, ts)
    assert np.max(trajectory_error(s, a, b)) <= 1e-12
    alone = nonsmooth_flow(m, data, loss="exponential", t1=4.0, ts=ts, rtol=1e-10, time="linear")
    err = np.linalg.norm(a.thetas - alone.thetas, axis=1) / np.linalg.norm(alone.thetas, axis=1)
    assert err.max() <= 1e-9, err  # the narrow half is the narrow flow (same controller on the narrow half)
    # energy identity of the pair: int ||theta'||^2 + ||eta'||^2 = (L(0) - L(T)) + (L~(0) - L~(T)) = 2 (L(0) - L(T))
    drop, energy = a.loss[0] - a.loss[-1], float(a.extras["energy"][-1])
    assert drop > 0 and abs(2 * drop - energy) <= 1e-7 * drop, (drop, energy)
    with pytest.raises(ValueError, match="error_norm"):
        joint_flow(s, m, data, t1=1.0, error_norm="full")  # the non-smooth controller looks at the narrow half
