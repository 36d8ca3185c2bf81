"""Benchmark of the non-smooth (Clarke / Filippov) flow of ReLU-type networks (issue 11; docs/nonsmooth.md).

Measures, for random non-toy problems (n 30..100, d 3..10, width 10..50; random and teacher labels; ReLU and leaky
ReLU; logistic, exponential and square losses): wall time to t1 = 1000 (linear time) and to 1e6 (log time), steps,
events, sliding modes, the energy identity ``L(0) - L(T) = int ||dtheta/dt||^2`` and monotonicity of the loss; the
issue's failing case; depth-3 MLPs; gradient descent against the flow at t = 20 as lr -> 0 with a Richardson
extrapolation; the split identity ``eta(t) = T theta(t)`` of 2505.12419 through the late phase with a negative control.

    .venv/bin/python benchmarks/nonsmooth.py            # everything (long on a loaded CPU)
    .venv/bin/python benchmarks/nonsmooth.py --only issue,gd,split --quick
    .venv/bin/python benchmarks/nonsmooth.py --only mlp --problems 0,1,2,3,4,5,6,7,8,9 --modes linear --budget 300

Several flows on one machine: one process per core, single-threaded (docs/performance.md, "Several flows at once on a
CPU"; one flow gains ~5% from a second core, two unpinned ones slow each other 4-5x), e.g. the depth-3 flows of
docs/nonsmooth.md's late-night table:

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c 0 \\
        .venv/bin/python benchmarks/nonsmooth.py --only mlp --problems 3 --modes linear --max-steps 100000000 &
"""

from __future__ import annotations

import argparse
import json
import os
import time

import homflow

homflow.enable_x64()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from homflow.activations import leaky_relu, relu  # noqa: E402
from homflow.data import sphere, teacher_student  # noqa: E402
from homflow.flow import gradient_descent  # noqa: E402
from homflow.flow._nonsmooth import ClarkeFlow, nonsmooth_flow  # noqa: E402
from homflow.models import MLP, TwoLayer  # noqa: E402


MAX_STEPS = 200_000  # per flow: a flow that needs more is reported as not reaching t1 (the sweep stays bounded)


def _load():
    return os.getloadavg()[0]


def _summ(tr, wall, cpu=None):
    L = tr.loss
    drop = L[0] - L[-1]
    E = tr.extras["energy"][-1]
    st = tr.stats
    return dict(ok=tr.success, t_end=float(tr.ts[-1]), wall_s=round(wall, 2),
                cpu_s=None if cpu is None else round(cpu, 2), steps=st["num_steps"],
                events=st["events"], pattern_changes=st["pattern_changes"], sliding_entered=st["sliding_entered"],
                sliding_left=st["sliding_left"], max_sliding=st["max_sliding"],
                energy_rel=float(abs(drop - E) / drop) if drop > 0 else None,
                monotone=bool(np.all(np.diff(L) <= 1e-14 * L[0])), loss_end=float(L[-1]),
                constraint_residual=st["max_constraint_residual"], repelling_from=st.get("repelling_from"),
                repelling_units=st.get("repelling_units"), reason=tr.reason, load=round(_load(), 1))


def _data(n, d, labels, seed):
    if labels == "teacher":
        return teacher_student(n, d, teacher_width=3, seed=seed, labels="sign")
    return sphere(n, d, seed=seed)


def random_problems(k, seed=0):
    """``k`` random two-layer problems of the draw ``seed`` (0: the documented sweep); each problem's data and
    initialisation seed is its index, offset by ``1000 seed`` in the other draws."""
    rng = np.random.default_rng(seed)
    losses = ["logistic", "exponential", "square"]
    out = []
    for i in range(k):
        n, d, m = int(rng.integers(30, 101)), int(rng.integers(3, 11)), int(rng.integers(10, 51))
        act = relu if i % 2 == 0 else leaky_relu(float(rng.choice([0.1, 0.2])))
        labels = "random" if i % 3 != 2 else "teacher"
        loss = losses[i % 3]
        scale = float(rng.choice([0.1, 1.0]))
        out.append(dict(n=n, d=d, width=m, act=act, labels=labels, loss=loss, scale=scale, seed=1000 * seed + i))
    return out


