"""Neuron/channel splitting maps T: isometry, outputs, gradients, merge, composition, degree p != 1, zero coefficients
and bad input (arXiv 2505.12419; docs/math.md section 5)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import rounding_tol
from homflow.activations import leaky_relu, leaky_relu_power, linear, relu, relu_power
from homflow.data import gaussian_toy
from homflow.embedding import (
    check_coeffs,
    compose,
    output_preserving_out_coeffs,
    split,
    split_channel,
    split_every,
    split_properties,
)
from homflow.flow import adam, gradient_descent, sgd
from homflow.models import CNN, MLP, TwoLayer, flatten, predict

ONE_HOMOGENEOUS = {"relu": relu, "leaky_relu": leaky_relu(0.1), "linear": linear, "abs_like": leaky_relu(-0.5)}
TOL = rounding_tol(factor=1e3)


@eqx.filter_jit
def _phi_and_grads(model, X):
    theta, unflatten = flatten(model)
    phi = lambda th, x: unflatten(th)(x)  # noqa: E731
    return (jax.vmap(phi, in_axes=(None, 0))(theta, X), jax.vmap(jax.grad(phi), in_axes=(None, 0))(theta, X))


def _assert_identities(s, narrow, X):
    """T^T T = I, Phi~(T theta) = Phi(theta), grad Phi~(T theta) = T grad Phi(theta), merge(T theta) = theta."""
    T = s.matrix()
    assert T.shape == (s.n_wide, s.n_narrow)
    np.testing.assert_allclose(T.T @ T, np.eye(T.shape[1]), atol=TOL)
    wide = s(narrow)
    out_n, g_n = _phi_and_grads(narrow, X)
    out_w, g_w = _phi_and_grads(wide, X)
    np.testing.assert_allclose(out_w, out_n, atol=TOL)
    np.testing.assert_allclose(g_w, np.asarray(g_n) @ T.T, atol=TOL)
    theta = flatten(narrow)[0]
    np.testing.assert_allclose(flatten(wide)[0], T @ np.asarray(theta), atol=TOL)
    np.testing.assert_allclose(flatten(s.merge(wide))[0], theta, atol=TOL)
    # merge is the transpose: <T u, v> = <u, T^T v> for random u, v
    v = jax.random.normal(jax.random.PRNGKey(7), (s.n_wide,), theta.dtype)
    np.testing.assert_allclose(s.merge_flat(v), T.T @ np.asarray(v), atol=TOL)


def _models(act, key):
    k = jax.random.split(key, 5)
    return {
        "two_layer": (TwoLayer(4, 3, act, key=k[0]), dict(layer=0, neuron=1)),
        "mlp3_layer0": (MLP(4, (3, 4), act, key=k[1]), dict(layer=0, neuron=2)),
        "mlp4_layer2": (MLP(4, (3, 3, 2), act, key=k[2]), dict(layer=2, neuron=0)),
        "cnn1d_last": (CNN((1, 6), (3, 2), act, pool=2, key=k[3]), dict(layer=1, channel=1)),
        "cnn2d_first": (CNN((2, 3, 3), (2, 2), act, key=k[4]), dict(layer=0, channel=0)),
    }


CASES = [("leaky_relu", m) for m in ("two_layer", "mlp3_layer0", "mlp4_layer2", "cnn1d_last", "cnn2d_first")] + [
    ("relu", "mlp4_layer2"), ("relu", "cnn1d_last"), ("linear", "mlp3_layer0"), ("linear", "cnn2d_first"),
    ("abs_like", "two_layer"), ("abs_like", "cnn1d_last")]


@pytest.mark.parametrize("act_name,model_name", CASES)
def test_identities_every_model_and_1_homogeneous_activation(act_name, model_name):
    act = ONE_HOMOGENEOUS[act_name]
    coeffs = np.array([0.3, 0.5, 0.0, 0.9])
    coeffs = coeffs / np.linalg.norm(coeffs)  # unequal, one zero
    model, where = _models(act, jax.random.PRNGKey(3))[model_name]
    s = split_channel(model, coeffs=coeffs, **where) if "cnn" in model_name else split(model, coeffs=coeffs, **where)
    assert s.preserves_outputs and s.isometric and s.preserves_gradients
    X = jax.random.normal(jax.random.PRNGKey(11), (7, model.d_in))
    _assert_identities(s, model, X)
    if act_name == "leaky_relu":
        # the split applies to any network of the narrow architecture, not only the one it was built from
        other = jax.tree_util.tree_map(lambda w: 2.0 * w + 0.1, model)
        _assert_identities(s, other, X)


def test_two_layer_matrix_is_the_formula_of_math_md():
    """(a, b) -> (c_1 a, .., c_m a, c_1 b, .., c_m b) on the split neuron, the identity elsewhere."""
    m = TwoLayer(2, 2, relu, key=jax.random.PRNGKey(0))
    c = (0.6, 0.8)
    s = split(m, neuron=0, coeffs=c)
    wide = s(m)
    np.testing.assert_array_equal(wide.a, jnp.array([0.6 * m.a[0], 0.8 * m.a[0], m.a[1]]))
    np.testing.assert_array_equal(wide.W, jnp.stack([0.6 * m.W[0], 0.8 * m.W[0], m.W[1]]))
    assert s.copies == (0, 1)
    T = s.matrix()
    # parameter order (a, W.ravel()): narrow a0, a1, W00, W01, W10, W11
    expected = np.zeros((9, 6))
    expected[0, 0], expected[1, 0], expected[2, 1] = 0.6, 0.8, 1
    expected[3, 2], expected[4, 3], expected[5, 2], expected[6, 3] = 0.6, 0.6, 0.8, 0.8
    expected[7, 4], expected[8, 5] = 1, 1
    np.testing.assert_array_equal(T, expected)


def test_several_neurons_several_layers_and_composition():
    m = MLP(3, (2, 3), leaky_relu(0.2), key=jax.random.PRNGKey(1))
    s1 = split(m, layer=0, neuron=1, coeffs=[0.28, 0.96])
    s2 = split(s1.wide, layer=1, neuron=0, coeffs=[0.0, 0.6, 0.8])
    s3 = split(s2.wide, layer=0, neuron=0, coeffs=[1 / np.sqrt(3)] * 3)
    c = compose(s1, s2, s3)
    assert c.wide.widths == (5, 5)
    assert (s3 @ (s2 @ s1)).wide.widths == (5, 5)
    np.testing.assert_allclose(c.matrix(), s3.matrix() @ s2.matrix() @ s1.matrix(), atol=TOL)
    _assert_identities(c, m, jax.random.normal(jax.random.PRNGKey(2), (6, 3)))
    assert c.properties == {"preserves_outputs": True, "isometric": True, "preserves_gradients": True}
    with pytest.raises(ValueError, match="wide architecture"):
        compose(s1, s3)


def test_map_trajectory_matches_apply_flat():
    m = TwoLayer(2, 1, relu, key=jax.random.PRNGKey(0))
    s = split(m, neuron=0, coeffs=[0.6, 0.8])
    thetas = np.random.default_rng(0).standard_normal((5, 3))
    np.testing.assert_allclose(s.map_trajectory(thetas), thetas @ s.matrix().T, atol=TOL)


def test_zero_coefficient_copy_stays_exactly_zero_under_gd_sgd_and_adam():
    """A zero coefficient gives a copy with zero in- and out-weights: its gradient is sigma(0) = 0 (out-weight) and
    a_r sigma'(0) x = 0 (in-weights), so every first-order method, even coordinate-wise Adam, leaves it at 0."""
    data = gaussian_toy(40, separable=False, seed=1)
    m = MLP(2, (2,), leaky_relu(0.01), key=jax.random.PRNGKey(4))
    s = split(m, layer=0, neuron=1, coeffs=[0.8, 0.0, 0.6])
    wide = s(m)
    for run in (
        gradient_descent(wide, data, loss="exponential", lr=0.01, steps=200, save_every=50),
        sgd(wide, data, loss="exponential", lr=0.05, steps=200, batch_size=8, save_every=50),
        adam(wide, data, loss="exponential", lr=0.05, steps=200, save_every=50),
    ):
        final = run.final
        assert np.all(np.asarray(final.weights[0][2]) == 0.0)
        assert np.all(np.asarray(final.weights[1][:, 2]) == 0.0)
        assert np.all(np.isfinite(run.thetas)) and np.any(np.asarray(final.weights[0][1]) != np.asarray(wide.weights[0][1]))


