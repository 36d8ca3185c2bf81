"""KKT points of the constrained NCF: values, gradients, honest residuals, polish, brute force (docs/math.md section 3)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from homflow import kkt
from homflow.activations import leaky_relu, relu, relu_power
from homflow.data import Dataset, teacher_student
from homflow.losses import get_loss
from homflow.models import MLP, DiagonalLinear, TwoLayer, flatten, rescale


@pytest.fixture(scope="module")
def data():
    return teacher_student(30, 3, teacher_width=3, p=2, seed=1)


def independent_residual(model, data, loss):
    """Tangential gradient at u = theta/|theta| by central finite differences of N (no homflow.kkt code)."""
    theta, unflatten = flatten(model)
    theta = np.asarray(theta, dtype=np.float64)
    u = theta / np.linalg.norm(theta)
    yt = np.asarray(get_loss(loss).ncf_labels(data.y))

    N = jax.jit(lambda v: jnp.dot(yt, jax.vmap(unflatten(v))(data.X)))

    h = 1e-6
    g = np.array([(float(N(u + h * e)) - float(N(u - h * e))) / (2 * h) for e in np.eye(u.size)])
    return np.linalg.norm(g - (u @ g) * u), np.linalg.norm(g)


@eqx.filter_jit
def _ascend(obj, u, steps, lr):
    def step(_, u):
        v = u + lr * kkt.tangent_gradient(u, obj.grad(u))
        return v / jnp.linalg.norm(v)

    return jax.lax.fori_loop(0, steps, step, u / jnp.linalg.norm(u))


_residual = eqx.filter_jit(lambda obj, theta: obj.residual(theta))  # one compile instead of many eager ops


def ascend(obj, theta, steps=60, lr=0.02):
    """Projected gradient ascent on the sphere (compiled once per architecture; steps and lr are traced)."""
    return _ascend(obj, jnp.asarray(theta), jnp.asarray(steps), jnp.asarray(lr, dtype=jnp.asarray(theta).dtype))


def test_ncf_value_matches_formula_and_labels(data):
    m = TwoLayer(3, 4, relu_power(2), key=jax.random.PRNGKey(0))
    out = np.maximum(np.asarray(data.X) @ np.asarray(m.W).T, 0) ** 2 @ np.asarray(m.a)
    y = np.asarray(data.y)
    assert np.isclose(float(kkt.ncf(m, data, loss="exponential")), y @ out, rtol=1e-12)
    assert np.isclose(float(kkt.ncf(m, data, loss="logistic")), 0.5 * y @ out, rtol=1e-12)
    nrm = float(np.linalg.norm(np.asarray(flatten(m)[0])))
    assert np.isclose(float(kkt.ncf(m, data, loss="square", normalize=True)), y @ out / nrm**3, rtol=1e-12)


def test_ncf_gradient_and_euler_identity(data):
    m = TwoLayer(3, 4, leaky_relu(0.2), key=jax.random.PRNGKey(1))
    g = np.asarray(kkt.ncf_grad(m, data, loss="square"))
    theta = np.asarray(flatten(m)[0])
    obj, _ = kkt.make_ncf(m, data, "square")
    h = 1e-6
    fd = np.array([(obj.value(theta + h * e) - obj.value(theta - h * e)) / (2 * h) for e in np.eye(theta.size)])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
    # Euler: <theta, grad N> = L N(theta), so lam = L N(u) at every point, KKT or not.
    res, lam = kkt.ncf_kkt_residual(m, data, loss="square")
    assert np.isclose(float(lam), m.degree * float(kkt.ncf(m, data, loss="square", normalize=True)), rtol=1e-12)


def test_residual_is_honest_random_large_certified_tiny_perturbation_linear(data):
    m = TwoLayer(3, 5, relu_power(2), key=jax.random.PRNGKey(2))
    obj, theta = kkt.make_ncf(m, data, "exponential")
    res_random, _ = kkt.ncf_kkt_residual(m, data, loss="exponential")
    r_t, lam_t, _ = _residual(obj, theta)
    gnorm = float(jnp.hypot(r_t, lam_t))  # ||grad N(u)||^2 = ||tangential part||^2 + <u, grad N(u)>^2
    assert np.isclose(float(r_t), float(res_random), rtol=1e-12)
    assert float(res_random) > 0.05 * gnorm

    pt = kkt.polish_ncf(obj.unflatten(ascend(obj, theta)), data, loss="exponential")
    assert pt.certified and pt.relative_residual < 1e-12
    assert np.isclose(float(jnp.linalg.norm(pt.theta)), 1.0, atol=1e-14)
    assert np.isclose(pt.lam, m.degree * pt.value, rtol=1e-12)
    r_ind, g_ind = independent_residual(pt.model, data, "exponential")
    assert r_ind < 1e-6 * g_ind  # finite differences: limited by h^2 and rounding/h

    rng = np.random.default_rng(0)
    v = rng.standard_normal(pt.theta.size)
    v -= (v @ pt.theta) * pt.theta  # tangent direction, so u + eps v stays at distance ~ eps from u
    v /= np.linalg.norm(v)
    rs = [float(_residual(obj, jnp.asarray(pt.theta + eps * v))[0]) for eps in (1e-3, 1e-5)]
    assert 50 < rs[0] / rs[1] < 200  # residual proportional to eps


@pytest.mark.parametrize("act", [relu_power(2), relu_power(3), relu, leaky_relu(0.1)])
def test_polish_reaches_machine_precision_from_partial_ascent(data, act):
    for seed in range(2):
        m = TwoLayer(3, 5, act, key=jax.random.PRNGKey(seed))
        obj, theta = kkt.make_ncf(m, data, "logistic")
        u = ascend(obj, theta)
        r_before = float(_residual(obj, u)[0])
        pt = kkt.polish_ncf(rescale(obj.unflatten(u), 7.0), data, loss="logistic")
        assert pt.certified, (act.name, seed, pt.relative_residual)
        assert pt.residual < max(1e-3 * r_before, 1e-13)
        # Independent check of KKT: grad N(u) = lam u recomputed from scratch on the returned model.
        g = np.asarray(kkt.ncf_grad(pt.model, data, loss="logistic"))
        assert np.linalg.norm(g - pt.lam * pt.theta) <= 1e-12 * max(1.0, np.linalg.norm(g))
        # Vanished groups are exactly zero.
        groups = kkt.zero_preserving_groups(pt.model)
        for i in pt.vanishing:
            assert np.all(pt.theta[groups[i]] == 0.0)


@pytest.mark.slow
def test_polish_finds_sparse_point_from_slowly_fading_neurons(data):
    """Start at a one-neuron KKT point plus small neurons: the polish zeroes them and certifies the rest."""
    one = TwoLayer(3, 1, relu_power(2), key=jax.random.PRNGKey(5))
    p1 = kkt.polish_ncf(rescale(one, 1.0), data, loss="square")
    obj1, _ = kkt.make_ncf(one, data, "square")
    p1 = kkt.polish_ncf(obj1.unflatten(ascend(obj1, jnp.asarray(p1.theta), steps=400)), data, loss="square")
    assert p1.certified and p1.value > 0
    a1, w1 = float(p1.model.a[0]), np.asarray(p1.model.W[0])
    rng = np.random.default_rng(1)
    a = np.concatenate([[a1], 0.03 * rng.standard_normal(3)])
    W = np.vstack([w1, 0.03 * rng.standard_normal((3, 3))])
    wide = TwoLayer.from_weights(jnp.asarray(a), jnp.asarray(W), relu_power(2))
    pt = kkt.polish_ncf(wide, data, loss="square")
    assert pt.certified and pt.relative_residual < 1e-13
    assert set(pt.vanishing) == {1, 2, 3}
    assert np.isclose(pt.value, p1.value, rtol=1e-12)
    assert pt.second_order.kind == "local max" or pt.second_order.kind == p1.second_order.kind
    sv = pt.singular_values[0]
    assert sv[1] < 1e-14 * sv[0]  # rank one


@pytest.mark.slow
def test_single_relu2_neuron_brute_force_on_the_sphere():
    """d = 2, one ReLU^2 neuron: (a, w) on S^2. KKT points balance ||w||^2 = 2 a^2 and then N = (2/3)/sqrt(3) h(phi)
    with h(phi) = sum_i y_i relu(x_i . (cos phi, sin phi))^2: KKT points <-> critical points of h on the circle."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((12, 2))
    y = np.sign(rng.standard_normal(12))
    data = Dataset(X, y)

    def h(phi):
        w = np.stack([np.cos(phi), np.sin(phi)], -1)
        return (np.maximum(w @ X.T, 0) ** 2) @ y

    phis = np.linspace(0, 2 * np.pi, 20001)[:-1]
    hv = h(phis)
    # brute force over the whole sphere S^2 in (a, w1, w2): the maximum of N
    t, s = np.meshgrid(np.linspace(0, np.pi, 801), np.linspace(0, 2 * np.pi, 1601), indexing="ij")
    pts = np.stack([np.cos(t), np.sin(t) * np.cos(s), np.sin(t) * np.sin(s)], -1).reshape(-1, 3)
    Nv = pts[:, 0] * ((np.maximum(pts[:, 1:] @ X.T, 0) ** 2) @ y)
    brute_max = Nv.max()

    locmax = [i for i in range(len(phis)) if abs(hv[i]) > 1e-3 and abs(hv[i]) >= abs(hv[i - 1])
              and abs(hv[i]) >= abs(hv[(i + 1) % len(phis)])]
    assert locmax
    found = []
    for i in locmax:
        a0 = np.sign(hv[i]) / np.sqrt(3)
        w0 = np.sqrt(2 / 3) * np.array([np.cos(phis[i] + 0.01), np.sin(phis[i] + 0.01)])
        m = TwoLayer.from_weights(jnp.asarray([a0]), jnp.asarray(w0[None]), relu_power(2))
        pt = kkt.polish_ncf(m, data, loss="square")
        assert pt.certified
        phi = np.arctan2(float(pt.model.W[0, 1]), float(pt.model.W[0, 0])) % (2 * np.pi)
        assert min(abs(phi - phis[i]), 2 * np.pi - abs(phi - phis[i])) < 1e-3
        assert np.isclose(pt.value, (2 / 3) / np.sqrt(3) * abs(h(phi)), rtol=1e-12)
        assert pt.second_order.kind == "local max"
        found.append(pt.value)
    assert max(found) >= brute_max - 1e-9 and max(found) - brute_max < 1e-3 * brute_max