CROSSINGS = True  # ClarkeFlow(crossings=...) of the random problems (--no-crossings)


class _OverBudget(Exception):
    pass


def run_flow(p, t1, time_mode, depth=2, rtol=1e-8, budget_s=None):
    """One flow; with ``budget_s`` it is abandoned after that much wall time (returns ``(None, wall, cpu, t)``, ``t``
    the time reached, else ``(trajectory, wall, cpu, t1)``)."""
    from homflow.flow import log_times
    from homflow.flow._clarke import make_kinked
    from homflow.flow._nonsmooth import integrate_nonsmooth
    from homflow.flow._ode import _setup

    data = _data(p["n"], p["d"], p["labels"], p["seed"])
    key = jax.random.PRNGKey(100 + p["seed"])
    if depth == 2:
        model = TwoLayer(p["d"], p["width"], p["act"], key=key, scale=p["scale"])
    else:
        model = MLP(p["d"], (p["width"],) * (depth - 1), p["act"], key=key, scale=p["scale"])
    t0, c0 = time.perf_counter(), time.process_time()
    reached = [0.0]

    def progress(t, stats):
        reached[0] = t
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            raise _OverBudget

    objective, theta = _setup(model, data, p["loss"], None)
    try:
        tr = integrate_nonsmooth(make_kinked(objective, model), theta, log_times(t1, 40), t1,
                                 log_time=time_mode == "log", solver=ClarkeFlow(rtol=rtol, max_steps=MAX_STEPS,
                                                                   crossings=CROSSINGS),
                                 progress=progress)
    except _OverBudget:
        return None, time.perf_counter() - t0, time.process_time() - c0, reached[0]
    return tr, time.perf_counter() - t0, time.process_time() - c0, t1


def bench_random(k, depth=2, budget_s=None, only=None, modes=("linear", "log"), seed=0):
    rows = []
    for i, p in enumerate(random_problems(k, seed=seed)):
        if only is not None and i not in only:
            continue
        for t1, tm in ((1e3, "linear"), (1e6, "log")):
            if tm not in modes:
                continue
            tr, wall, cpu, reached = run_flow(p, t1, tm, depth=depth, budget_s=budget_s)
            head = dict(index=i, seed=seed, problem={**p, "act": p["act"].name}, depth=depth, t1=t1, time=tm)
            if tr is None:
                row = dict(head, ok=False, t_end=reached, wall_s=round(wall, 2), cpu_s=round(cpu, 2),
                           reason=f"over the {budget_s:g} s budget at t = {reached:.4g}", load=round(_load(), 1))
                print(json.dumps(row), flush=True)
                rows.append(row)
                continue
            row = dict(head, **_summ(tr, wall, cpu))
            print(json.dumps(row), flush=True)
            rows.append(row)
        # every problem compiles its own kernels (data shape, sliding-set capacities, methods): without this, one
        # process running the whole sweep exhausts XLA's CPU code memory ("LLVM ERROR: Unable to allocate section
        # memory", seen at the 19th flow)
        jax.clear_caches()
    return rows


def bench_issue(modes=(("linear", 1e3), ("log", 1e6))):
    rows = []
    data = sphere(50, 5, seed=0)
    for (tm, t1), scale in [(m, s) for m in modes for s in (0.1, 1e-3)]:
        model = TwoLayer(5, 20, relu, key=jax.random.PRNGKey(1), scale=scale)
        t0, c0 = time.perf_counter(), time.process_time()
        tr = nonsmooth_flow(model, data, loss="logistic", t1=t1, time=tm, n_save=40, max_steps=MAX_STEPS)
        row = dict(case=f"issue: relu logistic n50 d5 w20 scale {scale}, t1 = {t1:g} ({tm} time)",
                   **_summ(tr, time.perf_counter() - t0, time.process_time() - c0))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# GD against the flow at t = 20: the documented problem first, then three it was never tuned on (name, data, model)
