"""The census (homflow.census): canonical forms, clustering and certification against an independent NumPy NCF, the
escape-time law against the closed-form NCF flow of a depth-3 diagonal network, the refill driver against single
flows, the table, bad input, and the built-in ``census --quick``."""

from __future__ import annotations

import io
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import brentq

from homflow.activations import relu_power
from homflow.census import (
    Canonicaliser,
    CensusOptions,
    CensusTable,
    DriverOptions,
    census,
    certify_and_match,
    cluster_directions,
    fit_escape_law,
    read_table,
    run_members,
    within_slope,
)
from homflow.data import Dataset
from homflow.flow import NormAbove, gradient_flow, make_objective
from homflow.kkt import make_ncf, sphere_ascent, zero_preserving_groups
from homflow.models import MLP, DiagonalLinear, TwoLayer, flatten


def _small(n=12, d=3, m=5, p=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    data = Dataset(X, np.sign(X[:, 0] + 0.5 * X[:, 1] ** 2 - 0.3))
    return data, TwoLayer(d, m, relu_power(p), key=jax.random.PRNGKey(seed))


def _numpy_ncf_residual(theta, X, ytilde, m, d, p):
    """Independent NumPy NCF of a two-layer ReLU^p net, theta = (a, W.ravel()): relative tangential gradient."""
    u = theta / np.linalg.norm(theta)
    a, W = u[:m], u[m:].reshape(m, d)
    Z = np.maximum(X @ W.T, 0.0)  # (n, m)
    ga = ytilde @ Z**p
    gW = (a[:, None] * ((ytilde[:, None] * p * Z ** (p - 1)).T @ X))
    g = np.concatenate([ga, gW.ravel()])
    return np.linalg.norm(g - (u @ g) * u) / np.linalg.norm(g)


def _permute_two_layer(theta, perm, m, d):
    a, W = theta[:m], theta[m:].reshape(m, d)
    return np.concatenate([a[perm], W[perm].ravel()])


def test_canonical_form_is_invariant_and_keeps_the_function():
    data, model = _small()
    m, d = 5, 3
    can = Canonicaliser(model)
    obj, _ = make_objective(model, data, "square")
    rng = np.random.default_rng(1)
    th = rng.standard_normal(m + m * d)
    c = can(th)
    np.testing.assert_allclose(np.asarray(obj.outputs(jnp.asarray(c))), np.asarray(obj.outputs(jnp.asarray(th))),
                               rtol=1e-12, atol=1e-12)
    for _ in range(3):
        np.testing.assert_array_equal(can(_permute_two_layer(th, rng.permutation(m), m, d)), c)
    norms = [np.linalg.norm(c[g]) for g in zero_preserving_groups(model)]
    assert np.all(np.diff(norms) <= 0)
    # the group ids of the original that land at canonical ids
    own = can.original_groups(th, [0])
    assert np.isclose(np.linalg.norm(th[zero_preserving_groups(model)[own[0]]]), norms[0])


def test_canonical_form_of_an_mlp_keeps_the_function():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((6, 3))
    data = Dataset(X, np.sign(X[:, 0]))
    model = MLP(3, (4, 3), relu_power(2), key=jax.random.PRNGKey(0))
    obj, th = make_objective(model, data, "square")
    c = Canonicaliser(model)(np.asarray(th))
    assert not np.allclose(c, np.asarray(th))
    np.testing.assert_allclose(np.asarray(obj.outputs(jnp.asarray(c))), np.asarray(obj.outputs(th)), rtol=1e-12)
    # permuting the first hidden layer by hand gives the same canonical form
    W1, W2, W3 = model.weights
    perm = np.array([2, 0, 3, 1])
    permuted = MLP.from_weights((W1[perm], W2[:, perm], W3), model.activation)
    np.testing.assert_allclose(Canonicaliser(model)(np.asarray(flatten(permuted)[0])), c, atol=1e-15)


def test_cluster_directions_recovers_planted_clusters():
    rng = np.random.default_rng(3)
    centres = np.linalg.qr(rng.standard_normal((20, 3)))[0].T  # 3 orthonormal directions
    sizes = [7, 4, 2]
    U = np.concatenate([c + 0.01 * rng.standard_normal((k, 20)) for c, k in zip(centres, sizes)])
    labels = cluster_directions(U, cos_tol=0.99)
    truth = np.repeat([0, 1, 2], sizes)
    assert np.array_equal(labels, truth)  # numbered by size, largest first
    with pytest.raises(ValueError, match="cos_tol"):
        cluster_directions(U, cos_tol=1.5)


def test_certified_points_match_an_independent_numpy_residual():
    data, model = _small(m=4)
    m, d, p = 4, 3, 2
    ncf, _ = make_ncf(model, data, "square")
    rng = np.random.default_rng(4)
    starts = rng.standard_normal((4, m + m * d))
    starts /= np.linalg.norm(starts, axis=1, keepdims=True)
    ends = np.asarray(sphere_ascent(ncf, jnp.asarray(starts), 400)[0])
    # each end, a slightly perturbed copy and a copy with its neurons permuted: escape directions of three members
    dirs = np.concatenate([ends, ends + 1e-3 * rng.standard_normal(ends.shape),
                           np.stack([_permute_two_layer(e, rng.permutation(m), m, d) for e in ends])])
    pts = certify_and_match(ncf, model, dirs, second_order=False)
    assert len(pts.points) >= 1
    X, yt = np.asarray(data.X), np.asarray(ncf.ytilde)
    for pt in pts.points:
        assert pt.certified
        assert _numpy_ncf_residual(np.asarray(pt.theta), X, yt, m, d, p) <= 1e-10
    assert np.all(pts.cos >= 0.99)
    k = len(ends)
    assert np.array_equal(pts.match[:k], pts.match[2 * k:])  # a permuted network is the same KKT point
    assert np.array_equal(pts.match[:k], pts.match[k:2 * k])
    assert math.isclose(pts.shares().sum(), 1.0)


def test_escape_law_fit_on_exact_power_and_log_laws():
    rng = np.random.default_rng(5)
    dirs = np.repeat(np.arange(5), 4)
    deltas = np.tile([1e-2, 1e-3, 1e-4, 1e-5], 5)
    s = np.repeat(rng.uniform(1, 3, 5), 4)
    for L in (3, 4, 5):
        law = fit_escape_law(dirs, deltas, s / deltas ** (L - 2), L)
        assert law.law == "power" and abs(law.exponent - (L - 2)) < 1e-12 and law.rescaled_spread < 1e-12
    lam = np.repeat(rng.uniform(0.5, 2, 5), 4)
    law = fit_escape_law(dirs, deltas, s + np.log(1 / deltas) / lam, 2, growth=lam)
    # one slope for all directions: the fit gives the mean of 1/lambda
    assert law.law == "log" and abs(law.exponent - np.mean(1 / lam[::4])) < 1e-12
    with pytest.raises(ValueError, match="growth"):
        fit_escape_law(dirs, deltas, s, 2)
    with pytest.raises(ValueError, match="directions"):
        fit_escape_law([0, 0], [1e-2, 1e-3], [1.0, 2.0], 3)
    assert within_slope([0, 0, 1, 1], [0.0, 1.0, 2.0, 4.0], [1.0, 2.0, 0.0, 2.0])[0] == pytest.approx(1.0)


def test_table_round_trip():
    t = CensusTable({"member": np.arange(3), "t": np.array([1.25, np.inf, np.nan]), "ok": np.array([True, False,
                     True]), "pattern": np.array(["0-2", "", "1"], dtype=object)})
    back = read_table(io.StringIO(t.to_csv()))
    assert back.names == t.names
    np.testing.assert_array_equal(back["member"], t["member"])
    np.testing.assert_array_equal(back["t"], t["t"])
    np.testing.assert_array_equal(back["ok"], t["ok"])
    assert list(back["pattern"]) == ["0-2", "", "1"]
    with pytest.raises(ValueError, match="one length"):
        CensusTable({"a": np.arange(2), "b": np.arange(3)})


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="deltas"):
        CensusOptions(deltas=(1e-3, -1.0))
    with pytest.raises(ValueError, match="escape_factor"):
        CensusOptions(escape_factor=0.5)
    with pytest.raises(ValueError, match="escape_factor"):
        CensusOptions(escape_factor=None)
    with pytest.raises(ValueError, match="n_directions"):
        CensusOptions(n_directions=0)
    with pytest.raises(ValueError, match="align_cos"):
        CensusOptions(align_cos=2.0)
    with pytest.raises(ValueError, match="chunk_steps"):
        DriverOptions(chunk_steps=0)
    data, model = _small()
    with pytest.raises(ValueError, match="directions"):
        census(model, data, CensusOptions(), directions=np.ones((2, 3)))
    from homflow.activations import leaky_relu, relu
    from homflow.models import TwoLayer

    for act in (relu, leaky_relu(0.1)):  # a kinked net's flow is an inclusion: refused, not ground through
        with pytest.raises(ValueError, match="kinked degree-1 activation"):
            census(TwoLayer(data.X.shape[1], 4, act, key=jax.random.PRNGKey(0)), data, CensusOptions(n_directions=2))


