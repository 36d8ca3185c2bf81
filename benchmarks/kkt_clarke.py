"""Clarke-aware max-margin certificates on depth-3 leaky-ReLU MLPs after long gradient descent (issue 11).

For each data set: GD with the loss-based schedule (arXiv 1906.05890; exponential loss, 1e5 steps) from a unit-norm
start, then

- ``old``: ``solve_max_margin(..., clarke=False)`` (gradients only: autodiff's slope at kinks), its point scored with
  one subgradient (``smooth_stationarity``) and with Clarke subgradients (``max_margin_kkt`` at kink_tol 1e-6 and
  1e-4): the contrast of issue 11;
- ``new``: ``solve_max_margin`` (Clarke certificate, kink polish, guards): converged, reason, stationarity, kinks,
  distance from the start's direction, normalized margin over the start's, wall time.

(The well-separated ``gaussian_toy`` is not among them: there the loss-based schedule overflows ``log L`` to -1.8e308
within 440 steps and the direction GD leaves is meaningless; ``solve_max_margin`` then refuses the KKT point it finds,
1.03 away, as ``'too_far'``.)

Run: ``OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/kkt_clarke.py [--steps 97000,100000,103000] [--cases 0,1,2,3,4,5]``
(one BLAS thread: the dense solves are small, and a multi-threaded BLAS on a busy machine is far slower).
"""

from __future__ import annotations

import argparse
import time

import homflow

homflow.enable_x64()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from homflow import kkt  # noqa: E402
from homflow.activations import leaky_relu  # noqa: E402
from homflow.data import sphere, teacher_student  # noqa: E402
from homflow.flow import gradient_descent  # noqa: E402
from homflow.models import MLP  # noqa: E402

CASES = [
    ("sphere n=20 d=3", lambda: sphere(20, 3, seed=0, labels="linear")),
    ("teacher n=30 d=4", lambda: teacher_student(30, 4, teacher_width=2, p=1, seed=1)),
    ("sphere random labels n=10 d=5", lambda: sphere(10, 5, seed=5, labels="random")),
    ("sphere n=40 d=5", lambda: sphere(40, 5, seed=3, labels="linear")),
    ("teacher n=10 d=2", lambda: teacher_student(10, 2, teacher_width=2, p=1, seed=4)),
    ("teacher n=40 d=5", lambda: teacher_student(40, 5, teacher_width=2, p=1, seed=2)),
]

KEYS = (0, 1, 5, 3, 4, 2)  # initialisation seed per case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="100000", help="GD steps; a comma-separated list runs each (e.g. 97000,100000,103000)")
    ap.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))))
    ap.add_argument("--old", action="store_true", help="also run the gradient-only solve (slow: global SLSQP)")
    args = ap.parse_args()
    print(f"device {jax.devices()[0]}, float64 {jax.config.jax_enable_x64}, GD steps {args.steps}")
    runs = [(k, int(st)) for k in (int(c) for c in args.cases.split(",")) for st in args.steps.split(",")]
    certified = 0
    for k, steps in runs:
        name, make = CASES[k]
        data = make()
        m = MLP(data.X.shape[1], (10, 10), leaky_relu(0.1), key=jax.random.PRNGKey(KEYS[k]), scale=1.0)
        t0 = time.perf_counter()
        tr = gradient_descent(m, data, loss="exponential", lr=0.05, steps=steps, schedule="loss_based")
        t_gd = time.perf_counter() - t0
        start = kkt.max_margin_kkt(tr.final, data)
        print(f"[{k}] {name}, {steps} steps: GD {t_gd:.1f}s, start Clarke stationarity {start.stationarity:.3g} "
              f"(one subgradient {start.smooth_stationarity:.3g}), normalized margin {start.normalized_margin:.5g}")
        if args.old:
            t0 = time.perf_counter()
            old = kkt.solve_max_margin(tr.final, data, clarke=False)
            t_old = time.perf_counter() - t0
            cl = [kkt.max_margin_kkt(old.model, data, active_tol=1e-6, kink_tol=kt) for kt in (1e-6, 1e-4)]
            print(f"    old (gradients): {t_old:.1f}s converged={old.converged} reason={old.reason} one-subgradient "
                  f"score {old.smooth_stationarity:.3g}; Clarke score {cl[0].stationarity:.3g} (kink_tol 1e-6, "
                  f"{cl[0].n_kinks} kinks), {cl[1].stationarity:.3g} (1e-4, {cl[1].n_kinks} kinks); "
                  f"norm {np.linalg.norm(old.theta):.4g}, nm/start {old.normalized_margin / start.normalized_margin:.3g}")
        t0 = time.perf_counter()
        new = kkt.solve_max_margin(tr.final, data)
        t_new = time.perf_counter() - t0
        print(f"    new (Clarke): {t_new:.1f}s converged={new.converged} reason={new.reason} stationarity "
              f"{new.stationarity:.3g} (one subgradient {new.smooth_stationarity:.3g}), {new.n_kinks} kinks, "
              f"distance {new.distance:.3g}, nm/start {new.normalized_margin / new.start_normalized_margin:.4g}; "
              f"{new.message}", flush=True)
        certified += bool(new.converged)
    print(f"certified {certified} of {len(runs)} starts")


if __name__ == "__main__":
    main()
