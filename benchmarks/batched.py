"""Batched gradient flows on the canonical problem: one lock-step loop vs separate calls vs the raw batched gradient.

Prints, for B initial directions (default 64) to t1: wall time of ``gradient_flow_batch(method='batched')``, of B
separate ``gradient_flow`` calls, the number of batched gradient evaluations the loop made, and the time the same
number of raw ``vmap(grad)`` calls takes in a compiled loop (the floor): target on a CPU, batched <= 2x that floor.

    .venv/bin/python benchmarks/batched.py [--batch 64] [--t1 60]
"""

from __future__ import annotations

import argparse

from _canon import device_line, problem, table, timed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from homflow.flow import gradient_flow, gradient_flow_batch  # noqa: E402


def raw_grad_time(objective, thetas, calls: int):
    """Seconds for ``calls`` evaluations of vmap(grad) over the batch inside one compiled loop."""
    g = jax.vmap(objective.velocity)
    loop = jax.jit(lambda th: jax.lax.fori_loop(0, calls, lambda i, t: t + 1e-12 * g(t), th))
    _, w = timed(lambda: loop(thetas))
    return w


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--t1", type=float, default=60.0)
    ap.add_argument("--rtol", type=float, default=1e-9)
    ap.add_argument("--separate", type=int, default=None, help="time only this many separate calls, scale up")
    args = ap.parse_args()
    print(device_line())
    model, data, objective, thetas = problem(args.batch)
    kw = dict(loss="square", t1=args.t1, rtol=args.rtol, ts=[0.0, args.t1])
    out, w_b = timed(lambda: gradient_flow_batch(model, data, thetas, method="batched", **kw))
    loops = out[0].stats.get("batch_loop_iterations")
    n_sep = args.separate or args.batch
    singles, w_s = timed(lambda: [gradient_flow(model, data, theta0=th, **kw) for th in thetas[:n_sep]])
    w_s *= args.batch / n_sep
    batched_evals = int(out[0].stats["batch_batched_evals"])  # the engine's own count of batched evaluations
    w_raw = raw_grad_time(objective, jnp.asarray(thetas), batched_evals)
    per = sum(o.stats["grad_evals"] for o in out)
    table([
        {"what": f"gradient_flow_batch(method='batched'), B={args.batch}", "wall_s": w_b,
         "evals": f"{batched_evals} batched ({per} per-member total)"},
        {"what": f"{args.batch} separate gradient_flow calls", "wall_s": w_s,
         "evals": str(sum(s.stats['grad_evals'] for s in singles) * args.batch // n_sep)},
        {"what": f"raw vmap(grad) x {batched_evals} in a compiled loop", "wall_s": w_raw, "evals": str(batched_evals)},
    ], ["what", "wall_s", "evals"])
    print(f"batched / raw-gradient floor: {w_b / w_raw:.2f} (target <= 2 on a CPU); batched / separate: "
          f"{w_b / w_s:.2f}; lock-step waste: {batched_evals * args.batch / per:.2f}x evaluations per member"
          + (f"; loop iterations {loops}, slot utilisation {out[0].stats['batch_utilisation']:.2f}" if loops else ""))


if __name__ == "__main__":
    main()
