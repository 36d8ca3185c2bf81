"""Reproductions of arXiv 2505.12419 (the embedding principle): ``embedding-toy`` and ``embedding-digits``.

A narrow network and its split are trained side by side from ``eta(0) = T theta(0)``; the checks are
``max_k ||eta_k - T theta_k||`` (exact methods: at rounding level; negative controls: far from it).

Gradient flow (``embedding-toy``, case ``flow``): the narrow and the wide flow are integrated as one ODE in
``(theta, eta)`` (:func:`homflow.embedding.joint_flow`, Tsit5, ``rtol = 1e-10``, step-size control on the narrow half),
so both share every step and the error is rounding, not integration error; the horizon ``t1 = steps * lr / n`` is the
flow time the GD runs cover.

Step sizes: homflow's losses are sums over samples; the paper (PyTorch) averages. GD on the mean with step ``lr`` is GD
on the sum with step ``lr / n`` (SGD: ``lr / batch_size``), which is what is run here, so ``lr = 0.1`` is the paper's.
A step size that cannot work at the chosen initial scale is refused before the run (:func:`check_step_size`): GD on the
mean loss decreases it only while ``lr < 2 / lambda_max``, ``lambda_max`` the largest Hessian eigenvalue of the mean
loss (the descent lemma); at ``init_scale = 2`` the toy MLP's ``lambda_max(theta(0))`` is 1.9e4 and GD with ``lr = 0.1``
diverges (measured: every toy setting with ``lr < 2 / lambda_max(theta(0))`` ran to the end, every diverging one had
``2 / lambda_max <= 0.0053``).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..activations import leaky_relu
from ..data import digits, gaussian_toy
from ..embedding import joint_flow, split, split_every, trajectory_error
from ..flow import adam, gradient_descent, sgd, sgd_batches
from ..losses import loss_value
from ..models import CNN, MLP, flatten
from ._registry import Context, Figure, Outcome, check, register
from ._solverstats import SolverLog, ok_and_reason

__all__ = ["toy", "digits_experiment", "check_step_size", "top_curvature"]

# Up to this many parameters the Hessian is formed densely; above, Lanczos (scipy eigsh) on Hessian-vector products.
DENSE_HESSIAN_MAX = 512


def top_curvature(model, data, loss: str = "exponential", *, tol: float = 1e-8) -> float:
    """The largest eigenvalue of the Hessian of the mean loss ``(1/n) sum_i l(y_i Phi(theta; x_i))`` at ``model``'s
    parameters (dense up to :data:`DENSE_HESSIAN_MAX` parameters, else ``scipy.sparse.linalg.eigsh(which='LA')`` on
    jitted Hessian-vector products, relative tolerance ``tol``)."""
    theta, unflatten = flatten(model)

    def f(t):
        return loss_value(unflatten(t), data, loss) / data.n

    if theta.size <= DENSE_HESSIAN_MAX:  # theta an argument of the compiled Hessian: nothing to constant-fold
        H = np.asarray(jax.jit(jax.hessian(f))(theta))
        return float(np.linalg.eigvalsh(0.5 * (H + H.T))[-1])
    import scipy.sparse.linalg as sla

    g = jax.grad(f)
    hvp = jax.jit(lambda t, v: jax.jvp(g, (t,), (v,))[1])  # theta an argument: nothing to constant-fold
    op = sla.LinearOperator((theta.size, theta.size), dtype=np.float64,
                            matvec=lambda v: np.asarray(hvp(theta, jnp.asarray(v.ravel(), theta.dtype))))
    v0 = np.random.default_rng(0).standard_normal(theta.size)
    return float(sla.eigsh(op, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)[0])


def check_step_size(lr: float, cases, *, loss: str = "exponential") -> dict:
    """Refuse a GD step size that cannot work: ``lr < 2 / lambda_max`` (mean loss, at ``theta(0)``) for every
    ``(name, model, data)`` in ``cases`` (or every ``name: lambda_max`` of a dict); returns ``{name: lambda_max}``.

    Raises:
        ValueError: naming ``lr`` and ``init_scale``, the case, ``lambda_max`` and the largest step allowed.
    """
    curv = cases if isinstance(cases, dict) else {n: top_curvature(m, d, loss) for n, m, d in cases}
    out = {}
    for name, lam in curv.items():
        out[name] = lam
        if lam > 0 and not lr < 2.0 / lam:
            raise ValueError(f"config keys `lr` = {lr:g} and `init_scale` cannot work together: for {name} the mean "
                             f"loss's curvature at theta(0) is lambda_max = {lam:.4g}, and gradient descent decreases "
                             f"the loss only for lr < 2 / lambda_max = {2.0 / lam:.4g} (the descent lemma); with a "
                             "larger step it diverges. Lower `lr` below that or lower `init_scale`.")
    return out

EXACT, CONTROL = 1e-11, 1e-3
FLOW_RTOL = 1e-10


def _pair(method, narrow, s, data, *, lr, steps, save_every, batch_size, seed, shuffled=False):
    """Narrow and wide runs of one method and the error curve ``||eta_k - T theta_k||`` at the saved steps (the flow:
    at the saved times)."""
    wide = s(narrow)
    loss = "exponential"
    if method == "flow":
        t1 = steps * lr / data.n  # the flow time of `steps` GD steps of size lr / n
        ts = np.linspace(0.0, t1, max(2, steps // save_every) + 1)
        a, b = joint_flow(s, narrow, data, loss=loss, t1=t1, ts=ts, rtol=FLOW_RTOL, error_norm="narrow")
        ok, why = ok_and_reason(a)
        if not ok:
            raise RuntimeError(f"flow: {why}")
        return np.asarray(a.ts), trajectory_error(s, a, b), a.log_loss, b.log_loss, {
            "t1": t1, "rtol": FLOW_RTOL, "shared_steps": a.stats.get("num_steps"),
            "accepted_steps": a.stats.get("num_accepted_steps"), "error_norm": a.stats.get("error_norm")}, (a,)
    if method == "gd":
        kw = dict(loss=loss, lr=lr / data.n, steps=steps, save_every=save_every)
        a, b = gradient_descent(narrow, data, **kw), gradient_descent(wide, data, **kw)
    elif method == "sgd":
        bs = min(batch_size, data.n)
        b1 = sgd_batches(data.n, bs, steps, seed=seed)
        b2 = sgd_batches(data.n, bs, steps, seed=seed + 1) if shuffled else b1
        kw = dict(loss=loss, lr=lr / bs, steps=steps, save_every=save_every)
        a = sgd(narrow, data, batches=b1, **kw)
        b = sgd(wide, data, batches=a.extras["batches"] if not shuffled else b2, **kw)
    else:
        kw = dict(loss=loss, lr=lr * 0.01, steps=steps, save_every=save_every)
        a, b = adam(narrow, data, **kw), adam(wide, data, **kw)
    for tr in (a, b):
        ok, why = ok_and_reason(tr)
        if not ok:
            raise RuntimeError(f"{method}: {why}")
    return np.asarray(a.steps), trajectory_error(s, a, b), a.log_loss, b.log_loss, {}, (a, b)


def _run_cases(cases, params, ctx: Context, prefix=""):
    arrays, checks, summary, log = {}, [], {}, SolverLog()
    steps = int(params["steps"])
    save_every = max(1, steps // int(params["n_save"]))
    for i, (name, method, narrow, s, data, shuffled, desc) in enumerate(cases):
        ctx.progress(i / len(cases), f"{prefix}{name}")
        t0 = time.perf_counter()
        k, err, ln, lw, info, runs = _pair(method, narrow, s, data, lr=float(params["lr"]), steps=steps,
                                           save_every=save_every, batch_size=int(params["batch_size"]),
                                           seed=int(params["seed"]), shuffled=shuffled)
        for tr in runs:
            log.add(name, tr, default_solver=method)
        arrays[f"{name}_{_xkey(method)}"], arrays[f"{name}_error"] = k, err
        arrays[f"{name}_log_loss_narrow"], arrays[f"{name}_log_loss_wide"] = ln, lw
        control = shuffled or method == "adam"
        value = float(np.max(err))
        checks.append(check(f"{name}: max ||eta - T theta||", value, CONTROL if control else EXACT,
                            ">=" if control else "<=", desc))
        summary[name] = {"max_error": value, "seconds": round(time.perf_counter() - t0, 2), "negative_control": control,
                         **info}
    ctx.progress(1.0, f"{prefix}done")
    summary.update(log.summary())
    return arrays, checks, summary


def _xkey(method):
    return "time" if method == "flow" else "step"


def _figures(cases, title):
    exact = [c[0] for c in cases if not c[5] and c[1] != "adam"]
    controls = [c[0] for c in cases if c[5] or c[1] == "adam"]
    xk = {c[0]: _xkey(c[1]) for c in cases}
    figs = [Figure(f"{n}_error", f"{title}: {n}, ||eta(t) - T theta(t)||" if xk[n] == "time" else
                   f"{title}: {n}, ||eta_k - T theta_k||", x=f"{n}_{xk[n]}", ys=(f"{n}_error",),
                   labels=(n,), xlabel=xk[n], ylabel="error", logy=True,
                   hlines=(CONTROL if n in controls else EXACT,)) for n in exact + controls]
    first = exact[0]
    figs.append(Figure(f"{first}_loss", f"{title}: log loss, narrow vs wide ({first})", x=f"{first}_step",
                       ys=(f"{first}_log_loss_narrow", f"{first}_log_loss_wide"), labels=("narrow", "wide"),
                       xlabel="step", ylabel="log L"))
    return figs


def _validate_common(p: dict) -> None:
    for k in ("steps", "n_save", "batch_size", "seed", "width", "channels"):
        v = p[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "seed" else 1):
            raise ValueError(f"config key `{k}` must be an integer >= {0 if k == 'seed' else 1}; got {v!r}.")
    if p["n"] is not None and (isinstance(p["n"], bool) or not isinstance(p["n"], int) or p["n"] < 2):
        raise ValueError(f"config key `n` must be an integer >= 2; got {p['n']!r}.")
    if not 0 <= p["alpha"] < 1:
        raise ValueError(f"config key `alpha` (the leaky ReLU's slope) must be in [0, 1); got {p['alpha']!r}.")
    for k in ("init_scale", "lr"):
        if not p[k] > 0:
            raise ValueError(f"config key `{k}` must be > 0; got {p[k]!r}.")


def _gd_cases(cases):
    """The ``(name, model, data)`` of the cases whose steps are GD / SGD steps of size ``lr`` on a mean loss."""
    return [(c[0], c[2], c[4]) for c in cases if c[1] in ("gd", "sgd")]


# the keys of the cases (their models and data set the curvature at theta(0); lr and batch_size name them)
_CURVATURE_KEYS = ("n", "init_scale", "alpha", "seed", "width", "channels", "cnn", "lr", "batch_size")


@functools.lru_cache(maxsize=32)
def _curvatures(kind: str, items: tuple) -> dict:
    """``lambda_max(theta(0))`` of every GD / SGD case of the toy or digits experiment (cached: the config loader and
    the run ask for the same)."""
    params = dict(items)
    cases = _toy_cases(params) if kind == "toy" else _digits_cases(params)
    return {n: top_curvature(m, d) for n, m, d in _gd_cases(cases)}


def _curvature_of(kind: str, params: dict) -> dict:
    return dict(_curvatures(kind, tuple((k, params[k]) for k in _CURVATURE_KEYS)))


TOY_DEFAULTS = {"n": 100, "init_scale": 0.5, "steps": 100_000, "lr": 0.1, "batch_size": 16, "alpha": 0.01, "seed": 0,
                "n_save": 500, "width": 1, "channels": 2, "cnn": True}


def _toy_cases(params: dict):
    act = leaky_relu(float(params["alpha"]))
    seed, n, w, ch = int(params["seed"]), int(params["n"]), int(params["width"]), int(params["channels"])
    c = [2**-0.5, 2**-0.5]
    sep, nonsep = gaussian_toy(n, separable=True, seed=seed), gaussian_toy(n, separable=False, seed=seed)
    mlp = MLP(2, (w,), act, key=jax.random.PRNGKey(seed), scale=float(params["init_scale"]))
    s = split(mlp, layer=0, neuron=0, coeffs=c)
    lr, bs = params["lr"], params["batch_size"]
    cases = [
        ("gd_separable", "gd", mlp, s, sep, False, f"MLP 2-{w}-1 -> 2-{w + 1}-1, GD lr {lr:g} (paper: 4.5e-13)"),
        ("gd_nonseparable", "gd", mlp, s, nonsep, False, f"GD lr {lr:g}, overlapping classes (paper: 5.6e-13)"),
        ("flow", "flow", mlp, s, sep, False, "gradient flow to t1 = steps * lr / n, narrow and wide as one ODE "
         f"(rtol {FLOW_RTOL:g}, shared steps)"),
        ("sgd_same_batches", "sgd", mlp, s, sep, False, f"SGD batch {bs}, identical batches (paper: 4.4e-13)"),
        ("sgd_different_batches", "sgd", mlp, s, sep, True, "negative control: other batch order (paper: 1.5e-1)"),
        ("adam", "adam", mlp, s, sep, False, "negative control: Adam is coordinate-wise"),
    ]
    if params["cnn"]:
        cnn = CNN((1, 2), (ch,), act, kernel_size=3, key=jax.random.PRNGKey(seed + 1),
                  scale=float(params["init_scale"]))
        cases.append(("cnn_gd", "gd", cnn, split_every(cnn, layer=0, coeffs=c), sep, False,
                      f"CNN {ch} -> {2 * ch} channels, GD (paper, 2 -> 4: 2.4e-10)"))
    return cases


def _validate_toy(p: dict) -> None:
    _validate_common(p)
    check_step_size(float(p["lr"]), _curvature_of("toy", p))


@register("embedding-toy", description="arXiv 2505.12419 on 2-D Gaussian data: MLP 2-1-1 -> 2-2-1 (c = 1/sqrt 2) "
          "under GD (separable, non-separable), gradient flow (narrow and wide as one ODE), SGD with identical / "
          "different batches, Adam, and a CNN 2 -> 4 channels; trajectories stay eta = T theta to rounding, the "
          "controls break it. A step size lr >= 2 / lambda_max(theta(0)) is refused (GD would diverge).",
          defaults=TOY_DEFAULTS, quick={"steps": 10_000, "n_save": 200}, validate=_validate_toy)
def toy(params: dict, ctx: Context) -> Outcome:
    """The toy reproduction (leaky ReLU ``alpha``, exponential loss, float64); ``width`` and ``channels`` are the narrow
    MLP's hidden width (neuron 0 is split) and the narrow CNN's channels (all are split)."""
    cases = _toy_cases(params)
    curv = check_step_size(float(params["lr"]), _curvature_of("toy", params))
    arrays, checks, summary = _run_cases(cases, params, ctx)
    summary["lambda_max_at_init"] = curv
    if jax.numpy.result_type(float) != jax.numpy.float64:
        checks.append(check("float64 enabled", 0.0, 1.0, ">=", "the claims need float64 (homflow.enable_x64())"))
    return Outcome(checks=checks, arrays=arrays, figures=_figures(cases, "toy"), summary=summary)


DIGITS_DEFAULTS = {"n": None, "init_scale": 0.5, "steps": 2000, "lr": 0.1, "batch_size": 16, "alpha": 0.01, "seed": 0,
                   "n_save": 200, "width": 128, "channels": 10, "cnn": True}


def _digits_cases(params: dict):
    act = leaky_relu(float(params["alpha"]))
    seed = int(params["seed"])
    data = digits((3, 5), n=params["n"], seed=seed)
    c = [2**-0.5, 2**-0.5]
    mlp = MLP(64, (int(params["width"]),), act, key=jax.random.PRNGKey(seed), scale=float(params["init_scale"]))
    s = split_every(mlp, layer=0, coeffs=c)
    cases = [
        ("mlp_gd", "gd", mlp, s, data, False, f"MLP {params['width']} -> {2 * params['width']}, GD"),
        ("mlp_sgd_same_batches", "sgd", mlp, s, data, False, "MLP, SGD with identical batches"),
        ("mlp_sgd_different_batches", "sgd", mlp, s, data, True, "negative control: other batch order"),
        ("mlp_adam", "adam", mlp, s, data, False, "negative control: Adam"),
    ]
    if params["cnn"]:
        cnn = CNN((1, 8, 8), (int(params["channels"]),), act, kernel_size=3, key=jax.random.PRNGKey(seed + 1),
                  scale=float(params["init_scale"]))
        cases.append(("cnn_gd", "gd", cnn, split_every(cnn, layer=0, coeffs=c), data, False,
                      f"CNN {params['channels']} -> {2 * params['channels']} channels, GD"))
    return cases


def _validate_digits(p: dict) -> None:
    _validate_common(p)
    check_step_size(float(p["lr"]), _curvature_of("digits", p))


@register("embedding-digits", description="arXiv 2505.12419 on scikit-learn digits 3 vs 5: MLP width 128 -> 256 and "
          "a CNN 10 -> 20 channels (every neuron / channel split with c = 1/sqrt 2) under GD and SGD; Adam and "
          "shuffled SGD as negative controls. A step size lr >= 2 / lambda_max(theta(0)) is refused.",
          defaults=DIGITS_DEFAULTS, quick={"n": 100, "steps": 300, "n_save": 50, "width": 32, "channels": 4},
          validate=_validate_digits)
def digits_experiment(params: dict, ctx: Context) -> Outcome:
    """The real-data reproduction (leaky ReLU ``alpha``, exponential loss, float64)."""
    cases = _digits_cases(params)
    curv = check_step_size(float(params["lr"]), _curvature_of("digits", params))
    arrays, checks, summary = _run_cases(cases, params, ctx)
    summary["lambda_max_at_init"] = curv
    return Outcome(checks=checks, arrays=arrays, figures=_figures(cases, "digits 3 vs 5"), summary=summary)
