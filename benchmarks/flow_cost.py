"""Cost of integrating the canonical gradient flow (issue 2, "Speed"; issue 7 for the stiff phase).

For t1 = 60 (early phase) and t1 = 250 (through the escape into the stiff phase) prints, per method, the gradient
evaluations, the wall time (best of the runs after the compiling one) and the relative endpoint error against a tight
reference (diffrax Tsit5, rtol 1e-12), then the ratios at the same endpoint accuracy (1e-6); and a batch of 64
initial conditions against 64 separate calls.

    .venv/bin/python benchmarks/flow_cost.py            # ~3-5 min on a 2-core CPU (the t=250 reference is cached)
    .venv/bin/python benchmarks/flow_cost.py --quick    # t1 = 60 only, small batch
    .venv/bin/python benchmarks/flow_cost.py --slow     # adds SciPy DOP853 at t1 = 250 (~1 M Python-level calls)

Gradient evaluations: homflow counts 6 per Dormand-Prince step, s per s-stage RKC step, one per power iteration;
SciPy's BDF/LSODA also use Hessians (jac), counted separately (``hess``) and as gradient-equivalents at 2 P each
(a Hessian is P Hessian-vector products, each ~2 gradients), so the column ``grad-eq`` is comparable.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _canon import (DELTA, device_line, gd_fixed, problem, reference, rel_err, table, timed, torch_available,
                    torch_problem)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

from homflow.flow import gradient_flow, gradient_flow_batch  # noqa: E402

TARGET = 1e-6


def homflow_row(model, data, th0, ref, t1, solver, rtol, **kw):
    tr, wall = timed(lambda: gradient_flow(model, data, loss="square", t1=t1, rtol=rtol, solver=solver, theta0=th0,
                                           ts=[0.0, t1], throw=False, **kw))
    label = f"homflow {solver} rtol {rtol:g}" + (f" atol {kw['atol']:g}" if "atol" in kw else "")
    return {"method": label, "grad_evals": tr.stats["grad_evals"],
            "grad-eq": tr.stats["grad_evals"], "wall_s": wall, "error": rel_err(tr.thetas[-1], ref),
            "steps": tr.stats["num_steps"], "note": tr.reason if not tr.success else
            (f"stiff steps {tr.stats.get('num_stiff_steps', '-')}" if "num_stiff_steps" in tr.stats else "")}


def gd_row(objective, th0, ref, t1, lr, label="GD (JAX, fixed step)"):
    g, steps = gd_fixed(objective, jnp.asarray(th0), t1, lr)
    out, wall = timed(lambda: g(jnp.asarray(th0)))
    err = rel_err(out, ref)
    # fixed-step GD tracks the flow with an error proportional to lr: the lr (and steps) that would reach TARGET
    need = steps * max(err / TARGET, 1.0) if np.isfinite(err) else None
    return {"method": f"{label} lr {lr:g}", "grad_evals": steps, "grad-eq": steps, "wall_s": wall, "error": err,
            "steps": steps, "note": f"~{need:.2g} steps for {TARGET:g}" if need else "diverged"}


def torch_gd_row(th0, ref, t1, lr, max_steps=200_000):
    import torch

    grad, th = torch_problem(th0)
    steps = int(round(t1 / lr))
    run = min(steps, max_steps)
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(run):
            th = th - lr * grad(th)
    wall = (time.perf_counter() - t) * steps / run
    err = rel_err(th.numpy(), ref) if run == steps else None
    return {"method": f"GD (PyTorch, fixed step) lr {lr:g}", "grad_evals": steps, "grad-eq": steps, "wall_s": wall,
            "error": err, "steps": steps, "note": "" if run == steps else f"wall extrapolated from {run} steps"}


def scipy_row(objective, th0, ref, t1, method, rtol, with_jac=False):
    g = jax.jit(lambda th: objective.grad(th))
    H = jax.jit(jax.hessian(lambda th: objective.value(th)))
    P = th0.size
    fun = lambda t, y: -np.asarray(g(jnp.asarray(y)))  # noqa: E731
    jac = (lambda t, y: -np.asarray(H(jnp.asarray(y)))) if with_jac else None  # noqa: E731
    fun(0.0, th0)
    if with_jac:
        jac(0.0, th0)
    kw = {"jac": jac} if with_jac else {}
    t = time.perf_counter()
    sol = solve_ivp(fun, (0.0, t1), np.asarray(th0), method=method, rtol=rtol, atol=rtol * DELTA, **kw)
    wall = time.perf_counter() - t
    njev = int(getattr(sol, "njev", 0) or 0)
    return {"method": f"SciPy {method} rtol {rtol:g}" + (" +Hessian" if with_jac else ""), "grad_evals": sol.nfev,
            "grad-eq": sol.nfev + 2 * P * njev, "wall_s": wall, "error": rel_err(sol.y[:, -1], ref),
            "steps": None, "note": f"hess {njev}" if with_jac else ""}


def torchdiffeq_row(th0, ref, t1, rtol):
    import torch
    from torchdiffeq import odeint

    grad, th = torch_problem(th0)
    count = [0]

    def f(t, y):
        count[0] += 1
        with torch.enable_grad():
            return -grad(y)

    t = time.perf_counter()
    ys = odeint(f, th, torch.tensor([0.0, t1], dtype=torch.float64), method="dopri5", rtol=rtol, atol=rtol * DELTA)
    wall = time.perf_counter() - t
    return {"method": f"torchdiffeq dopri5 rtol {rtol:g}", "grad_evals": count[0], "grad-eq": count[0],
            "wall_s": wall, "error": rel_err(ys[-1].detach().numpy(), ref), "steps": None, "note": ""}


def ratios(rows, ours_prefix="homflow auto"):
    """Ratios of each method's cost to the cheapest homflow run that meets TARGET."""
    ok = [r for r in rows if r["method"].startswith(ours_prefix) and r["error"] is not None and r["error"] <= TARGET]
    if not ok:
        print(f"  no '{ours_prefix}' run met the endpoint error {TARGET:g}")
        return
    best = min(ok, key=lambda r: r["grad-eq"])
    print(f"  reference run: {best['method']} ({best['grad-eq']} grad-eq, {best['wall_s']:.3g} s, "
          f"error {best['error']:.2g})")
    for r in rows:
        if r is best:
            continue
        acc = "meets" if (r["error"] is not None and r["error"] <= TARGET) else "misses"
        print(f"  {r['method']:<42} {r['grad-eq'] / best['grad-eq']:8.1f}x grad-eq  "
              f"{r['wall_s'] / best['wall_s']:8.1f}x wall   ({acc} {TARGET:g})")