def test_one_hot_split_adds_a_zero_neuron_for_any_degree():
    """The only split that carries gradients for p != 1: the neuron itself plus zero copies."""
    for act in (relu_power(2), leaky_relu_power(3, 0.2)):
        m = TwoLayer(3, 2, act, key=jax.random.PRNGKey(5))
        s = split(m, neuron=1, coeffs=[0.0, 1.0])
        assert s.properties == {"preserves_outputs": True, "isometric": True, "preserves_gradients": True}
        _assert_identities(s, m, jax.random.normal(jax.random.PRNGKey(6), (5, 3)))


# ---------------------------------------------------------------- degree p != 1


@pytest.mark.parametrize("p", [2, 3])
def test_plain_split_is_refused_for_p_not_1(p):
    m = TwoLayer(3, 2, relu_power(p), key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=rf"degree p = {p}.*cannot preserve|cannot preserve.*degree p = {p}"):
        split(m, neuron=0, coeffs=[0.6, 0.8])
    with pytest.raises(ValueError, match="sum_r beta_r alpha_r\\^p = 1"):
        split(m, neuron=0, coeffs=[0.6, 0.8], out_coeffs=[0.6, 0.8])


def test_plain_split_really_changes_outputs_for_p2():
    """Why it is refused: with (c_r w, c_r a) the copies output sum c_r^3 a sigma(w.x) != a sigma(w.x)."""
    m = TwoLayer(3, 1, relu_power(2), key=jax.random.PRNGKey(0))
    a, W = m.a, m.W
    wide = TwoLayer.from_weights(jnp.concatenate([0.6 * a, 0.8 * a]), jnp.concatenate([0.6 * W, 0.8 * W]), relu_power(2))
    X = jax.random.normal(jax.random.PRNGKey(1), (6, 3))
    np.testing.assert_allclose(predict(wide, X), (0.6**3 + 0.8**3) * predict(m, X), rtol=1e-12)
    assert np.max(np.abs(predict(wide, X) - predict(m, X))) > 1e-3


