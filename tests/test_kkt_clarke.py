"""Clarke-aware KKT certificates of ReLU-type networks (docs/math.md sections 5 and 6), checked against an independent
NumPy computation: own forward pass and backpropagation (no JAX), every extreme slope pattern at the kinks, SciPy NNLS.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import nnls
from threadpoolctl import threadpool_limits

from homflow import kkt
from homflow.activations import leaky_relu, relu
from homflow.data import Dataset, gaussian_toy, sphere, teacher_student
from homflow.flow import gradient_descent
from homflow.kkt._clarke_sqp import clarke_sqp, least_distance
from homflow.models import MLP, DiagonalLinear, TwoLayer, flatten


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # small dense solves: on a busy 2-core machine a multi-threaded BLAS is 40x slower (measured), not faster
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ---------------------------------------------------------------- independent NumPy reference (no JAX)

def np_layers(model):
    """Weight matrices (W_1, ..., W_K) as NumPy arrays and a map from their gradients to the flat order of homflow."""
    if isinstance(model, TwoLayer):
        Ws = [np.asarray(model.W, dtype=np.float64), np.asarray(model.a, dtype=np.float64)[None, :]]
        return Ws, lambda gs: np.concatenate([gs[1].ravel(), gs[0].ravel()])
    Ws = [np.asarray(W, dtype=np.float64) for W in model.weights]
    return Ws, lambda gs: np.concatenate([g.ravel() for g in gs])


def np_forward(Ws, alpha, x):
    """Pre-activations of the hidden layers and the output, with the real activation max(z, alpha z)."""
    h, zs = x, []
    for W in Ws[:-1]:
        z = W @ h
        zs.append(z)
        h = np.where(z > 0, z, alpha * z)
    return zs, float((Ws[-1] @ h)[0])


def np_grad(Ws, x, slopes):
    """Gradient of W_K (s_{K-1} * (... (s_1 * (W_1 x)))) with respect to every W_k (hand-written backprop)."""
    hs = [x]
    for W, s in zip(Ws[:-1], slopes):
        hs.append(s * (W @ hs[-1]))
    grads = [None] * len(Ws)
    grads[-1] = hs[-1][None, :]
    delta = Ws[-1][0] * slopes[-1]
    for k in range(len(Ws) - 2, -1, -1):
        grads[k] = np.outer(delta, hs[k])
        if k > 0:
            delta = (Ws[k].T @ delta) * slopes[k - 1]
    return grads


def np_certificate(model, X, y, *, active_tol, kink_tol):
    """Rescale to q_min = 1, enumerate every slope pattern at the kinks of the near-active samples, NNLS (no ridge).

    Returns (theta, q, lam, residual, n_kinks)."""
    Ws, flat = np_layers(model)
    alpha = float(model.activation.alpha)
    L = len(Ws)
    q = np.array([yi * np_forward(Ws, alpha, x)[1] for x, yi in zip(X, y)])
    c = q.min() ** (-1.0 / L)
    Ws = [c * W for W in Ws]
    q = q / q.min()
    theta = flat(Ws)
    cols, owner, n_kinks = [], [], 0
    for i in np.flatnonzero(q <= 1 + active_tol):
        zs, _ = np_forward(Ws, alpha, X[i])
        h, base, kinked = X[i], [], []
        for k, (W, z) in enumerate(zip(Ws[:-1], zs)):
            scale = np.linalg.norm(W, axis=1) * np.linalg.norm(h)
            at = np.abs(z) <= kink_tol * scale
            base.append(np.where(z > 0, 1.0, alpha))
            kinked += [(k, j) for j in np.flatnonzero(at)]
            h = np.where(z > 0, z, alpha * z)
        n_kinks += len(kinked)
        for pattern in itertools.product((alpha, 1.0), repeat=len(kinked)):
            s = [b.copy() for b in base]
            for (k, j), v in zip(kinked, pattern):
                s[k][j] = v
            cols.append(y[i] * flat(np_grad(Ws, X[i], s)))
            owner.append(i)
    G = np.array(cols)
    beta, _ = nnls(G.T, theta, maxiter=100 * G.shape[0])
    lam = np.zeros(len(y))
    np.add.at(lam, np.array(owner), beta)
    return theta, q, lam, float(np.linalg.norm(theta - G.T @ beta)), n_kinks


def active_kinks(r):
    """Kinks of the near-active samples (those the certificate uses)."""
    return int(sum(K[r.active].sum() for K in r.kinks))


def plant_kinks(model, X):
    """Put unit 0 of layer 1 exactly on its kink for sample 0 and (deeper nets) unit 1 of layer 2 for sample 1."""
    Ws = [np.asarray(W, dtype=np.float64).copy() for W in model.weights]
    x0 = X[0]
    Ws[0][0] -= (Ws[0][0] @ x0) / (x0 @ x0) * x0
    if len(Ws) > 2:
        alpha = float(model.activation.alpha)
        z1 = Ws[0] @ X[1]
        h1 = np.where(z1 > 0, z1, alpha * z1)
        Ws[1][1] -= (Ws[1][1] @ h1) / (h1 @ h1) * h1
    return MLP.from_weights(tuple(jnp.asarray(W) for W in Ws), model.activation)


# ---------------------------------------------------------------- fast tests

def test_reference_backprop_matches_finite_differences():
    """The NumPy reference itself: its gradient at a smooth point agrees with central differences."""
    rng = np.random.default_rng(0)
    Ws = [rng.standard_normal((4, 3)), rng.standard_normal((3, 4)), rng.standard_normal((1, 3))]
    x = rng.standard_normal(3)
    zs, _ = np_forward(Ws, 0.1, x)
    g = np_grad(Ws, x, [np.where(z > 0, 1.0, 0.1) for z in zs])
    k, (r, c), h = 1, (2, 1), 1e-6
    Wp = [W.copy() for W in Ws]
    Wm = [W.copy() for W in Ws]
    Wp[k][r, c] += h
    Wm[k][r, c] -= h
    fd = (np_forward(Wp, 0.1, x)[1] - np_forward(Wm, 0.1, x)[1]) / (2 * h)
    assert np.isclose(g[k][r, c], fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("alpha", [0.1, 0.0])
def test_certificate_with_planted_kinks_matches_numpy(alpha):
    """A depth-3 net with exact kinks in two layers: the kinks found, and the Clarke residual (every pattern, NNLS), agree
    with the NumPy reference; the Clarke residual is never above the one-subgradient score."""
    X = np.asarray(gaussian_toy(12, seed=3).X)
    base = MLP(2, (5, 4), leaky_relu(alpha) if alpha else relu, key=jax.random.PRNGKey(7))
    m = plant_kinks(base, X)
    d = Dataset(X, np.sign(np.asarray(jax.vmap(m)(jnp.asarray(X)))))  # labels the net gets right: q_i > 0
    r = kkt.max_margin_kkt(m, d, active_tol=10.0, ridge=0.0)
    assert r.clarke and r.n_kinks >= 1 and r.exact
    assert r.kinks[0][0, 0]  # the planted first-layer kink (sample 0 is the first kept one)
    theta, qn, lam, res, nk = np_certificate(m, np.asarray(d.X), np.asarray(d.y), active_tol=10.0,
                                             kink_tol=r.kink_tol)
    assert nk == active_kinks(r)
    np.testing.assert_allclose(r.theta, theta, rtol=1e-12)
    assert np.isclose(r.eps, res, rtol=1e-6, atol=1e-12 * np.linalg.norm(theta))
    assert r.stationarity <= r.smooth_stationarity + 1e-12
    assert np.all(r.multipliers >= 0)


@pytest.mark.slow
def test_two_layer_slopes_reproduce_the_residual():
    """Two-layer net: the reported slopes s_ij in [alpha, 1] give one subgradient per sample whose combination with the
    multipliers has exactly the reported residual (recomputed in NumPy)."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((10, 3))
    a, W = rng.standard_normal(6), rng.standard_normal((6, 3))
    for j, i in ((0, 0), (1, 0), (2, 1)):  # three kinks, two on sample 0
        W[j] -= (W[j] @ X[i]) / (X[i] @ X[i]) * X[i]
    m = TwoLayer.from_weights(jnp.asarray(a), jnp.asarray(W), leaky_relu(0.2))
    y = np.sign(np.asarray(jax.vmap(m)(jnp.asarray(X))))
    r = kkt.max_margin_kkt(m, Dataset(X, y), active_tol=10.0, ridge=0.0)
    assert r.n_kinks >= 3
    Ws, flat = np_layers(r.model)
    G = np.zeros_like(r.theta)
    for i in r.support:
        s = np.where(np.isnan(r.slopes[0][i]), 0.2, r.slopes[0][i])
        assert np.all((s >= 0.2 - 1e-12) & (s <= 1 + 1e-12))
        G += r.multipliers[i] * y[i] * flat(np_grad(Ws, X[i], [s]))
    assert np.isclose(np.linalg.norm(r.theta - G), r.eps, rtol=1e-8, atol=1e-12)


