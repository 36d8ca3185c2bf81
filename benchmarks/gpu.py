"""GPU throughput of batched gradient flows (issues 7 and 12), sized to run in a few minutes on one H100/H200.

Not yet run on a GPU: written and smoke-tested on a CPU (``--smoke``). For batch sizes B = 8,192 .. 65,536 of the
canonical problem (float64; the canonical directions, delta = 1e-3) it prints, in one run:

* raw ``vmap(grad)``: gradients per second of a compiled loop of batched gradients (the floor of any batched flow);
* homflow's batched engine (:func:`homflow.flow.ode_batch` on the gradient field, the stiff-aware DOPRI5/RKC
  integrator that the census drives), with the stage lock step (the census's default) and the step lock step:
  trajectories per second and member-gradients per second to t1 = 60 (the early phase) and t1 = 120 (past the
  escape), and that rate as a fraction of the raw one (target >= 30%);
* ``jax.vmap`` of a diffrax Tsit5 solve (PID controller, the same tolerances) on the same members to t1 = 60, at the
  smallest B only (every member takes the steps of the stiffest; it is slow): trajectories per second, and the engine's
  speed-up over it (DiffEqGPU reports 38x over vmapped diffrax on Lorenz).

Each timing compiles first and then times a second call with ``block_until_ready``.

    python benchmarks/gpu.py                 # on the GPU machine (B = 8192, 16384, 32768, 65536)
    python benchmarks/gpu.py --sizes 8192    # one size
    python benchmarks/gpu.py --smoke         # tiny sizes, any machine (seconds)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _canon import device_line, problem, timed

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from homflow.flow import ode_batch  # noqa: E402


def _field(t, theta, objective):
    return objective.velocity(theta)


def raw_throughput(objective, thetas, calls=200):
    """Batched gradients per second (a fori_loop of ``vmap(velocity)``; the state barely moves)."""
    g = jax.vmap(objective.velocity)
    loop = jax.jit(lambda th: jax.lax.fori_loop(0, calls, lambda i, t: t + 1e-12 * g(t), th))
    _, w = timed(lambda: loop(thetas))
    return calls * thetas.shape[0] / w


def engine_run(objective, thetas, t1, rtol, lockstep="stage"):
    """(wall s, member gradient evaluations, batched evaluations, all reached t1) of the batched engine."""
    atol = 0.1 * rtol * np.linalg.norm(np.asarray(thetas), axis=1)

    def go():
        return ode_batch(_field, thetas, t1, args=objective, ts=[0.0, t1], rtol=rtol, atol=atol,
                         max_steps=2_000_000, lockstep=lockstep)

    sol, w = timed(go)
    return w, int(sol.stats["grad_evals"].sum()), int(sol.stats["batched_evals"]), bool(np.all(sol.status == 1))


def diffrax_vmap_run(objective, thetas, t1, rtol, max_steps=200_000):
    """(wall s, steps of the batch) of ``jax.vmap`` over a diffrax Tsit5 solve to ``t1``."""
    term = diffrax.ODETerm(lambda t, y, args: args.velocity(y))

    @eqx.filter_jit
    def solve(objective, th0):
        def one(th):
            atol = 0.1 * rtol * jnp.linalg.norm(th)
            sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, t1, None, th, args=objective,
                                      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=0.4,
                                                                                icoeff=0.3, dtmin=None),
                                      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, throw=False)
            return sol.ys[-1], sol.stats["num_steps"]

        return jax.vmap(one)(th0)

    (ys, steps), w = timed(lambda: jax.block_until_ready(solve(objective, thetas)))
    return w, int(np.max(np.asarray(steps)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="B = 8, 16 to t1 = 5 (any machine)")
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--budget", type=float, default=480.0, help="stop starting new sizes after this many seconds")
    args = ap.parse_args()
    print(device_line())
    sizes = [8, 16] if args.smoke else (args.sizes or [8192, 16384, 32768, 65536])
    horizons = [5.0] if args.smoke else [60.0, 120.0]
    rtol = 1e-8
    _, _, objective, _ = problem(1)
    start = time.perf_counter()
    for B in sizes:
        if time.perf_counter() - start > args.budget:
            print(f"(stopping before B = {B}: the time budget of {args.budget:g} s is spent)")
            break
        th = jnp.asarray(problem(B)[3])
        raw = raw_throughput(objective, th)
        print(f"\nB = {B}: raw vmap(grad) {raw:.3g} gradients/s")
        rates = {}
        for t1, lock in [(t1, lock) for t1 in horizons for lock in ("stage", "step")]:
            w, member_evals, batched, ok = engine_run(objective, th, t1, rtol, lock)
            if lock == "stage":
                rates[t1] = B / w
            print(f"  homflow batched engine ({lock} lock step) to t1 = {t1:g}: {w:.3g} s, {B / w:.3g} trajectories/s, "
                  f"{member_evals / w:.3g} member-gradients/s ({member_evals / w / raw:.0%} of raw), "
                  f"utilisation {member_evals / (B * batched):.0%}, all reached t1: {ok}")
        if B == sizes[0]:
            t1 = horizons[0]
            w, steps = diffrax_vmap_run(objective, th, t1, rtol)
            print(f"  jax.vmap(diffrax Tsit5) to t1 = {t1:g}: {w:.3g} s, {B / w:.3g} trajectories/s, {steps} steps "
                  f"(the batch's); homflow engine {rates[t1] / (B / w):.1f}x faster")


if __name__ == "__main__":
    main()
