"""Discrete methods for comparison with the flow: gradient descent (constant or loss-based step), SGD, Adam."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..models import AbstractHomogeneousModel, safe_norm
from ._problem import Problem, make_problem
from ._results import RESULTS
from ._solution import Trajectory

__all__ = ["gradient_descent", "sgd", "adam", "sgd_batches"]


def _check_steps(steps, save_every):
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"`steps` must be a positive integer; got {steps!r}.")
    if save_every is None:
        save_every = max(1, steps // 200)
    if isinstance(save_every, bool) or not isinstance(save_every, (int, np.integer)) or save_every < 1:
        raise ValueError(f"`save_every` must be a positive integer; got {save_every!r}.")
    return int(steps), int(min(save_every, steps))


def _check_lr(lr):
    v = float(lr)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"`lr` must be a finite number > 0; got {lr!r}.")
    return v


def _scan_saving(step, state, steps: int, save_every: int, diag):
    """Run ``state = step(state, k)`` for k < steps, recording ``diag(state)`` at k = 0 and every ``save_every``
    steps (and at the end). Returns the final state, the saved diagnostics and the step indices saved."""

    def chunk(state, k0, n):
        def body(s, k):
            return step(s, k), None

        s, _ = jax.lax.scan(body, state, k0 + jnp.arange(n))
        return s, diag(s)

    n_chunks, rem = divmod(steps, save_every)
    saved = [jax.tree_util.tree_map(lambda x: x[None], diag(state))]
    idx = [np.array([0])]
    if n_chunks:
        state, d = jax.lax.scan(lambda s, c: chunk(s, c * save_every, save_every), state, jnp.arange(n_chunks))
        saved.append(d)
        idx.append(save_every * np.arange(1, n_chunks + 1))
    if rem:
        state, d = chunk(state, n_chunks * save_every, rem)
        saved.append(jax.tree_util.tree_map(lambda x: x[None], d))
        idx.append(np.array([steps]))
    saved = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *saved)
    return state, saved, np.concatenate(idx)


def _trajectory(objective: Problem, saved, idx, ts, stats, name, extras=None):
    thetas = np.asarray(saved["theta"])
    log_l = np.asarray(saved["log_loss"])
    finite = bool(np.all(np.isfinite(thetas)))
    result = RESULTS.successful if finite else RESULTS.nonfinite
    reason = (f"{name}: {int(idx[-1])} steps" if finite
              else f"{name}: the iterates became non-finite (step size too large?)")
    return Trajectory(ts=np.asarray(ts), thetas=thetas, loss=np.exp(log_l), log_loss=log_l,
                      norm=np.asarray(saved["norm"]), stats=stats, result=result, unflatten=objective.unflatten,
                      degree=objective.degree, steps=idx, extras=extras or {}, reason=reason)


def _diag(objective):
    return lambda s: {"theta": s[0], "log_loss": objective.log_loss(s[0]), "norm": safe_norm(s[0]), "time": s[1]}


@eqx.filter_jit
def _gd_run(objective, theta, lr, steps, save_every, schedule, increase, decrease):
    if schedule == "constant":
        def step(s, k):
            th, t = s
            return th + lr * objective.velocity(th), t + lr
        state = (theta, jnp.zeros((), theta.dtype))
    else:
        # Loss-based step size (arXiv 1906.05890): eta = alpha / L, i.e. theta <- theta - alpha grad log L; accept if the
        # loss decreased (then alpha *= increase), else roll back (alpha *= decrease). Time advances by eta = alpha/L.
        def step(s, k):
            th, t, alpha = s
            lv, g = objective.log_grad(th)
            new = th - alpha * g
            new_lv = objective.log_loss(new)
            ok = jnp.isfinite(new_lv) & (new_lv < lv) & jnp.all(jnp.isfinite(new))
            th2 = jnp.where(ok, new, th)
            t2 = jnp.where(ok, t + alpha * jnp.exp(-lv), t)
            return th2, t2, jnp.where(ok, alpha * increase, alpha * decrease)
        state = (theta, jnp.zeros((), theta.dtype), jnp.asarray(lr, theta.dtype))
    final, saved, idx = _scan_saving(step, state, steps, save_every, _diag(objective))
    return final, saved


def gradient_descent(
    model: AbstractHomogeneousModel,
    data,
    *,
    loss="square",
    lr: float,
    steps: int,
    save_every: int | None = None,
    schedule: str = "constant",
    increase: float = 1.1,
    decrease: float = 0.5,
) -> Trajectory:
    """Full-batch gradient descent ``theta <- theta - lr grad L(theta)`` (the discretisation the papers use).

    Arguments:
        lr: step size (``schedule='loss_based'``: the initial ``alpha`` of ``eta = alpha / L``, arXiv 1906.05890).
        steps: number of steps; save_every: record every this many steps (default ``steps // 200``).
        schedule: ``'constant'`` or ``'loss_based'`` (accept a step if the loss decreased and multiply ``alpha`` by
            ``increase``; otherwise reject it and multiply ``alpha`` by ``decrease``).

    Returns:
        A :class:`Trajectory` whose ``ts`` is the elapsed flow time ``sum eta_k`` and ``steps`` the step indices. Under
        the loss-based schedule the norm grows geometrically and ``eta = alpha / L`` overflows to ``inf`` once
        ``L < 1e-308`` (``ts`` is then ``inf``); a step whose result is not finite is rejected like one that fails to
        decrease the loss, so the iterates stay finite.
    """
    objective, theta = make_problem(model, data, loss)
    lr = _check_lr(lr)
    steps, save_every = _check_steps(steps, save_every)
    if schedule not in ("constant", "loss_based"):
        raise ValueError(f"`schedule` must be 'constant' or 'loss_based'; got {schedule!r}.")
    if schedule == "loss_based" and not objective.loss.classification:
        raise ValueError("`schedule='loss_based'` needs a classification loss (logistic or exponential).")
    _, saved = _gd_run(objective, theta, lr, steps, save_every, schedule, float(increase), float(decrease))
    return _trajectory(objective, saved, _indices(steps, save_every), np.asarray(saved["time"]), {"num_steps": steps, "grad_evals": steps},
                       f"gradient descent ({schedule})")


def _indices(steps, save_every):
    n_chunks, rem = divmod(steps, save_every)
    idx = [np.array([0]), save_every * np.arange(1, n_chunks + 1)]
    if rem:
        idx.append(np.array([steps]))
    return np.concatenate(idx)


def sgd_batches(n: int, batch_size: int, steps: int, *, seed=0) -> np.ndarray:
    """Mini-batch indices (steps, batch_size): a fresh random permutation per epoch (seeded); feed the same array to
    two runs to give them identical batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= n:
        raise ValueError(f"`batch_size` must be an integer in 1..{n}; got {batch_size!r}.")
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    rows = [rng.permutation(n)[: per_epoch * batch_size].reshape(per_epoch, batch_size) for _ in range(epochs)]
    return np.concatenate(rows)[:steps]


def _check_batches(batches, n, steps):
    b = np.asarray(batches)
    if b.ndim != 2 or b.shape[0] < steps or not np.issubdtype(b.dtype, np.integer) or b.min() < 0 or b.max() >= n:
        raise ValueError(f"`batches` must be an integer array (>= steps = {steps} rows, batch_size) of indices in 0..{n-1}"
                         f"; got shape {b.shape} and dtype {b.dtype}.")
    return jnp.asarray(b[:steps])


@eqx.filter_jit
def _sgd_run(objective, theta, lr, batches, steps, save_every):
    def step(s, k):
        th, t = s
        idx = batches[k]
        return th + lr * objective.velocity(th, X=objective.X[idx], y=objective.y[idx]), t + lr
    state = (theta, jnp.zeros((), theta.dtype))
    _, saved, _ = _scan_saving(step, state, steps, save_every, _diag(objective))
    return saved


def sgd(model, data, *, loss="square", lr: float, steps: int, batch_size: int | None = None, batches=None, seed=0,
        save_every: int | None = None) -> Trajectory:
    """Mini-batch SGD on the summed loss of each batch, with given ``batches`` (steps, batch_size) or seeded ones.

    The batches used are returned in ``trajectory.extras['batches']``."""
    objective, theta = make_problem(model, data, loss)
    lr = _check_lr(lr)
    steps, save_every = _check_steps(steps, save_every)
    if batches is None:
        if batch_size is None:
            raise ValueError("`sgd` needs `batch_size` or explicit `batches`.")
        batches = sgd_batches(data.n, batch_size, steps, seed=seed)
    b = _check_batches(batches, data.n, steps)
    saved = _sgd_run(objective, theta, lr, b, steps, save_every)
    return _trajectory(objective, saved, _indices(steps, save_every), np.asarray(saved["time"]),
                       {"num_steps": steps, "grad_evals": steps}, "SGD", extras={"batches": np.asarray(b)})


@eqx.filter_jit
def _adam_run(objective, theta, lr, b1, b2, eps, steps, save_every):
    import optax

    opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)

    def step(s, k):
        th, t, st = s
        g = objective.grad(th)
        upd, st = opt.update(g, st, th)
        return th + upd, t + lr, st
    state = (theta, jnp.zeros((), theta.dtype), opt.init(theta))
    diag = _diag(objective)
    _, saved, _ = _scan_saving(step, state, steps, save_every, lambda s: diag(s[:2]))
    return saved


def adam(model, data, *, loss="square", lr: float, steps: int, b1=0.9, b2=0.999, eps=1e-8,
         save_every: int | None = None) -> Trajectory:
    """Full-batch Adam (optax): coordinate-wise, so it does not commute with neuron splitting (a negative control)."""
    objective, theta = make_problem(model, data, loss)
    lr = _check_lr(lr)
    steps, save_every = _check_steps(steps, save_every)
    saved = _adam_run(objective, theta, lr, float(b1), float(b2), float(eps), steps, save_every)
    return _trajectory(objective, saved, _indices(steps, save_every), np.asarray(saved["time"]),
                       {"num_steps": steps, "grad_evals": steps}, "Adam")