def test_no_kinks_is_the_gradient_certificate_and_bad_input():
    data = gaussian_toy(16, seed=1)
    m = TwoLayer(2, 4, leaky_relu(0.1), key=jax.random.PRNGKey(2))
    q = np.asarray(data.y) * np.asarray(jax.vmap(m)(jnp.asarray(data.X)))
    d = Dataset(np.asarray(data.X)[q > 0], np.asarray(data.y)[q > 0])
    a = kkt.max_margin_kkt(m, d, kink_tol=0.0)
    b = kkt.max_margin_kkt(m, d, clarke=False)
    assert a.clarke and not b.clarke and a.n_kinks == 0 and b.kinks is None
    np.testing.assert_array_equal(a.multipliers, b.multipliers)
    assert a.eps == b.eps == a.smooth_stationarity * np.linalg.norm(a.theta)
    with pytest.raises(ValueError, match="clarke"):
        kkt.max_margin_kkt(DiagonalLinear(2, 2, key=jax.random.PRNGKey(0)), d, clarke=True)
    with pytest.raises(ValueError, match="kink_tol"):
        kkt.max_margin_kkt(m, d, kink_tol=-1.0)
    with pytest.raises(ValueError, match="max_patterns"):
        kkt.max_margin_kkt(m, d, max_patterns=1)
    with pytest.raises(ValueError, match="max_distance"):
        kkt.solve_max_margin(m, d, max_distance=-1.0)