def test_groups_cover_models_and_mlp_point():
    m = MLP(3, (4, 2), relu_power(2), key=jax.random.PRNGKey(0))
    groups = kkt.zero_preserving_groups(m)
    assert len(groups) == 6 and all(len(g) == 3 + 2 for g in groups[:4])
    assert len(kkt.zero_preserving_groups(DiagonalLinear(3, 2, key=jax.random.PRNGKey(0)))) == 6
    assert kkt.zero_preserving_groups(MLP(3, (), None, key=jax.random.PRNGKey(0))) == []


def test_linear_model_ncf_kkt_is_the_label_correlation(data):
    """L = 1: N(u) = <u, sum ytilde_i x_i>, the only positive KKT point is its normalised correlation vector."""
    m = MLP(3, (), None, key=jax.random.PRNGKey(0))
    pt = kkt.polish_ncf(m, data, loss="logistic")
    c = 0.5 * np.asarray(data.y) @ np.asarray(data.X)
    np.testing.assert_allclose(pt.theta * np.sign(pt.value), c / np.linalg.norm(c), atol=1e-12)


def test_bad_input_errors(data):
    m = TwoLayer(3, 2, relu, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="zero"):
        kkt.ncf_kkt_residual(rescale(m, 0.0), data, loss="square")
    with pytest.raises(ValueError, match="dimension"):
        kkt.ncf(TwoLayer(4, 2, relu, key=jax.random.PRNGKey(0)), data, loss="square")
    with pytest.raises(ValueError, match="labels"):
        kkt.ncf(m, Dataset(np.asarray(data.X), 2 * np.asarray(data.y)), loss="logistic")


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="on a fresh machine (December 2, 2026) one certified point, with a tangent "
                   "direction of singular value 4e-40, was classified 'saddle' (code of the last landing as well): the "
                   "second-order class at a ReLU^2 kink depends on rounding; not yet derived")
