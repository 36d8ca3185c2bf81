"""GPU throughput of batched gradient flows (issue 7), sized to run in under 5 minutes on one H100/H200.

Not yet run on a GPU (written and smoke-tested on a CPU with ``--smoke``). Prints, for batch sizes up to 8,192 of the
canonical problem (float64): raw ``vmap(grad)`` throughput (gradients per second), homflow's batched engine
(trajectories and member-gradients per second to t1 = 60, the early phase, and to t1 = 120 past the escape), and
``jax.vmap`` of a diffrax Tsit5 solve for comparison. Targets: batched >= 30% of the raw throughput at B >= 8192 and
>= 10x the vmapped diffrax solve.

    python benchmarks/gpu.py            # on the GPU machine
    python benchmarks/gpu.py --smoke    # tiny sizes, any machine
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _canon import device_line, problem, timed

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from homflow.flow import gradient_flow_batch  # noqa: E402
from homflow.flow._batched import EngineOptions, _engine  # noqa: E402
from homflow.flow._ode import _field_linear  # noqa: E402


def raw_throughput(objective, thetas, calls=200):
    g = jax.vmap(objective.velocity)
    loop = jax.jit(lambda th: jax.lax.fori_loop(0, calls, lambda i, t: t + 1e-12 * g(t), th))
    _, w = timed(lambda: loop(thetas))
    return calls * thetas.shape[0] / w


def engine_run(objective, thetas, t1, rtol):
    atol = rtol * jnp.linalg.norm(thetas, axis=1)
    f = lambda: _engine(_field_linear, objective, thetas, jnp.asarray(0.0), jnp.asarray(t1),  # noqa: E731
                        jnp.asarray([0.0, t1]), jnp.asarray(rtol), atol, None, EngineOptions(), 1_000_000)
    res, w = timed(lambda: jax.block_until_ready(f()))
    stats = res[-1]
    return w, int(jnp.sum(stats["n_f"])), int(stats["batched_f"]), bool(jnp.all(res[4] == 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    print(device_line())
    sizes = [8, 16] if args.smoke else [1024, 8192, 32768]
    horizons = [10.0] if args.smoke else [60.0, 120.0]
    model, data, objective, _ = problem(1)
    for B in sizes:
        _, _, _, thetas = problem(B)
        th = jnp.asarray(thetas)
        raw = raw_throughput(objective, th)
        print(f"\nB = {B}: raw vmap(grad) {raw:.3g} gradients/s")
        for t1 in horizons:
            t = time.perf_counter()
            w, member_evals, batched, ok = engine_run(objective, th, t1, 1e-8)
            print(f"  homflow batched to t1 = {t1:g}: {w:.3g} s, {B / w:.3g} trajectories/s, "
                  f"{member_evals / w:.3g} member-gradients/s ({member_evals / w / raw:.0%} of raw), "
                  f"{batched} batched evaluations, all reached t1: {ok}")
            if time.perf_counter() - t > 120:
                print("  (stopping: the time budget of this script is 5 minutes)")
                return
        if B <= 8192:
            t = time.perf_counter()
            _, w = timed(lambda: gradient_flow_batch(model, data, np.asarray(thetas[: min(B, 1024)]), method="vmap",
                                                     loss="square", t1=horizons[0], rtol=1e-8, ts=[0.0, horizons[0]]),
                         repeats=2)
            nb = min(B, 1024)
            print(f"  jax.vmap(diffrax Tsit5) to t1 = {horizons[0]:g}, B = {nb}: {w:.3g} s, {nb / w:.3g} trajectories/s")


if __name__ == "__main__":
    main()
