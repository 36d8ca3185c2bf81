"""Shared set-up of the flow benchmarks: the canonical problem, a tight cached reference, baselines, timing, tables.

The canonical problem (../shared/data/canonical.py, numbers copied here so the benchmarks run from a fresh clone):
two-layer ReLU^2 net, d = 10, width 50, n = 100 Gaussian inputs, labels the sign of a width-5 teacher, square loss
(1/2 sum), float64, theta(0) = delta * u with delta = 1e-3 and ||u|| = 1 in homflow's order (a, W.ravel()).
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np

import homflow

homflow.enable_x64()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from homflow.activations import relu_power  # noqa: E402
from homflow.data import Dataset  # noqa: E402
from homflow.flow import gradient_flow, make_objective  # noqa: E402
from homflow.models import TwoLayer  # noqa: E402

D, M, N, P_ACT = 10, 50, 100, 2
DELTA = 1e-3


def canonical(n_directions: int = 1, seed: int = 0):
    """X (N, D), y (N,), unit directions (n_directions, M + M*D): identical to shared/data/canonical.py."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, D))
    f_t = (np.maximum(X @ rng.standard_normal((5, D)).T, 0.0) ** P_ACT) @ rng.standard_normal(5)
    y = np.sign(f_t)
    y[y == 0] = 1.0
    dirs = rng.standard_normal((n_directions, M + M * D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return X, y, dirs


def problem(n_directions: int = 1):
    """(model, data, objective, thetas0 (n_directions, P)) of the canonical problem."""
    X, y, dirs = canonical(n_directions)
    data = Dataset(X, y)
    model = TwoLayer(D, M, relu_power(P_ACT), key=jax.random.PRNGKey(0))
    objective, _ = make_objective(model, data, "square")
    return model, data, objective, DELTA * dirs


def timed(fn, repeats: int = 2):
    """Run ``fn`` ``repeats`` times (the first compiles) and return (last result, best wall time of the later runs)."""
    best = math.inf
    out = None
    for i in range(repeats):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(out) if isinstance(out, jax.Array) else None
        w = time.perf_counter() - t
        if i > 0 or repeats == 1:
            best = min(best, w)
    return out, best


def reference(t1: float, index: int = 0, *, rtol: float = 1e-12):
    """Endpoint of the canonical flow at ``t1`` by diffrax Tsit5 at rtol 1e-12 (atol 1e-17), cached on disk
    (HOMFLOW_BENCH_CACHE, default the temp dir) because it takes ~800k gradient evaluations at t1 = 250."""
    cache = os.environ.get("HOMFLOW_BENCH_CACHE", tempfile.gettempdir())
    path = os.path.join(cache, f"homflow_canonical_ref_{t1:g}_{index}_{rtol:g}.npy")
    if os.path.exists(path):
        return np.load(path)
    model, data, _, th = problem(index + 1)
    tr = gradient_flow(model, data, loss="square", t1=t1, rtol=rtol, atol=rtol * DELTA * 1e-5, solver="tsit5",
                       theta0=th[index], ts=[0.0, t1], max_steps=20_000_000)
    if not tr.success:
        raise RuntimeError(f"reference failed: {tr.result}")
    np.save(path, tr.thetas[-1])
    return tr.thetas[-1]


def rel_err(x, ref) -> float:
    return float(np.linalg.norm(np.asarray(x) - ref) / np.linalg.norm(ref))


def gd_fixed(objective, theta0, t1: float, lr: float):
    """Fixed-step gradient descent to time ``t1`` (``round(t1 / lr)`` steps) in one compiled JAX loop."""
    steps = int(round(t1 / lr))
    g = jax.jit(lambda th: _gd_loop(objective, th, lr, steps))
    return g, steps


def _gd_loop(objective, theta, lr, steps):
    return jax.lax.fori_loop(0, steps, lambda i, th: th - lr * objective.grad(th), theta)


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def torch_problem(theta0):
    """The canonical objective in PyTorch (float64): returns (grad function, theta tensor)."""
    import torch

    torch.set_num_threads(1)  # a tiny problem: thread start-up dominates otherwise
    X, y, _ = canonical(1)
    Xt = torch.tensor(X, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)

    def loss(theta):
        a, W = theta[:M], theta[M:].reshape(M, D)
        out = (torch.relu(Xt @ W.T) ** 2) @ a
        return 0.5 * torch.sum((out - yt) ** 2)

    def grad(theta):
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(loss(th), th)
        return g

    return grad, torch.tensor(np.asarray(theta0), dtype=torch.float64)


def table(rows, columns):
    """Print a plain table (rows: list of dicts)."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def device_line() -> str:
    d = jax.devices()[0]
    return f"device {d.platform}:{d.device_kind}, dtype {jnp.zeros(()).dtype}, jax {jax.__version__}"


_ = jnp