@pytest.mark.slow
def test_solve_reports_far_and_collapsed_points_as_failures():
    """The guards: a certified KKT point too far from the start, or whose normalized margin fell below the stated
    ratio of the start's, is a failure with its reason."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 3))
    data = Dataset(X, np.sign(X @ np.array([1.0, -2.0, 0.5])))
    start = MLP.from_weights((jnp.asarray([[1.0, -2.0, 0.5]]),), None)
    ok = kkt.solve_max_margin(start, data)
    assert ok.converged and ok.reason == "certified" and ok.distance > 1e-3
    far = kkt.solve_max_margin(start, data, max_distance=0.5 * ok.distance)
    assert not far.converged and far.reason == "too_far" and "max_distance" in far.message
    ratio = 1.01 * ok.normalized_margin / ok.start_normalized_margin
    low = kkt.solve_max_margin(start, data, min_margin_ratio=ratio)
    assert not low.converged and low.reason == "margin_collapsed"


def test_ncf_clarke_residual():
    """No kinks: the usual tangential gradient. Planted kinks on a two-layer net: never above the one-subgradient
    residual, and the reported slopes rebuild (in NumPy) an element h of the set with exactly that residual."""
    data = gaussian_toy(12, seed=4)
    X, y = np.asarray(data.X), np.asarray(data.y)
    rng = np.random.default_rng(1)
    a, W = rng.standard_normal(4), rng.standard_normal((4, 2))
    m = TwoLayer.from_weights(jnp.asarray(a), jnp.asarray(W), leaky_relu(0.1))
    r0 = kkt.ncf_clarke_residual(m, data, loss="exponential")
    res, lam = kkt.ncf_kkt_residual(m, data, loss="exponential")
    assert r0.n_kinks == 0 and np.isclose(r0.residual, float(res), rtol=1e-12) and np.isclose(r0.lam, float(lam))
    for j, i in ((0, 0), (1, 3)):
        W[j] -= (W[j] @ X[i]) / (X[i] @ X[i]) * X[i]
    m = TwoLayer.from_weights(jnp.asarray(a), jnp.asarray(W), leaky_relu(0.1))
    r = kkt.ncf_clarke_residual(m, data, loss="exponential")
    assert r.n_kinks >= 2 and r.residual <= r.smooth_residual + 1e-12
    th, _ = flatten(m)
    u = np.asarray(th) / np.linalg.norm(np.asarray(th))
    mu = TwoLayer.from_weights(jnp.asarray(u[:4]), jnp.asarray(u[4:].reshape(4, 2)), leaky_relu(0.1))
    Ws, flat = np_layers(mu)
    h = sum(y[i] * flat(np_grad(Ws, X[i], [r.slopes[0][i]])) for i in range(len(y)))
    assert np.isclose(np.linalg.norm(h - (h @ u) * u), r.residual, rtol=1e-8, atol=1e-14)


def test_least_distance_is_the_qp_solution():
    """The LDP-by-NNLS solve of the Clarke SQP (Lawson and Hanson) meets the KKT conditions of min ||e|| s.t. G e >= h,
    agrees with SciPy's SLSQP on the same QP, and reports inconsistent constraints."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(3)
    for m, P in ((30, 10), (6, 12), (40, 40)):
        G = rng.standard_normal((m, P))
        h = G @ rng.standard_normal(P) - np.abs(rng.standard_normal(m))  # feasible, most constraints away from 0
        e, w = least_distance(G, h)
        assert np.linalg.norm(e) > 0.1
        assert w.min() >= 0 and np.allclose(e, G.T @ w, atol=1e-12)
        assert (G @ e - h).min() >= -1e-10 and abs(w @ (G @ e - h)) <= 1e-10 * max(1.0, w.sum())
        ref = minimize(lambda v: 0.5 * v @ v, np.zeros(P), jac=lambda v: v, method="SLSQP",
                       constraints=[{"type": "ineq", "fun": lambda v: G @ v - h, "jac": lambda v: G}],
                       options={"ftol": 1e-14, "maxiter": 500})
        assert np.allclose(e, ref.x, atol=1e-6)  # (SLSQP may flag its exact one-step QP solve as status 8)
    assert least_distance(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([1.0, 0.0])) == (None, None)


