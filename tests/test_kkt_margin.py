"""Max-margin KKT points: known answers (SVM, min-l1 LP), honest residuals, multipliers, late phase (docs/math.md section 5)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog, minimize

from homflow import kkt
from homflow.activations import leaky_relu, relu_power
from homflow.data import Dataset, gaussian_toy, teacher_student
from homflow.flow import gradient_flow
from homflow.models import MLP, DiagonalLinear, TwoLayer, flatten, rescale


def independent_check(res, data, *, tol):
    """Recompute q_i and grad q_i with forward-mode autodiff on the returned model and check every KKT condition."""
    theta, unflatten = flatten(res.model)
    X, y = jnp.asarray(data.X), jnp.asarray(data.y)

    def q(t):
        return y * jnp.stack([unflatten(t)(x) for x in X])

    qv, G = np.asarray(q(theta)), np.asarray(jax.jacfwd(q)(theta))
    lam = res.multipliers
    th = np.asarray(theta)
    assert np.all(lam >= 0)
    assert qv.min() >= 1 - 1e-10  # feasible
    assert np.linalg.norm(th - G.T @ lam) <= tol * np.linalg.norm(th)  # stationary
    assert abs(lam @ (qv - 1)) <= tol * max(1.0, lam.sum())  # complementary slackness
    assert np.isclose(th @ th, res.model.degree * lam.sum(), rtol=1e-7)  # ||theta||^2 = L sum lambda


@pytest.fixture(scope="module")
def linear_data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 3))
    return Dataset(X, np.sign(X @ np.array([1.0, -2.0, 0.5])))


def test_linear_model_is_the_hard_margin_svm(linear_data):
    X, y = np.asarray(linear_data.X), np.asarray(linear_data.y)
    m = MLP.from_weights((jnp.asarray([[1.0, -2.0, 0.5]]),), None)
    res = kkt.solve_max_margin(m, linear_data)
    assert res.converged and res.stationarity < 1e-8, res.message
    svm = minimize(lambda w: (0.5 * w @ w, w), np.ones(3), jac=True, method="SLSQP",
                   constraints=[{"type": "ineq", "fun": lambda w: y * (X @ w) - 1, "jac": lambda w: y[:, None] * X}],
                   options={"ftol": 1e-15, "maxiter": 1000})
    np.testing.assert_allclose(res.theta, svm.x, rtol=1e-7, atol=1e-8)
    assert np.isclose(res.normalized_margin, 1 / np.linalg.norm(svm.x), rtol=1e-9)
    independent_check(res, linear_data, tol=1e-8)
    # Any other direction with positive margin is not a KKT point: the linear problem is convex.
    other = kkt.max_margin_kkt(MLP.from_weights((jnp.asarray([[1.0, -2.0, 0.5]]),), None), linear_data)
    assert other.stationarity > 1e-2


def test_diagonal_linear_depth2_is_min_l1_predictor():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((15, 6))
    y = np.sign(X @ np.array([1.0, 0, 0, -1, 0, 0]))
    data = Dataset(X, y)
    A = -(y[:, None] * np.hstack([X, -X]))
    lp = linprog(np.ones(12), A_ub=A, b_ub=-np.ones(15), bounds=[(0, None)] * 12, method="highs")
    beta = lp.x[:6] - lp.x[6:]
    base = DiagonalLinear(6, 2, key=jax.random.PRNGKey(0))
    # (a) the LP solution, written as u = sqrt(beta+), v = sqrt(beta-), is a certified KKT point
    at_lp = eqx.tree_at(lambda m: (m.u, m.v), base, (jnp.sqrt(np.maximum(beta, 0)), jnp.sqrt(np.maximum(-beta, 0))))
    r_lp = kkt.max_margin_kkt(at_lp, data, active_tol=1e-8)
    assert r_lp.stationarity < 1e-9 and r_lp.delta < 1e-9
    # (b) polishing a rough start reaches it: ||theta||^2 = ||beta||_1 = LP optimum
    start = eqx.tree_at(lambda m: (m.u, m.v), base, (jnp.sqrt(np.maximum(beta, 0)) + 0.3, jnp.sqrt(np.maximum(-beta, 0)) + 0.3))
    res = kkt.solve_max_margin(start, data)
    assert res.converged, res.message
    np.testing.assert_allclose(np.asarray(res.model.beta()), beta, atol=1e-8)
    assert np.isclose(1 / res.normalized_margin, lp.fun, rtol=1e-9)
    independent_check(res, data, tol=1e-8)


@pytest.mark.slow
def test_two_layer_from_a_flow_certified_and_residuals_honest():
    data = gaussian_toy(16, seed=1)
    m = TwoLayer(2, 3, leaky_relu(0.1), key=jax.random.PRNGKey(1), scale=0.5)
    tr = gradient_flow(m, data, loss="exponential", t1=1e4, time="log", n_save=10)
    res = kkt.solve_max_margin(tr.final, data)
    assert res.converged, res.message
    independent_check(res, data, tol=1e-8)
    assert res.normalized_margin >= kkt.max_margin_kkt(tr.final, data).normalized_margin - 1e-12
    # honest: a random network with positive margin is far from KKT, the certified one is not, perturbation ~ eps
    rng = np.random.default_rng(2)
    v = rng.standard_normal(res.theta.size)
    v /= np.linalg.norm(v)
    un = flatten(res.model)[1]
    st = [kkt.max_margin_kkt(un(jnp.asarray(res.theta + e * v)), data, active_tol=1e-3).eps for e in (1e-4, 1e-6)]
    assert 30 < st[0] / st[1] < 300
    assert res.eps < 1e-3 * st[1]


@pytest.mark.slow
def test_multipliers_survive_neuron_splitting():
    """Split neuron 0 of a leaky-ReLU KKT point into (c1, c2): same outputs, same multipliers (2505.12419)."""
    data = gaussian_toy(16, seed=2)
    m = TwoLayer(2, 2, leaky_relu(0.1), key=jax.random.PRNGKey(3), scale=0.5)
    tr = gradient_flow(m, data, loss="exponential", t1=1e3, time="log", n_save=5)
    res = kkt.solve_max_margin(tr.final, data)
    assert res.converged
    a, W = np.asarray(res.model.a), np.asarray(res.model.W)
    c = np.array([0.6, 0.8])
    wide = TwoLayer.from_weights(jnp.asarray(np.r_[c * a[0], a[1:]]), jnp.asarray(np.vstack([c[:, None] * W[0], W[1:]])),
                                 leaky_relu(0.1))
    split = kkt.max_margin_kkt(wide, data, active_tol=res.active_tol)
    assert split.stationarity < 1e-8
    np.testing.assert_allclose(split.multipliers, res.multipliers, rtol=1e-6, atol=1e-9)


def test_rescaling_and_errors(linear_data):
    m = MLP.from_weights((jnp.asarray([[1.0, -2.0, 0.5]]),), None)
    r1, r2 = kkt.max_margin_kkt(m, linear_data), kkt.max_margin_kkt(rescale(m, 9.0), linear_data)
    np.testing.assert_allclose(r1.theta, r2.theta, rtol=1e-12)
    assert np.isclose(min(r1.margins), 1.0)
    with pytest.raises(ValueError, match="margin"):
        kkt.max_margin_kkt(rescale(m, -1.0), linear_data)
    with pytest.raises(ValueError, match="labels"):
        kkt.max_margin_kkt(m, Dataset(np.asarray(linear_data.X), 3 * np.asarray(linear_data.y)))
    with pytest.raises(ValueError, match="active_tol"):
        kkt.max_margin_kkt(m, linear_data, active_tol=-1.0)


@pytest.mark.slow
def test_margin_along_late_phase():
    data = gaussian_toy(16, seed=1)
    m = TwoLayer(2, 3, leaky_relu(0.1), key=jax.random.PRNGKey(1), scale=0.5)
    tr = gradient_flow(m, data, loss="exponential", t1=1e8, time="log", n_save=25)
    path = kkt.margin_along(tr, data, loss="exponential", active_tol=0.2)
    v = path.valid
    assert v.sum() >= 10 and not v[0]
    sm = path.smoothed[v]
    assert np.all(np.diff(sm) >= -1e-9)  # Lyu & Li Thm 4.1
    assert np.all(sm <= path.normalized[v] + 1e-12)
    assert path.stationarity[v][-1] < 0.5 * path.stationarity[v][0]
    assert np.all(np.asarray(path.feasibility[v]) < 1e-12)
    assert set(path.arrays()) >= {"ts", "smoothed", "eps", "delta"}
    with pytest.raises(ValueError, match="loss"):
        kkt.margin_along(tr, data, loss="square")


# The direction of the demo's late phase at t = 1e8 (exponential loss, ReLU^2, width 5; neurons 1 and 4 have faded to
# ~1e-4): its normalized margin 0.00707 still creeps up like 1/log t and no KKT point lies near it.
LATE_THETA = np.array([
    3.6229775480625293e+00, -7.1056549993972720e-05, 3.5191391238095591e+00, 6.8344650803794220e+00,
    -7.2882107336601695e-05, -4.8766197987101600e+00, 9.2870664869405239e-01, 1.2680756823738322e+00,
    3.7113463048826654e-05, 4.5039004731966704e-05, 1.1079821844490694e-04, 9.1199054990013884e-01,
    2.4100690544673825e-01, -4.8866010155548132e+00, 7.8026697686061377e+00, -3.0176041713419410e+00,
    4.8406854003835669e+00, -9.8270833984208969e-05, 8.1233244555243257e-05, 6.7666278403330133e-05])


@pytest.fixture(scope="module")
def late_case():
    data = teacher_student(20, 3, teacher_width=2, p=2, seed=1, labels="sign")
    start = TwoLayer.from_weights(jnp.asarray(LATE_THETA[:5]), jnp.asarray(LATE_THETA[5:].reshape(5, 3)), relu_power(2))
    return data, start, kkt.solve_max_margin(start, data)


def _unit(t):
    t = np.asarray(t, dtype=np.float64)
    return t / np.linalg.norm(t)


def test_local_polish_never_leaves_a_zero_margin(late_case):
    """Regression: presolve='none' used to take full Newton steps that switched every ReLU^2 unit off (q_min = 0) and
    then raised. Now it keeps every margin positive and says honestly that the local polish did not converge."""
    data, start, _ = late_case
    res = kkt.solve_max_margin(start, data, presolve="none")
    assert np.min(res.margins) > 0 and np.isclose(np.min(res.margins), 1.0)
    assert not res.converged and "did not converge" in res.message
    assert np.isclose(res.distance, np.linalg.norm(_unit(res.theta) - _unit(LATE_THETA)), rtol=1e-12)
    # what it reports is an honest residual: recomputed independently it is as large as stated
    qv = np.asarray(data.y) * np.asarray(jax.vmap(res.model)(jnp.asarray(data.X)))
    assert np.allclose(qv, res.margins, rtol=1e-10) and res.stationarity > 1e-3


def test_default_polish_reports_the_route_and_the_distance(late_case):
    """No KKT point near the late direction: 'auto' falls back to SLSQP, certifies a KKT point (independently) and
    reports how far it went and the start's normalized margin."""
    data, start, res = late_case
    assert res.converged, res.message
    independent_check(res, data, tol=1e-8)
    assert "SLSQP" in res.message and "local polish did not converge" in res.message
    assert np.isclose(res.start_normalized_margin, kkt.max_margin_kkt(start, data).normalized_margin, rtol=1e-12)
    assert np.isclose(res.distance, np.linalg.norm(_unit(res.theta) - _unit(LATE_THETA)), rtol=1e-12)
    assert res.distance > 0.1 and res.normalized_margin > res.start_normalized_margin


