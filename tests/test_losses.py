"""Losses in log space, margins, and the labels the NCF uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from homflow.activations import relu
from homflow.data import Dataset
from homflow.losses import (exponential, get_loss, log_loss, logistic, loss_value, margins, normalized_margin,
                            smoothed_margin, square)
from homflow.models import MLP, TwoLayer, flatten, rescale


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 3))
    y = np.where(X[:, 0] > 0, 1.0, -1.0)
    return Dataset(X, y)


def test_values_match_the_definitions(data, key):
    m = TwoLayer(3, 4, relu, key=key)
    out = np.asarray(jax.vmap(m)(data.X))
    y = np.asarray(data.y)
    assert float(loss_value(m, data, "square")) == pytest.approx(0.5 * np.sum((out - y) ** 2), rel=1e-12)
    assert float(loss_value(m, data, "logistic")) == pytest.approx(np.sum(np.log1p(np.exp(-y * out))), rel=1e-12)
    assert float(loss_value(m, data, "exponential")) == pytest.approx(np.sum(np.exp(-y * out)), rel=1e-12)
    for name in ("square", "logistic", "exponential"):
        assert float(log_loss(m, data, name)) == pytest.approx(np.log(float(loss_value(m, data, name))), rel=1e-12)


def test_log_loss_is_finite_and_exact_far_below_1e300():
    # one sample, margin q: exponential log L = -q; logistic log L = log(log1p(e^-q)) = -q - e^-q/2 + ...
    for q in (1e2, 1e3, 1e4, 1e6):
        m = MLP.from_weights((jnp.array([[q]]),), None)
        d = Dataset(np.array([[1.0]]), np.array([1.0]))
        assert float(log_loss(m, d, exponential)) == pytest.approx(-q, rel=1e-14)
        assert float(log_loss(m, d, logistic)) == pytest.approx(-q, rel=1e-14)
    # two samples: logsumexp
    m = MLP.from_weights((jnp.array([[1e4]]),), None)
    d = Dataset(np.array([[1.0], [1.001]]), np.array([1.0, 1.0]))
    expected = -1e4 + np.log1p(np.exp(-10.0))
    assert float(log_loss(m, d, exponential)) == pytest.approx(expected, rel=1e-14)


def test_gradient_direction_at_margin_1e4(data, key):
    """At margins ~1e4 the loss underflows but grad log L still gives the (correct) descent direction."""
    m = TwoLayer(3, 4, relu, key=key)
    theta, unflatten = flatten(m)
    q = np.asarray(margins(m, data))
    if q.min() <= 0:  # make all margins positive by flipping labels to the model's own sign
        data = Dataset(data.X, np.sign(np.asarray(jax.vmap(m)(data.X))))
    c = (1e4 / float(jnp.min(margins(m, data)))) ** 0.5  # degree 2: margins scale by c^2
    big = rescale(m, c)
    th_big, _ = flatten(big)
    f = lambda th: log_loss(unflatten(th), data, exponential)  # noqa: E731
    g = jax.grad(f)(th_big)
    assert float(log_loss(big, data, exponential)) < -9e3 and np.all(np.isfinite(g))
    assert float(loss_value(big, data, exponential)) == 0.0  # the loss itself underflows
    # independent direction: the softmax-weighted sum of -y_i grad Phi_i computed sample by sample
    qs = np.asarray(margins(big, data))
    w = np.exp(-(qs - qs.min()))
    grads = np.stack([np.asarray(jax.grad(lambda th: unflatten(th)(x))(th_big)) for x in data.X])
    ref = -(w * np.asarray(data.y)) @ grads / w.sum()
    np.testing.assert_allclose(g, ref, rtol=1e-10, atol=1e-14 * np.abs(ref).max())


def test_margins_and_smoothed_margin_bounds(key):
    X = np.array([[1.0, 0.2], [-1.0, 0.1], [0.8, -0.5]])
    y = np.array([1.0, -1.0, 1.0])
    d = Dataset(X, y)
    m = MLP.from_weights((jnp.array([[3.0, 0.0]]),), None)
    np.testing.assert_allclose(margins(m, d), [3.0, 3.0, 2.4])
    assert float(normalized_margin(m, d)) == pytest.approx(2.4 / 3.0)
    # scale invariance of the normalized margin
    assert float(normalized_margin(rescale(m, 7.0), d)) == pytest.approx(2.4 / 3.0)
    for loss in ("exponential", "logistic"):
        sm = float(smoothed_margin(rescale(m, 50.0), d, loss))
        assert sm <= float(normalized_margin(m, d)) + 1e-12  # lower bound
        assert sm > 0.99 * float(normalized_margin(m, d))  # and tight at large scale
    with pytest.raises(ValueError, match="exponential' or 'logistic"):
        smoothed_margin(m, d, "square")


def test_ncf_labels_and_names():
    y = jnp.array([1.0, -1.0])
    np.testing.assert_allclose(square.ncf_labels(y), y)
    np.testing.assert_allclose(exponential.ncf_labels(y), y)
    np.testing.assert_allclose(logistic.ncf_labels(y), y / 2)
    # ytilde = -dl/dPhi at Phi = 0, checked by autodiff
    for loss in (logistic, exponential):
        g = jax.grad(lambda o: loss.value(o, y))(jnp.zeros(2))
        np.testing.assert_allclose(-g, loss.ncf_labels(y), rtol=1e-12)
    assert get_loss("Exponential") is exponential
    with pytest.raises(ValueError, match="Did you mean 'logistic'"):
        get_loss("logistc")
