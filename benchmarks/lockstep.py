"""Cost of one loop iteration of the batched engine: the stage lock step against the step lock step and raw
``vmap(grad)``, measured in the same run (docs/performance.md, "The stage lock step").

Canonical problem (``../shared/data/canonical.py``), B members from ``300 delta u_k`` (past the escape), integrated to
t1 = 1000 for a bounded number of batched gradients (the stage lock step stops its members after ``--evals`` batched
gradients, the step lock step after ``--evals / 7.5`` steps, about the same work); each way compiled first, then timed.

    .venv/bin/python benchmarks/lockstep.py            # B = 128
    .venv/bin/python benchmarks/lockstep.py --batch 32
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _canon import device_line, problem

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from homflow.census._driver import _KAPPA, _event, _field  # noqa: E402
from homflow.flow import ode_batch  # noqa: E402
from homflow.flow._batched import _ArgsField  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--evals", type=int, default=3000)
    args = ap.parse_args()
    print(device_line())
    B = args.batch
    _, _, objective, thetas = problem(B)
    P = thetas.shape[1]
    y0 = np.zeros((B, P + 2))
    y0[:, :P] = 300 * thetas
    y0[:, P + 1] = 1e9 * _KAPPA
    fb = jax.vmap(_ArgsField(_field, objective))
    t, y = jnp.zeros(B), jnp.asarray(y0)
    n = 200
    loop = jax.jit(lambda y: jax.lax.fori_loop(0, n, lambda i, yy: yy + 1e-12 * fb(t, yy), y))
    loop(y).block_until_ready()
    t0 = time.perf_counter()
    loop(y).block_until_ready()
    raw = (time.perf_counter() - t0) / n
    print(f"B = {B}: raw vmap(grad) in a compiled loop: {raw * 1e3:.3g} ms per batched gradient")
    for lock in ("step", "stage"):
        kw = dict(args=objective, rtol=1e-8, atol=1e-12, event=_event, lockstep=lock)
        if lock == "stage":
            kw.update(max_steps=10**6, max_batched_evals=args.evals)
        else:
            kw.update(max_steps=int(args.evals / 7.5))
        ode_batch(_field, y0, 1e3, **kw)
        t0 = time.perf_counter()
        sol = ode_batch(_field, y0, 1e3, **kw)
        w = time.perf_counter() - t0
        nb = sol.stats["batched_evals"]
        print(f"  {lock} lock step: {w:.3g} s, {nb} batched gradients, {w / nb * 1e3:.3g} ms each "
              f"({w / nb / raw:.2f}x raw), utilisation {sol.stats['grad_evals'].sum() / (B * nb):.3f}, "
              f"stiff members {int((sol.stats['num_stiff_steps'] > 0).sum())}")


if __name__ == "__main__":
    main()