@pytest.mark.parametrize("p", [2, 3])
def test_output_preserving_split_for_p_not_1_keeps_outputs_but_not_gradients_or_trajectories(p):
    data = gaussian_toy(30, separable=True, seed=2)
    m = TwoLayer(2, 2, leaky_relu_power(p, 0.2), key=jax.random.PRNGKey(8), scale=1.0)
    c = [0.6, 0.8]
    beta = output_preserving_out_coeffs(c, p)
    s = split(m, neuron=0, coeffs=c, out_coeffs=beta)
    assert s.properties == {"preserves_outputs": True, "isometric": False, "preserves_gradients": False}
    X = jnp.asarray(data.X)
    out_n, g_n = _phi_and_grads(m, X)
    out_w, g_w = _phi_and_grads(s(m), X)
    np.testing.assert_allclose(out_w, out_n, atol=TOL)
    T = s.matrix()
    assert np.max(np.abs(T.T @ T - np.eye(T.shape[1]))) > 1e-2
    assert np.max(np.linalg.norm(g_w - np.asarray(g_n) @ T.T, axis=1)) > 1e-3
    kw = dict(loss="exponential", lr=0.01, steps=300, save_every=100)
    a = gradient_descent(m, data, **kw)
    b = gradient_descent(s(m), data, **kw)
    assert np.max(np.linalg.norm(b.thetas - s.map_trajectory(a), axis=1)) > 1e-3
    assert np.max(np.abs(b.log_loss - a.log_loss)) > 1e-6  # not even the losses agree after the first step


@settings(max_examples=10, deadline=None)
@given(
    p=st.sampled_from([1, 2, 3]),
    alpha=st.lists(st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]), min_size=2, max_size=3),
    beta=st.lists(st.sampled_from([0.0, 0.4, 0.6, 1.0, 1.3]), min_size=2, max_size=3),
)
def test_gradient_criterion_of_split_properties_matches_measurement(p, alpha, beta):
    """The analytic criterion (beta_r = alpha_r^p and beta_r alpha_r^(p-1) = alpha_r, or both 0, plus outputs) says
    exactly when the measured gradient identity holds; for p != 1 that forces one-hot coefficients."""
    n = min(len(alpha), len(beta))
    alpha, beta = tuple(alpha[:n]), tuple(beta[:n])
    props = split_properties(alpha, beta, p)
    if p != 1 and props["preserves_gradients"]:
        assert sorted(alpha) == [0.0] * (n - 1) + [1.0] and alpha == beta
    out = sum(b * a**p for a, b in zip(alpha, beta))
    m = TwoLayer(2, 1, leaky_relu_power(p, 0.3), key=jax.random.PRNGKey(0))
    a0, W0 = m.a, m.W
    wide = TwoLayer.from_weights(jnp.concatenate([b * a0 for b in beta]), jnp.concatenate([a * W0 for a in alpha]),
                                 m.activation)
    X = jax.random.normal(jax.random.PRNGKey(1), (4, 2))
    out_n, g_n = _phi_and_grads(m, X)
    out_w, g_w = _phi_and_grads(wide, X)
    # T for (a, W) -> (beta a, alpha W) in the parameter order (a_1..a_m, W_1..W_m)
    T = np.zeros((3 * n, 3))
    for r in range(n):
        T[r, 0] = beta[r]
        T[n + 2 * r, 1] = T[n + 2 * r + 1, 2] = alpha[r]
    grad_ok = np.max(np.abs(np.asarray(g_w) - np.asarray(g_n) @ T.T)) < 1e-10
    out_ok = np.max(np.abs(np.asarray(out_w) - np.asarray(out_n))) < 1e-10
    assert out_ok == (abs(out - 1) < 1e-12)
    assert props["preserves_gradients"] == (grad_ok and out_ok)