def run_t60(model, data, objective, th0):
    t1 = 60.0
    ref = reference(t1)
    rows = [homflow_row(model, data, th0, ref, t1, "auto", r) for r in (1e-8, 1e-9, 1e-10)]
    rows += [homflow_row(model, data, th0, ref, t1, "tsit5", r) for r in (1e-8, 1e-9)]
    rows += [gd_row(objective, th0, ref, t1, lr) for lr in (1e-3, 1e-4)]
    rows += [scipy_row(objective, th0, ref, t1, m, r) for m, r in (("DOP853", 1e-9), ("RK45", 1e-9))]
    rows += [scipy_row(objective, th0, ref, t1, m, 1e-9, True) for m in ("LSODA", "BDF")]
    if torch_available():
        rows.append(torch_gd_row(th0, ref, t1, 1e-3))
        rows.append(torchdiffeq_row(th0, ref, t1, 1e-9))
    return rows


def run_t250(model, data, objective, th0, slow=False):
    t1 = 250.0
    ref = reference(t1)
    rows = [homflow_row(model, data, th0, ref, t1, "auto", r) for r in (1e-8, 1e-9)]
    # atol: the default rtol * ||theta(0)|| = rtol * 1e-3 lets the tiny early-phase weights (~4e-5 each) carry a
    # relative error ~ rtol * 25, which the saddle escapes amplify; atol = 1e-4 rtol = 0.1 rtol ||theta(0)|| (about
    # rtol times a typical weight) makes that phase relative
    rows += [homflow_row(model, data, th0, ref, t1, "auto", r, atol=r * 1e-4) for r in (1e-8, 1e-9)]
    rows.append(homflow_row(model, data, th0, ref, t1, "stiff", 1e-9))
    rows.append(homflow_row(model, data, th0, ref, t1, "tsit5", 1e-8))
    rows.append(homflow_row(model, data, th0, ref, t1, "tsit5", 1e-8, atol=1e-12))
    rows.append(gd_row(objective, th0, ref, t1, 1e-4))
    rows += [scipy_row(objective, th0, ref, t1, m, 1e-9, True) for m in ("LSODA", "BDF")]
    if slow:
        rows.append(scipy_row(objective, th0, ref, t1, "DOP853", 1e-9))
    if torch_available():
        rows.append(torch_gd_row(th0, ref, t1, 1e-4, max_steps=100_000))
    return rows


def run_batch(model, data, thetas0, t1, rtol=1e-9):
    B = thetas0.shape[0]
    kw = dict(loss="square", t1=t1, rtol=rtol, ts=[0.0, t1])
    batch, w_b = timed(lambda: gradient_flow_batch(model, data, thetas0, method="batched", **kw))
    singles, w_s = timed(lambda: [gradient_flow(model, data, theta0=th, **kw) for th in thetas0])
    diff = max(rel_err(b.thetas[-1], s.thetas[-1]) for b, s in zip(batch, singles))
    ev_b = sum(b.stats["grad_evals"] for b in batch)
    ev_s = sum(s.stats["grad_evals"] for s in singles)
    print(f"\nbatch of {B} initial conditions to t1 = {t1:g} (rtol {rtol:g}):")
    table([{"method": f"gradient_flow_batch(method='batched'), B={B}", "wall_s": w_b, "grad_evals": ev_b},
           {"method": f"{B} separate gradient_flow calls", "wall_s": w_s, "grad_evals": ev_s}],
          ["method", "wall_s", "grad_evals"])
    print(f"  batched / separate wall: {w_b / w_s:.2f}; max relative difference of the endpoints: {diff:.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="t1 = 60 only and a batch of 8")
    ap.add_argument("--slow", action="store_true", help="also the slow explicit SciPy baseline at t1 = 250")
    args = ap.parse_args()
    print(device_line(), "| torch:", "yes" if torch_available() else "not installed (skipped)")
    model, data, objective, thetas = problem(64)
    th0 = thetas[0]
    cols = ["method", "grad_evals", "grad-eq", "wall_s", "error", "steps", "note"]
    for t1, fn in ((60.0, run_t60), (250.0, run_t250)):
        if args.quick and t1 > 60:
            break
        print(f"\n== canonical problem to t1 = {t1:g} (target endpoint error {TARGET:g}) ==")
        rows = fn(model, data, objective, th0) if t1 == 60 else fn(model, data, objective, th0, args.slow)
        table(rows, cols)
        ratios(rows)
    run_batch(model, data, thetas[: 8 if args.quick else 64], 60.0)


if __name__ == "__main__":
    main()
