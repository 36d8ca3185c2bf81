"""Small-initialisation dynamics (arXiv 2403.08121, 2502.15952): early alignment, escape law, saddles, sparsity."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from homflow.activations import linear, relu_power
from homflow.data import Dataset
from homflow.kkt import group_norms, polish_ncf, zero_preserving_groups
from homflow.models import MLP, TwoLayer, flatten, predict, with_norm
from homflow.phases import (
    early_phase,
    escape_law,
    first_saddle,
    fit_line,
    hessian_extremes,
    integrate,
    make_problem,
    ncf_flow,
    remove_neurons,
    segment_plateaus,
    small_groups,
)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 4))
    return Dataset(X, np.sign(X[:, 0] * X[:, 1] + 0.3))


@pytest.fixture(scope="module")
def relu2(data):
    return TwoLayer(4, 8, relu_power(2), key=jax.random.PRNGKey(1))


def test_fit_line_recovers_slope_and_stderr():
    x = np.arange(6.0)
    slope, se, c = fit_line(x, 2.5 - 1.5 * x)
    assert abs(slope + 1.5) < 1e-12 and abs(c - 2.5) < 1e-12 and se < 1e-12
    rng = np.random.default_rng(1)
    y = 1.0 + 0.5 * x + 0.01 * rng.standard_normal(6)
    slope, se, _ = fit_line(x, y)
    resid = y - np.polyval(np.polyfit(x, y, 1), x)
    assert abs(se - np.sqrt(resid @ resid / 4 / np.sum((x - x.mean()) ** 2))) < 1e-14


@pytest.mark.slow
def test_early_alignment_relu2(relu2, data):
    """L = 3, delta = 1e-6: at ||theta|| = 1e4 delta the direction is aligned (cos > 0.99) with a certified KKT point,
    and t * delta is the same for delta = 1e-4 .. 1e-7 within 1%."""
    nf = ncf_flow(relu2, data, loss="square")
    assert nf.escaped and nf.s_star >= nf.s_level
    eps = {d: early_phase(with_norm(relu2, d), data, loss="square", factor=1e4, ncf=nf) for d in (1e-4, 1e-5, 1e-6, 1e-7)}
    e6 = eps[1e-6]
    point = polish_ncf(relu2.__class__.from_weights(*_split(e6.theta_escape, relu2), relu2.activation), data,
                       loss="square")
    assert point.certified and point.value > 0
    u = np.asarray(point.theta)
    cos = float(e6.theta_escape @ u / np.linalg.norm(e6.theta_escape))
    assert cos > 0.99
    # u* is sparse: some neurons exactly zero (reported); the flow's direction residual is small but not zero.
    assert len(point.vanishing) >= 1
    assert 0 < e6.residual_escape < 1e-2
    # Escape-time scaling t * delta^(L-2): same within 1% (here it agrees to ~2e-4) and equal to the NCF prediction.
    r = np.array([eps[d].rescaled_escape for d in eps])
    assert np.max(np.abs(r / r[-1] - 1)) < 1e-2
    assert abs(e6.t_escape / e6.t_escape_predicted - 1) < 1e-4
    # The norm ratio follows the NCF flow's ||u(delta t)|| (the last point sits on the blow-up, where a relative time
    # error of 1e-8 is amplified: left out).
    assert np.nanmax(np.abs(e6.norm_ratio[:-1] / e6.ncf_norm_ratio[:-1] - 1)) < 1e-4


def _split(theta, model):
    m = model.width
    return np.asarray(theta[:m]), np.asarray(theta[m:]).reshape(m, -1)


@pytest.mark.parametrize("p", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_escape_exponent(data, p):
    """Fitted exponent of t_escape ~ delta^-(L-2) within 0.1 of L - 2 (L = 3, 4)."""
    model = TwoLayer(4, 8, relu_power(p), key=jax.random.PRNGKey(1))
    law = escape_law(model, data, loss="square", deltas=np.geomspace(1e-6, 1e-3, 5))
    assert law.law == "power" and law.predicted == p - 1
    assert abs(law.exponent - (p - 1)) < 0.1
    assert law.exponent_stderr < 0.05


@pytest.mark.slow
def test_escape_log_law_linear_two_layer(data):
    """L = 2 (two-layer linear net): t_escape = c + log(1/delta) / lambda, lambda = 2 N(u*) = top singular value."""
    model = TwoLayer(4, 3, linear, key=jax.random.PRNGKey(2))
    law = escape_law(model, data, loss="square", deltas=np.geomspace(1e-6, 1e-3, 5), level=0.1)
    assert law.law == "log"
    assert law.deviation < 1e-2
    # Independent check: N(a, W) = a^T W X^T y has maximum ||X^T y|| / 2 on the unit sphere, lambda = ||X^T y||.
    lam = float(np.linalg.norm(np.asarray(data.X).T @ np.asarray(data.y)))
    assert abs(law.exponent * lam - 1) < 1e-2


def test_planted_zero_neuron_stays_exactly_zero(relu2, data):
    m = with_norm(relu2, 1e-3)
    m = TwoLayer.from_weights(m.a.at[2].set(0.0), m.W.at[2].set(0.0), m.activation)
    problem, theta = make_problem(m, data, "square")
    g = zero_preserving_groups(m)[2]
    sol = integrate(problem, theta, t1=500.0, level=1e6, ts=np.linspace(0, 500.0, 50))
    assert sol.thetas.shape[0] == 50
    assert np.all(sol.thetas[:, g] == 0.0)
    assert float(np.linalg.norm(sol.thetas[-1])) > 0.1  # it escaped meanwhile
    assert list(small_groups(sol.thetas[-1], zero_preserving_groups(m), rtol=0.0)) == [2]


@pytest.mark.slow
def test_first_saddle_and_sparsity(relu2, data):
    """Escape to the first saddle: polished gradient < 1e-6 relative, a negative Hessian eigenvalue; the neurons zero at
    u* stay below 10 delta until the saddle, which is a critical point of the network without them."""
    delta = 1e-4
    fs = first_saddle(with_norm(relu2, delta), data, loss="square", t_after=800.0)
    assert fs.u_star_certified and fs.sparse_groups.size >= 1
    assert fs.rel_grad_norm < 1e-6
    assert fs.lam_min < 0 and fs.kind == "saddle"
    assert fs.loss < 0.99 * float(0.5 * np.sum(np.asarray(data.y) ** 2))
    assert fs.sparse_max_before_saddle < 10 * delta
    assert fs.reduced_rel_grad_norm < 1e-6


def test_hessian_lanczos_matches_dense(data):
    model = TwoLayer(4, 16, relu_power(2), key=jax.random.PRNGKey(3))  # P = 80 > DENSE_MAX: Lanczos path
    problem, theta = make_problem(model, data, "square")
    lo, hi = hessian_extremes(problem, theta, tol=1e-12)
    H = jax.jit(jax.hessian(lambda th: problem.value(th)))(theta)
    e = np.linalg.eigvalsh(np.asarray(H))
    assert abs(lo - e[0]) < 1e-8 * abs(e).max() and abs(hi - e[-1]) < 1e-8 * abs(e).max()


def test_segment_plateaus_on_synthetic_staircase():
    ts = np.geomspace(1, 1e4, 400)
    loss = 10 - 3 * (np.tanh(20 * (np.log(ts) - np.log(30))) + 1) - 2 * (np.tanh(20 * (np.log(ts) - np.log(1e3))) + 1)
    runs = segment_plateaus(ts, loss, slope_tol=1e-3)
    levels = [round(float(loss[(a + b) // 2]), 3) for a, b in runs]
    assert levels == [10.0, 4.0, 0.0] or levels[:2] == [10.0, 4.0]


def test_remove_neurons_preserves_outputs_and_critical_points(data):
    model = MLP(4, (5, 3), relu_power(2), key=jax.random.PRNGKey(4))
    W1, W2, W3 = model.weights
    W1, W2 = W1.at[1].set(0.0), W2.at[:, 1].set(0.0)
    model = MLP.from_weights((W1, W2, W3), model.activation)
    groups = zero_preserving_groups(model)
    assert 1 in small_groups(model, rtol=0.0)
    small = remove_neurons(model, [1])
    assert small.widths == (4, 3)
    assert np.allclose(predict(small, data.X), predict(model, data.X), rtol=1e-14, atol=1e-14)
    # The gradient of the smaller network is the restriction of the larger one's.
    pb, tb = make_problem(model, data, "square")
    ps, tsm = make_problem(small, data, "square")
    grad = eqx.filter_jit(lambda p, t: p.grad(t))
    gb = np.asarray(grad(pb, tb))
    keep = np.setdiff1d(np.arange(tb.size), groups[1])
    assert np.allclose(np.sort(np.abs(gb[keep])), np.sort(np.abs(np.asarray(grad(ps, tsm)))), atol=1e-13)
    assert np.all(gb[groups[1]] == 0.0)
    assert np.allclose(group_norms(np.asarray(flatten(model)[0]), groups)[1], 0.0)


def test_bad_inputs(relu2, data):
    with pytest.raises(ValueError, match="deltas"):
        escape_law(relu2, data, deltas=[1e-3, -1.0, 1e-4])
    with pytest.raises(ValueError, match="factor"):
        early_phase(with_norm(relu2, 1e-3), data, factor=0.5)
    with pytest.raises(ValueError, match="field"):
        integrate(make_problem(relu2, data)[0], jnp.ones(40), field="nope", t1=1.0, level=2.0)
    with pytest.raises(ValueError, match="u_star"):
        early_phase(with_norm(relu2, 1e-3), data, u_star=np.ones(3))


def _numpy_ncf_grad(Ws, X, y, p, alpha=0.0):
    """Independent backprop (numpy) of N = sum_i y_i Phi(x_i) for an MLP with activation max(z, alpha z)^p."""
    grads = [np.zeros_like(W) for W in Ws]
    for x, yi in zip(X, y):
        hs, zs = [x], []
        for W in Ws[:-1]:
            z = W @ hs[-1]
            zs.append(z)
            hs.append(np.where(z > 0, z, alpha * z) ** p)
        delta = yi * np.ones(1)
        grads[-1] += np.outer(delta, hs[-1])
        for k in range(len(Ws) - 2, -1, -1):
            z = zs[k]
            dsig = p * np.where(z > 0, z, alpha * z) ** (p - 1) * np.where(z > 0, 1.0, alpha)
            delta = (Ws[k + 1].T @ delta) * dsig
            grads[k] += np.outer(delta, hs[k])
    return grads


def _relative_tangent_residual(Ws, grads):
    u = np.concatenate([W.ravel() for W in Ws])
    g = np.concatenate([G.ravel() for G in grads])
    u = u / np.linalg.norm(u)
    return float(np.linalg.norm(g - (u @ g) * u) / np.linalg.norm(g))


@pytest.mark.slow
def test_rank_one_census_known_point():
    """Depth-3 ReLU net, data x = (z, 1) with all labels +1: every pre-activation is positive at the width-one point
    w1 = c / (sqrt 3 |c|), w2 = w3 = 1 / sqrt 3 (c = sum_i x_i), a KKT point; its split with non-negative u1, u2 is a
    rank-one KKT point of the wide net. The census finds it from nearby starts, rebuilds the width-one net and splits
    it back; residuals are recomputed by an independent numpy backprop."""
    from homflow.activations import relu
    from homflow.kkt import solve_ncf
    from homflow.phases import rank_one_census

    rng = np.random.default_rng(3)
    X = np.concatenate([0.3 * rng.standard_normal((12, 2)), np.ones((12, 1))], axis=1)
    y = np.ones(12)
    data = Dataset(X, y)
    c = X.sum(axis=0)
    c_hat = c / np.linalg.norm(c)
    u1, u2 = np.array([0.6, 0.0, 0.8]), np.array([1.0, 1.0]) / np.sqrt(2)
    Ws = [np.outer(u1, c_hat) / np.sqrt(3), np.outer(u2, u1) / np.sqrt(3), u2[None, :] / np.sqrt(3)]
    assert _relative_tangent_residual(Ws, _numpy_ncf_grad(Ws, X, y, 1)) < 1e-14  # the planted point is KKT
    model = MLP.from_weights(tuple(jnp.asarray(W) for W in Ws), relu)
    theta = np.concatenate([W.ravel() for W in Ws])
    inits = theta[None, :] + 1e-3 * rng.standard_normal((2, theta.size))
    sol = solve_ncf(model, data, loss="square", key=jax.random.PRNGKey(0), inits=inits, steps=50)
    census = rank_one_census(model, data, loss="square", solution=sol)
    assert len(census.entries) >= 1 and census.rank_one_fraction == 1.0 and census.nonneg.all()
    e = census.entries[0]
    assert abs(e.point.value - np.linalg.norm(c) / 3**1.5) < 1e-12
    assert e.split_kind == "isometric" and e.certified_width_one
    assert min(e.support) >= 2  # a non-trivial split in both hidden layers (p = 1: splits form a flat family)
    assert e.split_error < 1e-12 and e.output_error < 1e-12
    # Independent residuals (numpy backprop) of the certified wide point and of the width-one network.
    wide = [np.asarray(W) for W in e.point.model.weights]
    assert _relative_tangent_residual(wide, _numpy_ncf_grad(wide, X, y, 1)) < 1e-12
    one = [np.asarray(W) for W in e.width_one.weights]
    assert _relative_tangent_residual(one, _numpy_ncf_grad(one, X, y, 1)) < 1e-12
    assert abs(e.width_one_residual - _relative_tangent_residual(one, _numpy_ncf_grad(one, X, y, 1))) < 1e-12
    # The width-one network is the analytic KKT point (w1, w2, w3) = (c_hat, 1, 1) / sqrt 3.
    assert np.allclose(one[0].ravel(), c_hat / np.sqrt(3), atol=1e-12)
    assert np.allclose([one[1].item(), one[2].item()], [1 / np.sqrt(3)] * 2, atol=1e-12)


def test_split_back_relu2_equal_coefficients_is_output_preserving():
    """ReLU^2: a rank-one net with hidden vector constant on its support is the output-preserving split (c^(2-p)) of
    its width-one net (the classical split is refused for p != 1); a one-hot hidden vector gives an isometric split."""
    from homflow.phases import rank_one_factors, split_back, width_one_network

    rng = np.random.default_rng(4)
    v1 = rng.standard_normal(4)
    v1 /= np.linalg.norm(v1)
    for u1, kind in ((np.array([1.0, 1.0, 0.0]) / np.sqrt(2), "output-preserving"), (np.eye(3)[1], "isometric")):
        v2 = u1**2 / np.linalg.norm(u1**2)
        model = MLP.from_weights((jnp.asarray(0.7 * np.outer(u1, v1)), jnp.asarray(-0.5 * v2[None, :])), relu_power(2))
        one = width_one_network(model)
        s, u, v = rank_one_factors(model)
        T, got = split_back(one, u[:-1], p=2)
        assert got == kind
        assert np.max(np.abs(np.asarray(flatten(T(one))[0]) - np.asarray(flatten(model)[0]))) < 1e-14
        X = rng.standard_normal((5, 4))
        assert np.allclose(predict(one, X), predict(model, X), rtol=1e-13, atol=1e-14)
