"""The built-in ``neuron-pursuit``: Kumar & Haupt's neuron pursuit (arXiv 2509.12154) on its worked example.

Target ``f(x) = 2 s(s(2x_1 + x_3) - s(x_3 - x_2)) - s(s(2x_2 + x_4) + s(x_4 + x_3))`` on ``{-1, +1}^20`` (``s`` = ReLU),
a three-layer ReLU network trained on 1,000 uniform samples; the paper reports that neuron pursuit recovers ``f`` in
5 iterations. Checks: the relative test error on fresh hypercube points, the number of neurons added against the
published 5, every added neuron a certified KKT point of the residual NCF, the training loss never increasing, the loss
drop at each insertion against ``add_scale^2 N_r`` (second-order expansion), plain gradient descent on a network of
the final width from a small random initialisation at equal gradient evaluations, and a two-layer ReLU teacher of known
width whose neuron count neuron pursuit must find.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from ..activations import relu
from ..models import MLP
from ..pursuit import (
    PursuitOptions,
    hypercube,
    labelled,
    neuron_pursuit,
    paper_target,
    relative_error,
    relu_teacher,
    train,
)
from ._registry import Context, Figure, Outcome, check, register

__all__ = ["PURSUIT_DEFAULTS", "PURSUIT_QUICK"]

PURSUIT_DEFAULTS = {
    "d": 20,
    "n_train": 1000,
    "n_test": 10000,
    "data_seed": 0,
    "test_seed": 1,
    "init_scale": 0.1,
    "add_scale": 0.01,
    "lr": 0.05,
    "steps": 4000,
    "n_starts": 16,
    "ascent_steps": 300,
    "max_neurons": 8,
    "loss_tol": 1e-6,
    "seed": 0,
    "published_iterations": 5,
    "iteration_slack": 1,
    "test_tol": 1e-4,
    "insertion_tol": 0.1,
    "insertion_ratio_tol": 0.6,
    "insertion_floor": 1e-9,
    "kkt_tol": 0.05,
    "monotone_tol": 1e-10,
    "baseline_scale": 0.1,
    "baseline_seed": 0,
    "baseline_seeds": 8,
    "teacher": True,
    "teacher_width": 3,
    "teacher_d": 10,
    "teacher_n": 500,
    "teacher_seed": 3,
    "teacher_steps": 4000,
}
PURSUIT_QUICK = {"n_test": 2000, "steps": 2500, "n_starts": 8, "ascent_steps": 200, "teacher_width": 2,
                 "teacher_steps": 2500, "test_tol": 1e-3, "iteration_slack": 2, "baseline_seeds": 3}


def _validate(p: dict) -> None:
    for k in ("d", "n_train", "n_test", "steps", "n_starts", "ascent_steps", "teacher_width", "teacher_d",
              "teacher_n", "teacher_steps", "published_iterations", "baseline_seeds"):
        if int(p[k]) < 1:
            raise ValueError(f"config key `{k}` must be an integer >= 1; got {p[k]!r}.")
    if int(p["d"]) < 4:
        raise ValueError(f"config key `d` must be >= 4 (the target reads x_1 .. x_4); got {p['d']!r}.")
    for k in ("init_scale", "add_scale", "lr", "loss_tol", "test_tol", "insertion_tol", "insertion_ratio_tol",
              "insertion_floor", "kkt_tol", "baseline_scale"):
        if not float(p[k]) > 0:
            raise ValueError(f"config key `{k}` must be > 0; got {p[k]!r}.")
    if int(p["max_neurons"]) < 0 or int(p["iteration_slack"]) < 0:
        raise ValueError("config keys `max_neurons` and `iteration_slack` must be integers >= 0.")


def _options(p: dict, depth: int, steps: int) -> PursuitOptions:
    return PursuitOptions(depth=depth, init_scale=float(p["init_scale"]), add_scale=float(p["add_scale"]),
                          lr=float(p["lr"]), steps=int(steps), n_starts=int(p["n_starts"]),
                          ascent_steps=int(p["ascent_steps"]), max_neurons=int(p["max_neurons"]),
                          loss_tol=float(p["loss_tol"]), seed=int(p["seed"]))


def _arrays(res, prefix=""):
    widths = np.array([s.widths for s in res.steps], dtype=float)
    curve, xs, off = [], [], 0
    for s in res.steps:
        curve.append(s.loss_curve)
        xs.append(off + s.curve_steps)
        off += int(s.curve_steps[-1])
    return {f"{prefix}iteration": np.arange(len(res.steps), dtype=float), f"{prefix}widths": widths,
            f"{prefix}loss_after": res.losses,
            f"{prefix}ncf_value": np.array([s.point.value for s in res.steps]),
            f"{prefix}kkt_residual": np.array([s.point.relative_residual for s in res.steps]),
            f"{prefix}curve_step": np.concatenate(xs).astype(float), f"{prefix}curve_loss": np.concatenate(curve)}


@register("neuron-pursuit", description="Neuron pursuit (2509.12154): grow a ReLU network from its saddles, one "
                                        "certified residual-NCF KKT neuron at a time; the paper's worked example, "
                                        "a teacher of known width, plain GD at equal gradient evaluations.",
          defaults=PURSUIT_DEFAULTS, quick=PURSUIT_QUICK, validate=_validate)
def neuron_pursuit_experiment(params: dict, ctx: Context) -> Outcome:
    p = params
    t_start = time.perf_counter()
    target = paper_target(int(p["d"]))
    data = labelled(target, hypercube(int(p["n_train"]), int(p["d"]), seed=int(p["data_seed"])))
    X_test = hypercube(int(p["n_test"]), int(p["d"]), seed=int(p["test_seed"]))
    opts = _options(p, 3, int(p["steps"]))
    res = neuron_pursuit(data, opts, progress=lambda f, m: ctx.progress(0.6 * f, m))
    errs = np.array([relative_error(s.model, target, X_test) for s in res.steps])
    added = len(res.steps) - 1
    checks, summary = [], {"stop_reason": res.stop_reason, "widths": list(res.widths), "neurons_added": added,
                           "layers": [s.layer for s in res.steps[1:]]}
    checks.append(check("worked example: relative test error on fresh hypercube points", float(errs[-1]),
                        float(p["test_tol"]), "<=", f"{int(p['n_test'])} fresh points of {{-1,+1}}^{int(p['d'])}; "
                        f"final widths {res.widths} (the target's: (4, 2))"))
    checks.append(check("worked example: iterations, the width-one start included (published: 5)",
                        float(len(res.steps)), float(int(p["published_iterations"]) + int(p["iteration_slack"])),
                        "<=", f"{added} neurons added to the width-one start; stopped: {res.stop_reason}"))
    rel = np.array([s.point.relative_residual for s in res.steps[1:]] or [0.0])
    rtol = res.steps[-1].point.rtol
    n_cert = sum(s.point.certified for s in res.steps[1:])
    summary.update(kkt_certified=f"{n_cert} of {added} added neurons certified to {rtol:.1e}",
                   kkt_relative_residuals=[float(x) for x in rel])
    checks.append(check("every added neuron is a KKT point of the residual NCF (max relative Clarke residual)",
                        float(rel.max()), float(p["kkt_tol"]), "<=",
                        f"{n_cert} of {added} certified to {rtol:.1e} (exact on their activation piece); the others "
                        "are ascent end points on a kink whose exact polish did not converge (docs/math.md 4, 6)"))
    checks.append(check("the initial width-one network is a certified KKT point of its NCF (relative residual)",
                        float(res.steps[0].point.relative_residual), float(p["kkt_tol"]), "<=",
                        f"certified to {rtol:.1e}: {res.steps[0].point.certified}"))
    la = res.losses
    rise = np.maximum(la[1:] - la[:-1], 0.0) / np.maximum(la[:-1], np.finfo(float).tiny)
    checks.append(check("training loss never increases across iterations (max relative rise)",
                        float(rise.max()) if rise.size else 0.0, float(p["monotone_tol"]), "<=",
                        "an inserted neuron lowers the loss to leading order and descent then lowers it further "
                        "(monotone_tol allows rounding)"))
    from ..pursuit import insertion_errors

    ins = insertion_errors(res, data, (1.0, 0.5))
    if ins.size:
        from .phases import info

        checks.append(info("insertion: loss drop vs d^2 N_r / n at d = add_scale (max relative error)",
                           float(ins[:, 0].max()), float(p["insertion_tol"]),
                           "the leading order of L(w + d z) = L(w) - (d^2 / n) N_r(z) + O(d^3); its size at a finite d "
                           "depends on N_r and the curvature, so it is reported, and its order is checked below"))
        big = ins[:, 0] > float(p["insertion_floor"])  # errors at rounding level carry no order
        ratio = float((ins[big, 1] / ins[big, 0]).max()) if big.any() else 0.0
        checks.append(check("insertion: the loss drop's error shrinks with d (error at d/2 over error at d, max)",
                            ratio, float(p["insertion_ratio_tol"]), "<=",
                            "remainder O(d^4) off kinks (ratio 1/4), O(d^3) with a downstream unit on a kink (1/2); "
                            f"{int(big.sum())} of {ins.shape[0]} insertions above the rounding floor"))

    # Plain gradient descent on the final architecture, from small random initialisations (several seeds: whether
    # plain GD leaves the plateaus within the budget depends on the start), at equal gradient evaluations (loss
    # gradients of neuron pursuit + its NCF-ascent gradients, each over the same n samples).
    ctx.progress(0.6, "plain gradient descent on the final architecture at equal gradient evaluations")
    budget = res.grad_evals + res.ncf_evals
    perrs, pcurve, psteps, pev = [], None, None, 0
    for i in range(int(p["baseline_seeds"])):
        plain0 = MLP(int(p["d"]), res.widths, relu, key=jax.random.PRNGKey(int(p["baseline_seed"]) + i),
                     scale=float(p["baseline_scale"]))
        plain, curve_i, steps_i, pev = train(plain0, data, lr=opts.lr, steps=budget)
        perrs.append(relative_error(plain, target, X_test))
        if pcurve is None:
            pcurve, psteps = curve_i, steps_i
    perrs = np.array(perrs)
    med = float(np.median(perrs))
    n_ok = int(np.sum(perrs <= float(p["test_tol"])))
    tiny = np.finfo(float).tiny
    summary.update(np_test_error=float(errs[-1]), plain_test_errors=[float(e) for e in perrs],
                   plain_median_test_error=med, plain_recovered=f"{n_ok} of {len(perrs)}", grad_evals=res.grad_evals,
                   ncf_evals=res.ncf_evals, plain_grad_evals=pev, np_train_loss=float(la[-1]),
                   np_over_plain_median=float(errs[-1] / max(med, tiny)))
    checks.append(check("neuron pursuit vs plain GD of the final width at equal gradient evaluations (test error "
                        "ratio NP / median over plain starts)", float(errs[-1] / max(med, tiny)), 1.0, "<=",
                        f"plain: {pev} steps from ||theta(0)|| = {p['baseline_scale']}, {len(perrs)} seeds; "
                        f"{n_ok} of {len(perrs)} reach test error <= {p['test_tol']:g} (best {perrs.min():.2g}), "
                        f"median {med:.3g}"))
    arrays = _arrays(res)
    arrays["test_error"] = errs
    arrays["plain_step"] = psteps.astype(float)
    arrays["plain_loss"] = pcurve
    arrays["plain_seed"] = np.arange(len(perrs), dtype=float)
    arrays["plain_test_error"] = np.maximum(perrs, tiny)
    k = min(500, int(p["n_test"]))
    arrays["test_target"] = np.asarray(jax.vmap(target)(jax.numpy.asarray(X_test[:k])))
    arrays["test_learned"] = np.asarray(jax.vmap(res.model)(jax.numpy.asarray(X_test[:k])))
    figs = [
        Figure("architecture", "architecture per iteration (hidden widths)", "iteration", ("widths",),
               ("layer 1", "layer 2"), xlabel="iteration", ylabel="width"),
        Figure("loss_iterations", "training loss and test error after each iteration", "iteration",
               ("loss_after", "test_error"), ("mean training loss", "relative test error"), xlabel="iteration",
               logy=True),
        Figure("loss_curve", "training loss along the descents vs plain GD of the final width", "curve_step",
               ("curve_loss",), ("neuron pursuit",), xlabel="gradient-descent step", ylabel="mean loss", logy=True),
        Figure("plain_curve", "plain GD of the final width from a small random start (first seed)", "plain_step",
               ("plain_loss",), ("plain GD",), xlabel="gradient-descent step", ylabel="mean loss", logy=True),
        Figure("plain_seeds", "plain GD at equal gradient evaluations: test error per random start", "plain_seed",
               ("plain_test_error",), ("plain GD",), xlabel="seed", ylabel="relative test error", logy=True,
               kind="scatter", hlines=(float(errs[-1]),)),
        Figure("learned_vs_target", "learned function vs target on held-out hypercube points", "test_target",
               ("test_learned",), ("learned",), xlabel="target f(x)", ylabel="learned", kind="scatter"),
    ]

    if p["teacher"]:
        ctx.progress(0.75, "second target: a two-layer ReLU teacher of known width")
        tw, td = int(p["teacher_width"]), int(p["teacher_d"])
        teacher = relu_teacher(td, tw, seed=int(p["teacher_seed"]))
        tdata = labelled(teacher, hypercube(int(p["teacher_n"]), td, seed=int(p["data_seed"])))
        tres = neuron_pursuit(tdata, _options(p, 2, int(p["teacher_steps"])),
                              progress=lambda f, m: ctx.progress(0.75 + 0.25 * f, "teacher: " + m))
        terr = relative_error(tres.model, teacher, hypercube(int(p["n_test"]), td, seed=int(p["test_seed"])))
        checks.append(check(f"teacher of width {tw}: |neurons found - {tw}|", abs(tres.widths[0] - tw), 0.0, "<=",
                            f"found widths {tres.widths}; stopped: {tres.stop_reason}"))
        checks.append(check(f"teacher of width {tw}: relative test error", terr, float(p["test_tol"]), "<=",
                            f"fresh points of {{-1,+1}}^{td} (test_tol, as for the worked example)"))
        arrays.update(_arrays(tres, "teacher_"))
        summary.update(teacher_widths=list(tres.widths), teacher_test_error=float(terr),
                       teacher_stop_reason=tres.stop_reason)
        figs.append(Figure("teacher_loss", f"teacher of width {tw}: training loss after each iteration",
                           "teacher_iteration", ("teacher_loss_after",), ("mean training loss",),
                           xlabel="iteration (neurons = iteration + 1)", logy=True))
    summary["seconds"] = time.perf_counter() - t_start
    summary["seconds_by_iteration"] = [dict(s.seconds) for s in res.steps]
    return Outcome(checks=checks, arrays=arrays, figures=figs, summary=summary)
