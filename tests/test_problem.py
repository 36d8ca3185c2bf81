"""The one problem object: loss, gradient, velocity in log space, margins, HVPs and the NCF against independent
computations (finite differences, the losses module, Euler's identity), and one compilation per architecture."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from homflow.activations import relu_power
from homflow.data import Dataset
from homflow.flow import Problem, make_problem
from homflow.losses import log_loss, loss_value, margins
from homflow.models import MLP, TwoLayer, flatten, rescale


def _data(seed=0, n=12, d=3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    return Dataset(X, np.sign(X @ rng.standard_normal(d) + 0.1))


MODELS = [
    lambda key: TwoLayer(3, 4, relu_power(2), key=key, scale=0.7),
    lambda key: MLP(3, (4, 3), relu_power(2), key=key, scale=0.7),
]


@pytest.mark.parametrize("loss", ["square", "logistic", "exponential"])
@pytest.mark.parametrize("build", MODELS)
def test_loss_gradient_and_velocity_agree_with_independent_computations(loss, build):
    data = _data(1)
    model = build(jax.random.PRNGKey(2))
    problem, theta = make_problem(model, data, loss)
    assert problem.degree == model.degree
    np.testing.assert_allclose(problem.value(theta), loss_value(model, data, loss), rtol=1e-12)
    np.testing.assert_allclose(problem.log_loss(theta), log_loss(model, data, loss), rtol=1e-12)
    np.testing.assert_allclose(problem.margins(theta), margins(model, data), rtol=1e-12)
    # gradient against central finite differences along a random direction
    v = jax.random.normal(jax.random.PRNGKey(3), theta.shape)
    h = 1e-6
    fd = (problem.value(theta + h * v) - problem.value(theta - h * v)) / (2 * h)
    g = problem.grad(theta)
    scale = float(abs(problem.value(theta)) + jnp.linalg.norm(g) * jnp.linalg.norm(v))  # rounding eps / h of this
    np.testing.assert_allclose(jnp.dot(g, v), fd, atol=1e-7 * scale)
    # velocity = -grad, and in log time -exp(u) grad
    np.testing.assert_allclose(problem.velocity(theta), -problem.grad(theta), rtol=1e-12)
    np.testing.assert_allclose(problem.velocity(theta, log_scale=2.0), -np.exp(2.0) * problem.grad(theta), rtol=1e-12)
    # HVP against finite differences of the gradient
    fd_h = (problem.grad(theta + h * v) - problem.grad(theta - h * v)) / (2 * h)
    np.testing.assert_allclose(problem.hvp(theta, v), fd_h, rtol=1e-6, atol=1e-8 * float(jnp.linalg.norm(fd_h)))
    # margin Jacobian rows against forward mode
    np.testing.assert_allclose(problem.margin_jacobian(theta), jax.jacfwd(problem.margins)(theta), rtol=1e-12)


def test_velocity_stays_finite_where_the_loss_underflows():
    model = TwoLayer(3, 4, relu_power(2), key=jax.random.PRNGKey(0), scale=0.5)
    X = _data(2, n=40).X
    out = np.asarray(jax.vmap(model)(jnp.asarray(X)))
    data = Dataset(X[out != 0], np.sign(out[out != 0]))  # labels the model's own: every margin > 0
    problem, theta = make_problem(model, data, "exponential")
    big = 1e3 * theta / jnp.linalg.norm(theta)  # margins ~1e6: L = exp(-1e6) underflows
    lv, g = problem.log_grad(big)
    assert np.isfinite(lv) and lv < -700 and np.all(np.isfinite(g))
    vel = problem.velocity(big, log_scale=-lv)  # exp(-lv) overflows alone; the product is exp(0) grad log L
    np.testing.assert_allclose(vel, -g, rtol=1e-12)


@pytest.mark.parametrize("loss,scale", [("square", 1.0), ("exponential", 1.0), ("logistic", 0.5)])
def test_ncf_value_gradient_and_euler_identity(loss, scale):
    data = _data(3)
    model = MLP(3, (4, 3), relu_power(2), key=jax.random.PRNGKey(5), scale=0.7)
    problem, theta = make_problem(model, data, loss)
    out = jax.vmap(model)(jnp.asarray(data.X))
    # N = sum_i ytilde_i Phi(x_i), ytilde = -dl/dPhi(0, y): check ytilde by differentiating the loss at Phi = 0
    ytilde = -jax.grad(lambda o: problem.loss.value(o, problem.y))(jnp.zeros_like(problem.y))
    np.testing.assert_allclose(ytilde, scale * problem.y, rtol=1e-12)
    np.testing.assert_allclose(problem.ncf(theta), jnp.dot(ytilde, out), rtol=1e-12)
    # homogeneity of order L and Euler's identity <u, grad N(u)> = L N(u)
    L = problem.degree
    np.testing.assert_allclose(problem.ncf(2.0 * theta), 2.0**L * problem.ncf(theta), rtol=1e-12)
    np.testing.assert_allclose(jnp.dot(theta, problem.ncf_grad(theta)), L * problem.ncf(theta), rtol=1e-12)
    res, lam, val = problem.ncf_residual(theta)
    np.testing.assert_allclose(lam, L * val, rtol=1e-12)
    assert res > 0
    v = jax.random.normal(jax.random.PRNGKey(6), theta.shape)
    np.testing.assert_allclose(problem.ncf_hessian(theta) @ v, problem.ncf_hvp(theta, v), rtol=1e-10, atol=1e-12)


def test_the_gradient_flow_starts_along_the_ncf_gradient_at_small_scale():
    """grad L(delta u) = -delta^(L-1) grad N(u) + O(delta^(2L-1)) (docs/math.md section 3): the NCF is the small-scale
    limit of the loss, an independent check that ``ncf`` uses the right labels."""
    data = _data(4)
    model = TwoLayer(3, 4, relu_power(2), key=jax.random.PRNGKey(7), scale=1.0)
    for loss in ("square", "logistic", "exponential"):
        problem, theta = make_problem(model, data, loss)
        u = theta / jnp.linalg.norm(theta)
        delta = 1e-4
        lhs = problem.velocity(delta * u) / delta ** (problem.degree - 1)
        np.testing.assert_allclose(lhs, problem.ncf_grad(u), rtol=1e-6, atol=1e-9)


def test_one_compilation_per_architecture():
    data = _data(5)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def f(problem: Problem, theta):
        return problem.value(theta), problem.ncf(theta)

    for seed in range(3):  # new weights, new Problem objects, new data values of the same shape: no retrace
        model = TwoLayer(3, 4, relu_power(2), key=jax.random.PRNGKey(seed), scale=0.5)
        problem, theta = make_problem(model, _data(seed + 10), "square")
        f(problem, theta)
    p2, th2 = make_problem(rescale(model, 2.0), data, "square")
    f(p2, th2)
    assert make_problem(model, data, "square")[0].unflatten == p2.unflatten
    assert hash(make_problem(model, data, "square")[0].unflatten) == hash(p2.unflatten)


def test_bad_input_is_named():
    model = TwoLayer(3, 4, relu_power(2), key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError):
        make_problem(model, _data(0, d=4), "square")
    with pytest.raises(ValueError):
        make_problem(model, Dataset(np.ones((3, 3)), np.array([0.0, 1.0, 2.0])), "exponential")
    with pytest.raises(ValueError, match="`X` must be"):
        Problem(jnp.ones((3, 3)), jnp.ones(4), make_problem(model, _data(0), "square")[0].loss,
                flatten(model)[1], model.degree)
