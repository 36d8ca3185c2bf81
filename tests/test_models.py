"""Homogeneity, Euler identity, exact degree, finite-difference gradients and bad input for every model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catalogue import ACTIVATIONS, KINDS, build, expected_degree
from homflow.activations import Activation, get_activation, leaky_relu_power, relu_power
from homflow.models import MLP, TwoLayer, flatten, param_norm, predict, rescale, with_norm

CASES = [(k, a) for k, a in itertools.product(KINDS, ACTIVATIONS) if not (k in ("linear", "diag") and a != "relu")]


@pytest.mark.parametrize("kind,act", CASES)
def test_degree_homogeneity_and_euler(kind, act):
    key = jax.random.PRNGKey(hash((kind, act)) % 2**31)
    model = build(kind, ACTIVATIONS[act], key)
    X = jax.random.normal(jax.random.fold_in(key, 1), (7, model.d_in))
    L = model.degree
    assert L == expected_degree(kind, ACTIVATIONS[act].degree)
    theta, unflatten = flatten(model)
    out = predict(model, X)
    for c in (0.3, 1.7, 4.0):
        # Phi(c theta) = c^L Phi(theta), and the degree measured from the ratio is the computed one
        out_c = predict(rescale(model, c), X)
        np.testing.assert_allclose(out_c, c**L * out, rtol=1e-12, atol=1e-14 * c**L)
        big = jnp.abs(out) > 1e-8
        measured = jnp.log(jnp.abs(out_c[big] / out[big])) / jnp.log(c)
        np.testing.assert_allclose(measured, L, atol=1e-9)
    # Euler: <theta, grad Phi> = L Phi, and grad Phi(c theta) = c^(L-1) grad Phi(theta)
    for x in X[:3]:
        g = jax.grad(lambda th: unflatten(th)(x))(theta)
        np.testing.assert_allclose(jnp.dot(theta, g), L * unflatten(theta)(x), rtol=1e-10, atol=1e-13)
        g2 = jax.grad(lambda th: unflatten(th)(x))(2.0 * theta)
        np.testing.assert_allclose(g2, 2.0 ** (L - 1) * g, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["two_layer", "mlp3", "cnn1d", "diag"])
def test_gradient_matches_finite_differences(kind):
    key = jax.random.PRNGKey(3)
    model = build(kind, relu_power(2), key)
    X = jax.random.normal(jax.random.PRNGKey(4), (5, model.d_in))
    theta, unflatten = flatten(model)
    f = lambda th: jnp.sum(jnp.sin(predict(unflatten(th), X)))  # noqa: E731
    g = jax.grad(f)(theta)
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = rng.standard_normal(theta.shape)
        h = 1e-6
        fd = (f(theta + h * v) - f(theta - h * v)) / (2 * h)
        np.testing.assert_allclose(jnp.dot(g, v), fd, rtol=1e-6, atol=1e-8)


def test_explicit_formulas():
    a = jnp.array([1.0, -2.0])
    W = jnp.array([[1.0, 0.0], [0.5, -1.0]])
    m = TwoLayer.from_weights(a, W, relu_power(2))
    x = jnp.array([2.0, 1.0])
    expected = 1.0 * 2.0**2 + (-2.0) * max(0.5 * 2 - 1.0, 0.0) ** 2
    assert float(m(x)) == pytest.approx(expected)
    theta, _ = flatten(m)
    np.testing.assert_array_equal(theta, jnp.concatenate([a, W.ravel()]))  # (a, W.ravel()) order
    mlp = MLP.from_weights((W, a[None, :]), relu_power(2))
    assert float(mlp(x)) == pytest.approx(expected)


def test_leaky_power_sign_convention():
    z = jnp.array([-2.0])
    assert float(leaky_relu_power(2, 0.5)(z)[0]) == pytest.approx(1.0)  # (0.5 * -2)^2 = +1: even p is positive
    assert float(leaky_relu_power(3, 0.5)(z)[0]) == pytest.approx(-1.0)  # odd p keeps the sign
    # subgradient convention at the kink: autodiff gives alpha
    assert float(jax.grad(lambda t: Activation(1, 0.3)(t))(0.0)) == pytest.approx(0.3)


def test_initial_scale_one_call(key):
    m = TwoLayer(4, 6, "relu", key=key, scale=1e-6)
    assert float(param_norm(m)) == pytest.approx(1e-6, rel=1e-12)
    m2 = with_norm(MLP(4, (3,), "relu", key=key), 2.5)
    assert float(param_norm(m2)) == pytest.approx(2.5, rel=1e-12)


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda k: get_activation("tanh"), "positively homogeneous"),
        (lambda k: get_activation(jnp.tanh), "not known to be positively homogeneous"),
        (lambda k: relu_power(1.5), "integer"),
        (lambda k: relu_power(0), "integer >= 1"),
        (lambda k: TwoLayer(0, 3, "relu", key=k), "d_in"),
        (lambda k: MLP(3, (2, -1), "relu", key=k), "widths"),
        (lambda k: TwoLayer(3, 2, "relu", key=k, scale=-1.0), "scale"),
        (lambda k: TwoLayer(3, 2, "relu", key=k, scale=float("nan")), "scale"),
        (lambda k: predict(TwoLayer(3, 2, "relu", key=k), jnp.ones((4, 2))), "shape"),
        (lambda k: MLP.from_weights((jnp.ones((2, 3)), jnp.ones((1, 4))), "relu"), "chain"),
    ],
)
def test_bad_input_is_refused_with_a_named_argument(bad, match, key):
    with pytest.raises(ValueError, match=match):
        bad(key)


def test_did_you_mean_for_activation_names():
    with pytest.raises(ValueError, match="Did you mean 'relu'"):
        get_activation("reLu_")