def test_solve_ncf_points_certified_deduped_and_match_brute_force():
    """Single ReLU^2 neuron in d = 2: every point found is a brute-force local maximum of |h| on the circle
    (see the test above), the best is the global one, each passes an independent residual, and permuted copies of one
    point given as ``inits`` are one point with their count."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((12, 2))
    y = np.sign(rng.standard_normal(12))
    data = Dataset(X, y)
    phis = np.linspace(0, 2 * np.pi, 20001)[:-1]
    hv = np.abs((np.maximum(np.stack([np.cos(phis), np.sin(phis)], -1) @ X.T, 0) ** 2) @ y)
    is_max = (hv >= np.roll(hv, 1)) & (hv >= np.roll(hv, -1)) & (hv > 1e-3)
    brute = np.sort((2 / 3) / np.sqrt(3) * hv[is_max])

    m = TwoLayer(2, 1, relu_power(2), key=jax.random.PRNGKey(0))
    sol = kkt.solve_ncf(m, data, loss="square", n_starts=24, key=jax.random.PRNGKey(1), steps=400)
    assert len(sol) >= 1 and sum(p.count for p in sol) + sum(p.count for p in sol.uncertified) == 24
    assert np.isclose(sol.best.value, brute[-1], rtol=1e-6)
    for p in sol:
        assert p.certified and p.second_order.kind == "local max"
        assert np.min(np.abs(brute - p.value)) < 1e-6 * brute[-1]
        r_ind, g_ind = independent_residual(p.model, data, "square")
        assert r_ind < 1e-6 * g_ind
    values = [p.value for p in sol]
    assert len(values) == len(set(np.round(values, 9)))  # distinct

    # two-layer: permuted and sign-irrelevant copies of one point dedupe to one point
    d3 = teacher_student(30, 3, teacher_width=3, p=2, seed=1)
    wide = TwoLayer(3, 3, relu_power(2), key=jax.random.PRNGKey(0))
    s1 = kkt.solve_ncf(wide, d3, loss="logistic", n_starts=8, key=jax.random.PRNGKey(2), steps=300)
    top = s1.best
    a, W = np.asarray(top.model.a), np.asarray(top.model.W)
    perms = [np.roll(np.arange(3), k) for k in range(3)]
    inits = np.stack([np.concatenate([a[p], W[p].ravel()]) for p in perms])
    s2 = kkt.solve_ncf(wide, d3, loss="logistic", inits=inits, key=jax.random.PRNGKey(0), steps=0)
    assert len(s2) == 1 and s2.best.count == 3 and np.isclose(s2.best.value, top.value, rtol=1e-12)
    for p in s1:
        g = np.asarray(kkt.ncf_grad(p.model, d3, loss="logistic"))
        assert np.linalg.norm(g - p.lam * p.theta) <= 1e-12 * np.linalg.norm(g)
        assert np.isclose(np.linalg.norm(p.theta), 1.0)
