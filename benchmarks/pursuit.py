"""Neuron pursuit vs plain gradient descent on the worked example of arXiv 2509.12154 (time, evaluations, test error).

Runs neuron pursuit with the built-in's defaults, then plain gradient descent on a network of the final widths from a
small random initialisation with the same number of gradient evaluations (loss gradients of the descents plus the
NCF gradients of the KKT searches), for a few seeds of the plain start. Reports wall and CPU seconds, the load average
(this machine is shared), the evaluation counts and the relative test errors on fresh hypercube points.

    .venv/bin/python benchmarks/pursuit.py [--seeds 3] [--n-test 10000]
"""

from __future__ import annotations

import argparse
import os
import time

import homflow

homflow.enable_x64()

import jax  # noqa: E402

from homflow.activations import relu  # noqa: E402
from homflow.experiments.pursuit import PURSUIT_DEFAULTS, _options  # noqa: E402
from homflow.models import MLP  # noqa: E402
from homflow.pursuit import hypercube, labelled, neuron_pursuit, paper_target, relative_error, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-test", type=int, default=10000)
    args = ap.parse_args()
    p = dict(PURSUIT_DEFAULTS)
    target = paper_target(p["d"])
    data = labelled(target, hypercube(p["n_train"], p["d"], seed=p["data_seed"]))
    X_test = hypercube(args.n_test, p["d"], seed=p["test_seed"])
    print(f"device {jax.devices()[0]}, dtype float64, load average at start {os.getloadavg()}")
    w0, c0 = time.perf_counter(), time.process_time()
    res = neuron_pursuit(data, _options(p, 3, p["steps"]))
    w1, c1 = time.perf_counter(), time.process_time()
    err = relative_error(res.model, target, X_test)
    budget = res.grad_evals + res.ncf_evals
    print(f"neuron pursuit: widths {res.widths}, {len(res.steps)} iterations, test error {err:.3g}, "
          f"{res.grad_evals} loss + {res.ncf_evals} NCF gradient evaluations, wall {w1 - w0:.1f} s, "
          f"CPU {c1 - c0:.1f} s")
    for s in res.steps:
        print(f"  it {s.iteration}: layer {s.layer}, widths {s.widths}, N = {s.point.value:.4g}, rel. residual "
              f"{s.point.relative_residual:.2e}, loss {s.loss_before:.3e} -> {s.loss_after:.3e}, "
              f"kkt {s.seconds['kkt']:.1f} s, descent {s.seconds['descent']:.1f} s")
    for seed in range(args.seeds):
        m0 = MLP(p["d"], res.widths, relu, key=jax.random.PRNGKey(seed), scale=p["baseline_scale"])
        w2, c2 = time.perf_counter(), time.process_time()
        plain, curve, _, ev = train(m0, data, lr=p["lr"], steps=budget)
        w3, c3 = time.perf_counter(), time.process_time()
        perr = relative_error(plain, target, X_test)
        print(f"plain GD seed {seed}: {ev} steps, train loss {curve[-1]:.3g}, test error {perr:.3g} "
              f"(NP / plain = {err / perr:.2g}), wall {w3 - w2:.1f} s, CPU {c3 - c2:.1f} s")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