GD_PROBLEMS = [
    ("relu, logistic, sphere n 30 d 4, width 10, init 0.5",
     lambda: sphere(30, 4, seed=3), lambda: TwoLayer(4, 10, relu, key=jax.random.PRNGKey(7), scale=0.5), "logistic"),
    ("leaky 0.2, exponential, teacher n 40 d 5, width 12, init 0.7",
     lambda: teacher_student(40, 5, teacher_width=3, seed=21),
     lambda: TwoLayer(5, 12, leaky_relu(0.2), key=jax.random.PRNGKey(31), scale=0.7), "exponential"),
    ("relu, square, sphere n 35 d 6, width 15, init 0.5",
     lambda: sphere(35, 6, seed=22), lambda: TwoLayer(6, 15, relu, key=jax.random.PRNGKey(32), scale=0.5), "square"),
    ("depth-3 MLP (8, 8), leaky 0.1, logistic, sphere n 30 d 4, init 0.8",
     lambda: sphere(30, 4, seed=23), lambda: MLP(4, (8, 8), leaky_relu(0.1), key=jax.random.PRNGKey(33), scale=0.8),
     "logistic"),
]


def bench_gd(T=20.0, lr0=1e-2, lr_min=1e-5, max_err=1e-2, problems=None):
    """GD's endpoint at ``T`` against the flow's (rtol 1e-11) for ``lr = lr0, lr0 / 2, ...``, halving until the error
    has fallen by 1.5..3x over two halvings in a row from below ``max_err`` (first order: GD -> the flow; a large
    error falling by chance is not the asymptotic regime) or ``lr`` passes ``lr_min``. How
    small ``lr`` must be depends on the problem: an error of GD's size at a near-grazing kink (a unit's pre-activation
    turning back within ``delta scale`` of its kink on the flow) takes GD across it when ``O(lr) > delta``, and the
    two trajectories part by O(1) (docs/nonsmooth.md, "Gradient descent against the flow")."""
    rows = []
    for i, (name, data_fn, model_fn, loss) in enumerate(GD_PROBLEMS):
        if problems is not None and i not in problems:
            continue
        data, model = data_fn(), model_fn()
        t0 = time.perf_counter()
        tr = nonsmooth_flow(model, data, loss=loss, t1=T, ts=[0.0, T], rtol=1e-11)
        ref = tr.thetas[-1]
        lrs, ends, errs = [], [], []
        lr = lr0
        while lr >= lr_min:
            gd = gradient_descent(model, data, loss=loss, lr=lr, steps=int(round(T / lr)))
            lrs.append(lr)
            ends.append(np.asarray(gd.thetas[-1]))
            errs.append(float(np.linalg.norm(ends[-1] - ref) / np.linalg.norm(ref)))
            r = [errs[j] / errs[j + 1] for j in range(len(errs) - 1)]
            if len(r) >= 2 and all(1.5 <= x <= 3.0 for x in r[-2:]) and errs[-3] < max_err:
                break
            lr /= 2
        ratios = [errs[j] / errs[j + 1] for j in range(len(errs) - 1)]
        first = next((lrs[j] for j in range(len(ratios) - 1)
                      if all(1.5 <= x <= 3.0 for x in ratios[j:]) and errs[j] < max_err), None)
        rich = [float(np.linalg.norm(2 * ends[j + 1] - ends[j] - ref) / np.linalg.norm(ref))
                for j in range(len(lrs) - 1)]
        row = dict(case=f"GD vs flow at t = {T:g} ({name})", flow_ok=tr.success, flow_events=tr.stats["events"],
                   flow_repelling_from=tr.stats["repelling_from"],
                   lrs=lrs, gd_rel_err=errs, ratios=ratios, first_order_from_lr=first, richardson_rel_err=rich,
                   wall_s=round(time.perf_counter() - t0, 1), load=round(_load(), 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_split(t1=1e6, rtol=1e-8):
    from homflow.embedding import split
    from homflow.flow._nonsmooth_joint import joint_nonsmooth_flow

    data = sphere(40, 4, seed=5)
    narrow = TwoLayer(4, 8, leaky_relu(0.1), key=jax.random.PRNGKey(11), scale=1.0)
    sp = split(narrow, neuron=0, coeffs=(0.6, 0.8))
    rows = []
    for name, pert in (("split T theta", 0.0), ("negative control: eta(0) = T theta(0) + 1e-8 ||theta|| noise", 1e-8)):
        eta0 = sp.apply_flat(jnp.asarray(homflow.models.flatten(narrow)[0]))
        if pert:
            eta0 = eta0 + pert * jnp.linalg.norm(eta0) * jax.random.normal(jax.random.PRNGKey(3), eta0.shape) / \
                np.sqrt(eta0.size)
        t0 = time.perf_counter()
        tn, tw = joint_nonsmooth_flow(sp, narrow, data, loss="exponential", t1=t1, time="log", n_save=30,
                                      wide_theta0=eta0, solver=ClarkeFlow(rtol=rtol))
        T = np.stack([np.asarray(sp.apply_flat(jnp.asarray(th))) for th in tn.thetas])
        dev = np.linalg.norm(tw.thetas - T, axis=1) / np.linalg.norm(T, axis=1)
        row = dict(case=name, rtol=rtol, ok=tn.success, t_end=float(tn.ts[-1]), max_rel_dev=float(dev.max()),
                   final_rel_dev=float(dev[-1]), events=tn.stats["events"], sliding=tn.stats["sliding_entered"],
                   wall_s=round(time.perf_counter() - t0, 1), load=round(_load(), 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    global CROSSINGS, MAX_STEPS
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="issue,random,mlp,gd,split")
    ap.add_argument("--k", type=int, default=10, help="number of random two-layer problems")
    ap.add_argument("--quick", action="store_true", help="3 random problems, 1 MLP")
    ap.add_argument("--budget", type=float, default=None, help="abandon a flow after this many wall seconds")
    ap.add_argument("--problems", default=None,
                    help="comma-separated indices of the problems to run: random and mlp (mlp's default: 0,1), "
                         "gd (GD_PROBLEMS)")
    ap.add_argument("--modes", default="linear,log", help="time modes of the random problems: linear (to t1 = 1000), "
                    "log (to t1 = 1e6), or both")
    ap.add_argument("--split-rtol", type=float, default=1e-8, help="rtol of the split flows (--only split)")
    ap.add_argument("--max-steps", type=int, default=MAX_STEPS,
                    help=f"attempted steps per flow before it counts as not reaching t1 (default {MAX_STEPS:,})")
    ap.add_argument("--seed", type=int, default=0,
                    help="the draw of the random problems (--only random, mlp); 0 is the documented set")
    ap.add_argument("--no-crossings", action="store_true",
                    help="every event to the host (ClarkeFlow(crossings=False)), for comparison")
    args = ap.parse_args()
    CROSSINGS = not args.no_crossings
    if args.max_steps < 1:
        raise SystemExit(f"--max-steps must be an integer >= 1; got {args.max_steps}")
    MAX_STEPS = args.max_steps
    parts = args.only.split(",")
    k = 3 if args.quick else args.k
    print(json.dumps(dict(device=str(jax.devices()[0]), dtype=str(jnp.result_type(float)), cpus=os.cpu_count(),
                          load=round(_load(), 1))), flush=True)
    modes = tuple(args.modes.split(","))
    bad = set(modes) - {"linear", "log"}
    if bad:
        raise SystemExit(f"--modes must name 'linear' and/or 'log'; got {args.modes!r}")
    only = None if args.problems is None else {int(i) for i in args.problems.split(",")}
    for part in parts:
        if part == "issue":
            bench_issue()
        elif part == "random":
            bench_random(k, budget_s=args.budget, only=only, modes=modes, seed=args.seed)
        elif part == "mlp":  # the same problems with two hidden layers of the problem's width (depth 3)
            deep = ({0} if args.quick else {0, 1}) if only is None else only
            bench_random(max(k, max(deep) + 1), depth=3, budget_s=args.budget, only=deep, modes=modes, seed=args.seed)
        elif part == "gd":
            bench_gd(problems=only)
        elif part == "split":
            bench_split(rtol=args.split_rtol)
        else:
            raise SystemExit(f"unknown part {part!r}")


if __name__ == "__main__":
    main()