def _diag_ncf_escape(u0, v0, level, c):
    """Closed-form NCF flow of f = u^3 - v^3 on one sample x = 1 (N = c (u^3 - v^3)): u' = 3c u^2, v' = -3c v^2;
    the first time ||(u, v)|| = level."""
    u = lambda t: u0 / (1 - 3 * c * u0 * t)  # noqa: E731
    v = lambda t: v0 / (1 + 3 * c * v0 * t)  # noqa: E731
    t_max = min([1 / (3 * c * u0)] * int(u0 > 0) + [1 / (3 * c * -v0)] * int(v0 < 0))  # first blow-up
    g = lambda t: math.hypot(u(t), v(t)) - level  # noqa: E731
    return brentq(g, 0.0, t_max * (1 - 1e-14), xtol=1e-14, rtol=1e-15)


@pytest.mark.slow
def test_census_escape_times_follow_the_closed_form_ncf_flow():
    """Depth-3 diagonal network on one sample: escape times against the closed-form NCF flow, exponent L - 2 = 1,
    every member aligned with the certified KKT point (1, 0) or (0, -1)."""
    data = Dataset(np.ones((1, 1)), np.ones(1))
    model = DiagonalLinear(1, 3, key=jax.random.PRNGKey(0))
    phis = np.array([0.3, 0.7, 1.1, 3.5, 4.2])  # u0 > 0 < v0 for the first three; both < 0 for the last two
    dirs = np.stack([np.cos(phis), np.sin(phis)], axis=1)
    opts = CensusOptions(deltas=(1e-3, 1e-4), escape_factor=10.0, t_after=2.0, rtol=1e-10,
                         driver=DriverOptions(batch_size=4, chunk_steps=50))
    c = census(model, data, opts, directions=dirs)
    t = c.table
    assert t["escaped"].all()
    for i in range(len(t)):
        u0, v0 = t["delta"][i] * dirs[t["direction"][i]]
        expect = _diag_ncf_escape(u0, v0, 10.0 * t["delta"][i], 1.0)
        assert t["t_escape"][i] == pytest.approx(expect, rel=1e-5)
    assert abs(c.law.exponent - 1.0) < 1e-4 and c.law.rescaled_spread < 1e-4
    ends = {tuple(np.round(p.theta, 12)) for p in c.points.points}
    assert ends <= {(1.0, 0.0), (0.0, -1.0)} and all(p.certified for p in c.points.points)
    assert np.all(t["cos"] >= 0.99)