def test_default_polish_stays_near_a_start_close_to_a_kkt_point(late_case):
    """From a small perturbation of a certified KKT point the default polish is local: it returns that point (the
    distance is of the order of the perturbation), not another one."""
    data, _, K = late_case
    rng = np.random.default_rng(0)
    v = rng.standard_normal(K.theta.size)
    live = np.abs(K.theta) > 0  # keep faded neurons exactly zero (a dead ReLU^2 unit is a KKT point of its own)
    th = K.theta + 1e-3 * np.linalg.norm(K.theta) * v * live / np.linalg.norm(v * live)
    start = flatten(K.model)[1](jnp.asarray(th))
    res = kkt.solve_max_margin(start, data)
    assert res.converged and "local polish" in res.message and "SLSQP" not in res.message, res.message
    independent_check(res, data, tol=1e-8)
    np.testing.assert_allclose(res.theta, K.theta, rtol=1e-7, atol=1e-8)
    assert res.distance < 3e-3 and np.isclose(res.normalized_margin, K.normalized_margin, rtol=1e-10)


def test_margin_along_adaptive_report_is_honest(linear_data):
    """The adaptive (eps, delta) report: at the SVM direction both vanish; at a non-KKT direction loading every
    constraint (threshold 1e6) can shrink eps but not the slackness, so kkt_gap stays large; and the figures equal an
    independent max_margin_kkt at the chosen threshold."""
    X, y = np.asarray(linear_data.X), np.asarray(linear_data.y)
    svm = minimize(lambda w: (0.5 * w @ w, w), np.ones(3), jac=True, method="SLSQP",
                   constraints=[{"type": "ineq", "fun": lambda w: y * (X @ w) - 1, "jac": lambda w: y[:, None] * X}],
                   options={"ftol": 1e-15, "maxiter": 1000}).x
    bad = np.array([1.0, -2.0, 0.5])
    thetas = np.stack([1e3 * svm / np.linalg.norm(svm), 1e3 * bad / np.linalg.norm(bad)])
    un = flatten(MLP.from_weights((jnp.asarray([bad]),), None))[1]
    traj = type("T", (), {"ts": np.array([1.0, 2.0]), "thetas": thetas, "unflatten": staticmethod(un),
                          "model_at": lambda self, i: un(jnp.asarray(thetas[i]))})()
    path = kkt.margin_along(traj, linear_data, loss="exponential", active_tol=1e-2, adaptive_tols=(1e-2, 1e6))
    assert path.valid.all()
    assert path.kkt_gap[0] < 1e-8 and path.stationarity[0] < 1e-8
    assert path.kkt_gap[1] > 1e-2
    for i in range(2):
        ref = kkt.max_margin_kkt(un(jnp.asarray(thetas[i])), linear_data, active_tol=float(path.adaptive_tol[i]))
        assert np.isclose(path.eps_adaptive[i], ref.eps, rtol=1e-9, atol=1e-12)
        assert np.isclose(path.delta_adaptive[i], ref.delta, rtol=1e-9, atol=1e-12)
        assert np.isclose(path.kkt_gap[i], max(ref.stationarity, abs(ref.slackness)), rtol=1e-9, atol=1e-12)
        fixed = max(path.stationarity[i], abs(path.slackness[i]))
        assert path.kkt_gap[i] <= fixed + 1e-15  # the fixed threshold is one of the candidates
    # the all-constraints NNLS alone would look stationary: that is what kkt_gap must not hide
    loose = kkt.max_margin_kkt(un(jnp.asarray(thetas[1])), linear_data, active_tol=1e6)
    assert loose.slackness > 1e-2
    with pytest.raises(ValueError, match="adaptive_tols"):
        kkt.margin_along(traj, linear_data, loss="exponential", adaptive_tols=())