# ---------------------------------------------------------------- bad input


def test_bad_coefficients_are_refused_with_clear_errors():
    m = MLP(3, (2,), relu, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="square-sum to 1"):
        split(m, layer=0, neuron=0, coeffs=[0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        split(m, layer=0, neuron=0, coeffs=[-0.6, 0.8])
    with pytest.raises(ValueError, match="finite"):
        split(m, layer=0, neuron=0, coeffs=[np.nan, 1.0])
    with pytest.raises(ValueError, match="non-empty"):
        split(m, layer=0, neuron=0, coeffs=[])
    with pytest.raises(ValueError, match="one coefficient per copy"):
        split(m, layer=0, neuron=0, coeffs=[0.6, 0.8], out_coeffs=[1.0])
    # a looser tolerance accepts rounded coefficients
    s = split(m, layer=0, neuron=0, coeffs=[0.7071, 0.7071], tol=1e-3)
    assert s.wide.widths == (3,)


def test_bad_indices_models_and_architectures_are_refused():
    m = MLP(3, (2, 2), relu, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="`layer` must be an integer in 0..1"):
        split(m, layer=2, neuron=0, coeffs=[1.0])
    with pytest.raises(ValueError, match="`neuron` must be an integer in 0..1"):
        split(m, layer=0, neuron=5, coeffs=[1.0])
    with pytest.raises(ValueError, match="no hidden neuron"):
        split(MLP(3, (), None, key=jax.random.PRNGKey(0)), layer=0, neuron=0, coeffs=[1.0])
    cnn = CNN((1, 4), (2,), relu, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="split_channel"):
        split(cnn, layer=0, neuron=0, coeffs=[1.0])
    with pytest.raises(ValueError, match="must be a homflow CNN"):
        split_channel(m, layer=0, channel=0, coeffs=[1.0])
    with pytest.raises(ValueError, match="`channel` must be an integer in 0..1"):
        split_channel(cnn, layer=0, channel=2, coeffs=[1.0])
    s = split(m, layer=0, neuron=0, coeffs=[0.6, 0.8])
    with pytest.raises(ValueError, match="another architecture"):
        s(MLP(3, (3, 2), relu, key=jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match="wide architecture"):
        s.merge(m)
    with pytest.raises(ValueError, match="shape"):
        s.apply_flat(jnp.zeros(3))
    with pytest.raises(ValueError, match="max_entries"):
        s.matrix(max_entries=10)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-2, 2, allow_nan=False), min_size=1, max_size=4))
def test_check_coeffs_accepts_exactly_the_valid_ones(c):
    c = np.asarray(c)
    valid = np.all(c >= 0) and abs(np.sum(c**2) - 1) <= 1e-12
    if valid:
        assert check_coeffs(c)[0] == tuple(float(x) for x in c)
    else:
        with pytest.raises(ValueError, match="`coeffs`"):
            check_coeffs(c)


def test_split_every_equals_the_composition_of_single_splits():
    for model, one, key in ((MLP(3, (3,), relu, key=jax.random.PRNGKey(0)), split, "neuron"),
                            (CNN((1, 4), (2,), relu, key=jax.random.PRNGKey(1)), split_channel, "channel")):
        c = [0.6, 0.8]
        every = split_every(model, layer=0, coeffs=c)
        singles, cur = [], model
        width = model.widths[0] if isinstance(model, MLP) else model.channels[0]
        for j in range(width):
            singles.append(one(cur, layer=0, coeffs=c, **{key: 2 * j}))
            cur = singles[-1].wide
        np.testing.assert_allclose(every.matrix(), compose(*singles).matrix(), atol=0)