@pytest.mark.slow
def test_refill_driver_agrees_with_single_flows():
    data, model = _small(m=4)
    obj, _ = make_objective(model, data, "square")
    rng = np.random.default_rng(6)
    U = rng.standard_normal((5, 4 + 12))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    delta, level, t_after, rtol = 1e-2, 0.3, 20.0, 1e-10
    th0 = delta * U
    kw = dict(levels=level, horizons=1e5, t_after=t_after, rtol=rtol, groups=zero_preserving_groups(model),
              save_dt=1.0)
    refill = run_members(obj, th0, options=DriverOptions(batch_size=2, chunk_steps=30), **kw)
    classic = run_members(obj, th0, options=DriverOptions(batch_size=8, refill=False), **kw)
    for i in range(th0.shape[0]):
        tr = gradient_flow(model, data, loss="square", theta0=th0[i], t1=1e5, rtol=rtol, events=NormAbove(level),
                           ts=[0.0, 1e5])
        t_single = float(tr.ts[-1])
        assert refill.t_escape[i] == pytest.approx(t_single, rel=1e-6)
        assert classic.t_escape[i] == pytest.approx(t_single, rel=1e-6)
        assert refill.t_end[i] == pytest.approx(t_single + t_after, rel=1e-6)
        tr2 = gradient_flow(model, data, loss="square", theta0=tr.thetas[-1], t1=t_after, rtol=rtol, ts=[0, t_after])
        np.testing.assert_allclose(refill.theta_end[i], tr2.thetas[-1], rtol=0, atol=1e-5 * np.linalg.norm(
            tr2.thetas[-1]))
        np.testing.assert_allclose(classic.theta_end[i], tr2.thetas[-1], rtol=0,
                                   atol=1e-5 * np.linalg.norm(tr2.thetas[-1]))
    assert refill.grad_evals.sum() <= refill.slot_evals and 0 < refill.utilisation <= 1
    assert 0 <= refill.idle_evals < refill.slot_evals and refill.utilisation <= refill.busy_utilisation <= 1
    assert refill.calls > classic.calls
    # shards of members (in-process runner): each member takes the same steps whatever batch it shares
    from homflow.census import run_members_sharded
    from homflow.shards import run_shards

    sharded = run_members_sharded(model, data, "square", th0, n_shards=2, runner=run_shards,
                                  options=DriverOptions(batch_size=2, chunk_steps=30), **kw)
    np.testing.assert_allclose(sharded.t_escape, refill.t_escape, rtol=1e-12)
    np.testing.assert_allclose(sharded.theta_end, refill.theta_end, rtol=0, atol=1e-12)
    assert sharded.grad_evals.tolist() == refill.grad_evals.tolist()


@pytest.mark.slow
def test_reproduce_census_quick(tmp_path):
    from homflow.experiments import execute, parse_config
    from homflow.store import RunStore

    res = execute(parse_config({"experiment": "census"}, quick=True), RunStore(tmp_path), report=False)
    assert res.passed, res.checks
    table = read_table(os.path.join(res.path, "census.csv"))
    assert len(table) == 16 and table["escaped"].all()
