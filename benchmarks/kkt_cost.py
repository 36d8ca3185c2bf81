"""Benchmark: constrained-NCF KKT points found per second (MATH.md section 3).

Width-50 two-layer ReLU^2 network, n = 100 teacher-student samples in d = 5, 256 starts, exponential loss.
Compiles first (a warm-up call on the same shapes), then times one full ``solve_ncf`` (ascent + polish + dedupe) and
prints device, dtype, the number of certified distinct points, starts, and points per second.

    .venv/bin/python benchmarks/kkt_cost.py [--steps 1000] [--starts 256]
"""

from __future__ import annotations

import argparse
import time

import homflow

homflow.enable_x64()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from homflow import kkt  # noqa: E402
from homflow.activations import relu_power  # noqa: E402
from homflow.data import teacher_student  # noqa: E402
from homflow.models import TwoLayer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--starts", type=int, default=256)
    ap.add_argument("--width", type=int, default=50)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--d", type=int, default=5)
    args = ap.parse_args()
    data = teacher_student(args.n, args.d, teacher_width=5, p=2, seed=0)
    model = TwoLayer(args.d, args.width, relu_power(2), key=jax.random.PRNGKey(0))
    # warm-up: compiles the ascent, the Newton polish and the Hessian on these shapes
    kkt.solve_ncf(model, data, loss="exponential", n_starts=args.starts, key=jax.random.PRNGKey(9), steps=args.steps)
    t0 = time.perf_counter()
    sol = kkt.solve_ncf(model, data, loss="exponential", n_starts=args.starts, key=jax.random.PRNGKey(1),
                        steps=args.steps)
    dt = time.perf_counter() - t0
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype: float64")
    print(f"TwoLayer width {args.width}, d {args.d}, n {args.n}, starts {args.starts}, ascent steps {args.steps}")
    print(f"clusters polished: {sol.n_clusters}, certified distinct points: {len(sol)}, uncertified: "
          f"{len(sol.uncertified)}")
    print(f"time: {dt:.2f} s (ascent {sol.seconds['ascent']:.2f} s, polish {sol.seconds['polish']:.2f} s)")
    print(f"points found per second: {len(sol) / dt:.3f}; starts processed per second: {args.starts / dt:.1f}")
    worst = max((p.relative_residual for p in sol), default=float('nan'))
    print(f"worst relative residual: {worst:.2e}; best N(u) = {sol.best.value:.6f} "
          f"(count {sol.best.count}, {sol.best.second_order.kind})")
    for p in sol.points[:10]:
        nz = int(np.sum(np.asarray(p.singular_values[0]) > 1e-10 * p.singular_values[0][0]))
        print(f"  N={p.value:.6f} count={p.count:4d} residual={p.relative_residual:.1e} "
              f"{p.second_order.kind:9s} active neurons={args.width - len(p.vanishing):2d} rank(W)={nz}")


if __name__ == "__main__":
    main()