@pytest.mark.parametrize("arch", ["two-layer leaky", "mlp leaky", "two-layer relu"])
def test_clarke_sqp_reaches_a_clarke_kkt_point(arch):
    """From a short-GD start (not a KKT point: stationarity ~1e-2), the Clarke SQP reaches a point that the NumPy
    reference certifies (every slope pattern at the kinks within its last kink tolerance, NNLS): stationary to 1e-8,
    feasible, slack; its normalized margin is at least the start's (it is a descent method on the l1 merit from a start
    rescaled to q_min = 1)."""
    data = sphere(12, 3, seed=1, labels="linear")
    d = data.X.shape[1]
    m = {"two-layer leaky": lambda: TwoLayer(d, 8, leaky_relu(0.2), key=jax.random.PRNGKey(0)),
         "mlp leaky": lambda: MLP(d, (6, 6), leaky_relu(0.1), key=jax.random.PRNGKey(1), scale=1.0),
         "two-layer relu": lambda: TwoLayer(d, 8, relu, key=jax.random.PRNGKey(2))}[arch]()
    tr = gradient_descent(m, data, loss="exponential", lr=0.05, steps=3000, schedule="loss_based")
    prob, th = kkt.make_margin_problem(tr.final, data)
    X, y = np.asarray(data.X), np.asarray(data.y)
    theta0, q0, _, eps0, _ = np_certificate(tr.final, X, y, active_tol=1e-2, kink_tol=1e-3)
    assert eps0 > 1e-3 * np.linalg.norm(theta0)  # the start is not a KKT point
    th1, its, msg = clarke_sqp(prob, np.asarray(th), kink_tols=(1e-2, 1e-3), max_iter=80)
    assert its > 0
    model1 = flatten(tr.final)[1](jnp.asarray(th1))
    theta, q, lam, eps, _ = np_certificate(model1, X, y, active_tol=1e-7, kink_tol=1e-3)
    assert q.min() >= 1 - 1e-12
    assert eps <= 1e-8 * np.linalg.norm(theta), (arch, eps / np.linalg.norm(theta), msg)
    assert abs(lam @ (q - 1)) <= 1e-8 * lam.sum()
    assert np.linalg.norm(theta) ** -len(np_layers(model1)[0]) >= np.linalg.norm(theta0) ** -len(np_layers(m)[0])


