"""The built-in ``flow``: a user-described gradient flow (data, model, initialisation, loss, flow or optimiser,
analyses, checks), with checkpoints so that a killed run resumes to the same numbers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import data as hdata
from ..activations import get_activation
from ..flow import LossBelow, NormAbove, adam, gradient_descent, make_objective, sgd
from ..models import CNN, MLP, DiagonalLinear, TwoLayer
from ._flowspec import FLOW_DEFAULTS, CheckSpec, DataSpec, FlowExperimentConfig, ModelSpec
from ._registry import Context, Figure, Outcome, check, register
from ._segments import segmented_flow

__all__ = ["build_data", "build_model", "run_flow_config", "trajectory_metrics"]


def build_data(spec: DataSpec):
    """The :class:`homflow.data.Dataset` that ``spec`` describes."""
    if spec.kind == "teacher_student":
        return hdata.teacher_student(spec.n, spec.d, teacher_width=spec.teacher_width, p=spec.p, seed=spec.seed,
                                     labels=spec.labels, noise=spec.noise)
    if spec.kind == "gaussian_toy":
        return hdata.gaussian_toy(spec.n, separable=spec.separable, seed=spec.seed)
    if spec.kind == "sphere":
        return hdata.sphere(spec.n, spec.d, seed=spec.seed, labels=spec.labels if spec.labels != "sign" else "linear")
    if spec.kind == "digits":
        return hdata.digits(tuple(spec.classes), n=min(spec.n, 360), seed=spec.seed)
    return hdata.load(spec.path)


def build_model(spec: ModelSpec, d_in: int, *, scale: float, seed: int):
    """The network that ``spec`` describes, with ``||theta(0)|| = scale`` and a Gaussian direction from ``seed``."""
    key = jax.random.PRNGKey(seed)
    if spec.d_in and spec.d_in != d_in:
        raise ValueError(f"config key `model.d_in`: is {spec.d_in} but the data have dimension {d_in}; the sizes "
                         "must match.")
    act = get_activation(spec.activation, p=spec.p if spec.p and spec.activation != "linear" else None,
                         alpha=spec.alpha if spec.activation.startswith("leaky") else None)
    if spec.kind == "two_layer":
        return TwoLayer(d_in, spec.width, act, key=key, scale=scale)
    if spec.kind == "mlp":
        widths = spec.widths or (spec.width,) * max(spec.depth - 1, 1)
        return MLP(d_in, tuple(widths), act, key=key, scale=scale)
    if spec.kind == "diagonal_linear":
        return DiagonalLinear(d_in, spec.depth, key=key, scale=scale)
    if math.prod(spec.input_shape) != d_in:
        raise ValueError(f"config key `model.input_shape`: {list(spec.input_shape)} holds "
                         f"{math.prod(spec.input_shape)} values but the data have dimension {d_in}.")
    from ..models import with_norm

    return with_norm(CNN(tuple(spec.input_shape), tuple(spec.channels), act, kernel_size=spec.kernel_size, key=key),
                     scale)


def _along(objective, thetas, fn):
    f = jax.jit(jax.vmap(fn))
    return np.asarray(f(jnp.asarray(thetas)))


def trajectory_metrics(cfg: FlowExperimentConfig, model, data, traj) -> tuple[dict, dict]:
    """Metrics (for checks) and arrays along a trajectory: loss, norm, alignment, margins, balance, neurons."""
    objective, _ = make_objective(model, data, cfg.loss)
    thetas = np.asarray(traj.thetas)
    L = traj.degree
    dirs = thetas / np.maximum(np.linalg.norm(thetas, axis=1, keepdims=True), 1e-300)
    arrays = {"t": np.asarray(traj.ts, float), "loss": np.asarray(traj.loss), "log_loss": np.asarray(traj.log_loss),
              "norm": np.asarray(traj.norm), "theta_final": thetas[-1], "thetas": thetas}
    arrays["alignment_final_dir"] = dirs @ dirs[-1]
    arrays["alignment_init_dir"] = dirs @ dirs[0]
    m = {
        "loss_final": float(traj.loss[-1]),
        "log_loss_final": float(traj.log_loss[-1]),
        "norm_final": float(traj.norm[-1]),
        "success": 1.0 if traj.success else 0.0,
        "num_steps": float(traj.stats.get("num_steps") or 0),
        "alignment_final": float(dirs[-1] @ dirs[-2]) if len(dirs) > 1 else 1.0,
    }
    esc = np.flatnonzero(np.asarray(traj.norm) >= 10 * traj.norm[0])
    m["escape_time"] = float(traj.ts[esc[0]]) if esc.size else float("nan")
    y = objective.y
    outs = _along(objective, thetas, lambda th: objective.outputs(th))
    if cfg.loss != "square":
        q = outs * np.asarray(y)[None, :]
        qmin = q.min(axis=1)
        rho_L = np.maximum(np.linalg.norm(thetas, axis=1), 1e-300) ** L
        arrays["normalized_margin"] = qmin / rho_L
        if cfg.loss == "exponential":
            arrays["smoothed_margin"] = -np.asarray(traj.log_loss) / rho_L
        else:
            lv = np.asarray(traj.log_loss)
            Lv = np.exp(lv)
            ratio = np.where(Lv < 1e-8, 1.0 + 0.5 * Lv, np.expm1(np.minimum(Lv, 700)) / np.where(Lv < 1e-8, 1.0, Lv))
            arrays["smoothed_margin"] = -(lv + np.log(ratio)) / rho_L
        m["normalized_margin_final"] = float(arrays["normalized_margin"][-1])
        m["smoothed_margin_final"] = float(arrays["smoothed_margin"][-1])
        m["min_margin_final"] = float(qmin[-1])
    else:
        m["normalized_margin_final"] = m["smoothed_margin_final"] = m["min_margin_final"] = float("nan")
    if isinstance(model, TwoLayer):
        width = model.a.shape[0]
        a = thetas[:, :width]
        W = thetas[:, width:].reshape(len(thetas), width, -1)
        p = model.activation.degree
        bal = p * a**2 - np.sum(W**2, axis=2)
        drift = np.max(np.abs(bal - bal[0]), axis=1) / max(float(np.max(np.asarray(traj.norm))) ** 2, 1e-300)
        arrays["balance_drift"] = drift
        m["balance_drift"] = float(drift.max())
        arrays["neuron_norms"] = np.sqrt(a[-1] ** 2 + np.sum(W[-1] ** 2, axis=1))
        arrays["neuron_index"] = np.arange(width, dtype=float)
    else:
        m["balance_drift"] = float("nan")
    return m, arrays


def _figures(cfg: FlowExperimentConfig, arrays: dict) -> list[Figure]:
    figs = []
    an = set(cfg.analyses)
    if "loss_norm" in an:
        figs.append(Figure("loss_norm", "loss and norm along the flow", "t", ("loss", "norm"), ("loss", "||theta||"),
                           xlabel="t", logx=True, logy=True, display="loss_norm"))
    if "alignment" in an:
        figs.append(Figure("alignment", "direction alignment", "t", ("alignment_final_dir", "alignment_init_dir"),
                           ("cos(theta(t), theta(T))", "cos(theta(t), theta(0))"), xlabel="t", logx=True,
                           display="alignment"))
    if "margins" in an and "normalized_margin" in arrays:
        figs.append(Figure("margins", "margins along the flow", "t", ("normalized_margin", "smoothed_margin"),
                           ("normalized margin", "smoothed margin"), xlabel="t", logx=True, display="margins"))
    if "balance" in an and "balance_drift" in arrays:
        figs.append(Figure("balance", "conserved balance p a_j^2 - ||w_j||^2: relative drift", "t",
                           ("balance_drift",), ("max_j drift / max ||theta||^2",), xlabel="t", logx=True, logy=True,
                           display="errors"))
    if "neurons" in an and "neuron_norms" in arrays:
        figs.append(Figure("neurons", "neuron norms at the end (sparsity)", "neuron_index", ("neuron_norms",),
                           ("sqrt(a_j^2 + ||w_j||^2)",), xlabel="neuron", kind="bar", logy=True, display="sparsity"))
    return figs


def _default_checks(cfg: FlowExperimentConfig) -> tuple[CheckSpec, ...]:
    checks = [CheckSpec("success", 1.0, ">=", "the flow reached its end (or its stop event)")]
    if cfg.model.kind == "two_layer" and cfg.flow.method == "flow":
        checks.append(CheckSpec("balance_drift", max(1e3 * cfg.flow.rtol, 1e-10), "<=",
                                "conserved balance p a_j^2 - ||w_j||^2 kept (relative drift)"))
    return tuple(checks)


def run_flow_config(cfg: FlowExperimentConfig, ctx: Context) -> Outcome:
    """Run the flow ``cfg`` describes; checkpoints through ``ctx`` (resumable)."""
    data = build_data(cfg.data)
    data.check_for(cfg.loss)
    model = build_model(cfg.model, data.d, scale=cfg.init.scale, seed=cfg.init.seed)
    f = cfg.flow
    ctx.progress(0.0, "building the flow")
    if f.method == "flow":
        events = []
        if f.stop_loss > 0:
            events.append(LossBelow(f.stop_loss))
        if f.stop_norm > 0:
            events.append(NormAbove(f.stop_norm))
        traj = segmented_flow(model, data, loss=cfg.loss, t1=f.t1, segments=f.segments, n_save=f.n_save,
                              rtol=f.rtol, atol=f.atol or None, solver=f.solver, time=f.time, events=events or None,
                              max_steps=f.max_steps, ctx=ctx, name="flow", progress=(0.0, 0.9))
    else:
        ctx.progress(0.05, f"{f.method}: {f.steps} steps, lr {f.lr:g}")
        if f.method == "gd":
            traj = gradient_descent(model, data, loss=cfg.loss, lr=f.lr, steps=f.steps, save_every=f.save_every)
        elif f.method == "sgd":
            traj = sgd(model, data, loss=cfg.loss, lr=f.lr, steps=f.steps, save_every=f.save_every,
                       batch_size=f.batch_size or max(1, data.n // 4), seed=cfg.seed)
        else:
            traj = adam(model, data, loss=cfg.loss, lr=f.lr, steps=f.steps, save_every=f.save_every)
    ctx.progress(0.92, "analyses")
    metrics, arrays = trajectory_metrics(cfg, model, data, traj)
    specs = cfg.checks or _default_checks(cfg)
    checks = [check(c.label, metrics[c.metric], c.tolerance, c.relation, f"metric {c.metric}") for c in specs]
    summary = {"reason": traj.reason, **{k: v for k, v in metrics.items() if math.isfinite(v)},
               "stats": {k: v for k, v in traj.stats.items() if v is not None}, "degree": int(traj.degree),
               "n_params": int(arrays["theta_final"].size), "n_data": int(data.n)}
    return Outcome(checks=checks, arrays=arrays, figures=_figures(cfg, arrays), summary=summary)


def _validate(params: dict) -> None:
    FlowExperimentConfig.from_dict(params)


@register("flow", description="A gradient flow you describe: data, model, initialisation, loss, flow or optimiser, "
                              "analyses, checks (see examples/*.toml).", defaults=FLOW_DEFAULTS, validate=_validate)
def flow_experiment(params: dict, ctx: Context) -> Outcome:
    return run_flow_config(FlowExperimentConfig.from_dict(params), ctx)