def test_solve_max_margin_rejects_bad_sqp_options():
    data = sphere(8, 3, seed=0, labels="linear")
    m = TwoLayer(3, 4, leaky_relu(0.2), key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="sqp_kink_tols"):
        kkt.solve_max_margin(m, data, sqp_kink_tols=(-1.0,))
    with pytest.raises(ValueError, match="sqp_max_iter"):
        kkt.solve_max_margin(m, data, sqp_max_iter=-2)


# ---------------------------------------------------------------- the figures (slow)

def _gd_cases():
    return [
        ("sphere n=20 d=3", sphere(20, 3, seed=0, labels="linear"), 0),
        ("teacher n=30 d=4", teacher_student(30, 4, teacher_width=2, p=1, seed=1), 1),
        ("sphere random labels n=10 d=5", sphere(10, 5, seed=5, labels="random"), 5),
        ("sphere n=40 d=5", sphere(40, 5, seed=3, labels="linear"), 3),
        ("teacher n=10 d=2", teacher_student(10, 2, teacher_width=2, p=1, seed=4), 4),
    ]


# The GD end point moves with rounding (XLA's code generation differs between CPUs): these starts are not KKT points
# (certificate stationarity 0.1-0.5) and the local polish alone fails from about half of them. Measured (December 2,
# 2026) with the Clarke SQP presolve: certified from 21 of 21 starts (GD stopped at 97k, 98k, 100k, 103k steps on these
# data sets and a teacher n=40 d=5), each data set's starts reaching the same point (normalized margins equal to 6
# digits); before it, 16 of 20 (cases 0, 1, 3 failed from some starts, here and on the CI machine).


@pytest.mark.slow
@pytest.mark.parametrize("case", range(5))
def test_depth3_leaky_relu_from_long_gd_certified(case):
    """Depth-3 leaky-ReLU (0.1) MLPs after long GD (loss-based schedule, exponential loss): solve_max_margin returns a
    certified point (stationarity < 1e-8) near the start, and the NumPy reference (own backprop, every slope pattern
    at the kinks, SciPy NNLS) agrees: feasible, stationary to 1e-8, slack, ||theta||^2 = L sum lambda."""
    name, data, k = _gd_cases()[case]
    m = MLP(data.X.shape[1], (10, 10), leaky_relu(0.1), key=jax.random.PRNGKey(k), scale=1.0)
    tr = gradient_descent(m, data, loss="exponential", lr=0.05, steps=100_000, schedule="loss_based")
    res = kkt.solve_max_margin(tr.final, data)
    assert res.converged and res.certified and res.stationarity < 1e-8, (name, res.reason, res.message)
    assert res.distance <= 1.0 and res.normalized_margin >= 0.5 * res.start_normalized_margin
    X, y = np.asarray(data.X), np.asarray(data.y)
    theta, q, lam, eps, nk = np_certificate(res.model, X, y, active_tol=res.active_tol, kink_tol=res.kink_tol)
    assert nk == active_kinks(res)
    assert q.min() >= 1 - 1e-10
    assert eps <= 1e-8 * np.linalg.norm(theta)
    assert abs(lam @ (q - 1)) <= 1e-8 * lam.sum()
    assert np.isclose(theta @ theta, 3 * lam.sum(), rtol=1e-7)
