"""Benchmark: cost of a deep net's sliding field (docs/nonsmooth.md), against its straightforward form in the same run.

A depth-3 MLP of the non-smooth sweep (benchmarks/nonsmooth.py, problem 2: ReLU, (47, 47), n 87, d 8, square loss)
with ``K`` units sliding: the ``K / 2`` units of each hidden layer nearest their kinks at the initialisation, the
weights projected onto their kink surfaces (samples kinked in two layers run the Newton iteration on the slopes). Times, after compilation, the median of repeated calls of

* the velocity of the mode: ``KinkedProblem.velocity`` with ``slopes=False`` (what the inner stages of a step
  evaluate) and with ``slopes=True`` (the last stage: the Newton iteration on the slopes);
* one DOPRI5 step as homflow takes it (five inner stages without the slopes, the last with them) against a step whose
  six stages all compute the slopes;
* the tangent projection ``g - N^T (N N^T)^+ N g`` from the layer factors (``KinkedProblem.normal_ops``) against
  the one from the formed (K, P) normals of single-sample autodiff (``_normals_autodiff``).

Prints milliseconds and the ratios (baseline / homflow).

    .venv/bin/python benchmarks/sliding_field.py [--units 256] [--problem 2] [--repeat 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import homflow

homflow.enable_x64()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nonsmooth as ns  # noqa: E402

from homflow.flow._clarke import _padded, gram_solve, make_kinked  # noqa: E402
from homflow.flow._nonsmooth_kernel import _A, _aug_field, _rk_step, project_sliding  # noqa: E402
from homflow.flow._ode import _setup  # noqa: E402
from homflow.models import MLP  # noqa: E402


def _time(f, *args, repeat):
    jax.block_until_ready(f(*args))  # compile
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        out.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=256, help="sliding units K (half in each hidden layer)")
    ap.add_argument("--problem", type=int, default=2, help="index into benchmarks/nonsmooth.py's random problems")
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    p = ns.random_problems(max(10, args.problem + 1))[args.problem]
    data = ns._data(p["n"], p["d"], p["labels"], p["seed"])
    model = MLP(p["d"], (p["width"],) * 2, p["act"], key=jax.random.PRNGKey(100 + p["seed"]), scale=p["scale"])
    objective, theta = _setup(model, data, p["loss"], None)
    kp = make_kinked(objective, model)
    theta = jnp.asarray(theta)
    n, m = p["n"], p["width"]
    # the K / 2 units of each hidden layer nearest their kinks (relative to their bounds), theta projected onto
    # their kink surfaces: a sliding state as a flow meets it
    z, sc = (np.asarray(a) for a in kp.preactivations(theta))
    r = np.abs(z) / sc
    layer1 = np.argsort(r[:n * m])[:args.units // 2]
    layer2 = n * m + np.argsort(r[n * m:])[:args.units - args.units // 2]
    units = np.sort(np.concatenate([layer1, layer2]))
    idx, valid = (jnp.asarray(a) for a in _padded(units))
    theta = project_sliding(kp, theta, idx, valid, 6)[0]
    z, _ = kp.preactivations(theta)
    signs = jnp.where(z > 0, 1, -1).astype(jnp.int8)
    y = jnp.concatenate([theta, jnp.zeros(1, theta.dtype)])
    u = jnp.zeros((), theta.dtype)
    two = bool(kp._two_layer_samples(idx, valid))

    field = {flag: jax.jit(lambda y, flag=flag: _aug_field(kp, y, u, False, signs, idx, valid, None, flag))
             for flag in (False, True)}
    f0 = field[True](y)[0]
    h = 1e-3
    step = jax.jit(lambda y, f0: _rk_step(kp, y, f0, u, h, False, signs, idx, valid, 1e-8, 1e-12))
    A = jnp.asarray(_A, y.dtype)

    @jax.jit
    def step_all_slopes(y, f0):  # the baseline: every stage with the slopes (returned, so that none is skipped)
        ks = jnp.zeros((7,) + y.shape, y.dtype).at[0].set(f0)
        slopes = []
        for i in range(1, 7):
            f, s = field[True](y + h * (A[i] @ ks))
            ks, slopes = ks.at[i].set(f), slopes + [s]
        return y + h * (A[6] @ ks), jnp.stack(slopes)

    g = kp.grad_and_adjoint(theta, kp.slopes(signs, idx, valid, jnp.full(idx.shape, 0.5)))[1]

    @jax.jit
    def tangent_factors(g):
        mv, rmv, G = kp.normal_ops(theta, idx, valid)
        return g - rmv(gram_solve(None, mv(g), valid, G=G))

    @jax.jit
    def tangent_dense(g):  # the baseline: the (K, P) normals by single-sample autodiff
        Nz = kp._normals_autodiff(theta, idx) * valid[:, None].astype(g.dtype)
        return g - Nz.T @ gram_solve(Nz.T, Nz @ g, valid)

    diff = float(jnp.max(jnp.abs(tangent_factors(g) - tangent_dense(g))) / jnp.max(jnp.abs(g)))
    y1_new, y1_all = step(y, f0)[0], step_all_slopes(y, f0)[0]
    sdiff = float(jnp.max(jnp.abs(y1_new - y1_all)) / jnp.max(jnp.abs(y1_all - y)))
    r = args.repeat
    t = dict(field_noslopes=_time(field[False], y, repeat=r), field_slopes=_time(field[True], y, repeat=r),
             step=_time(step, y, f0, repeat=r), step_all=_time(step_all_slopes, y, f0, repeat=r),
             tan_f=_time(tangent_factors, g, repeat=r), tan_d=_time(tangent_dense, g, repeat=r))
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype: float64, load "
          f"{os.getloadavg()[0]:.1f}")
    print(f"problem {args.problem}: MLP {p['d']} -> ({m}, {m}), n {n}, P {theta.shape[0]}; sliding units "
          f"{units.size} (capacity {idx.shape[0]}), samples kinked in two layers: {two}")
    print(f"velocity, inner stage (no slopes):        {t['field_noslopes']:8.2f} ms")
    print(f"velocity, last stage (Newton on slopes):  {t['field_slopes']:8.2f} ms")
    print(f"DOPRI5 step, every stage with slopes:     {t['step_all']:8.2f} ms (baseline)")
    print(f"DOPRI5 step, homflow:                     {t['step']:8.2f} ms   ratio {t['step_all'] / t['step']:.2f}"
          f"   (steps agree to {sdiff:.1e} of the step)")
    print(f"tangent projection, formed normals:       {t['tan_d']:8.2f} ms (baseline)")
    print(f"tangent projection, layer factors:        {t['tan_f']:8.2f} ms   ratio {t['tan_d'] / t['tan_f']:.2f}"
          f"   (agree to {diff:.1e} of |g|)")


if __name__ == "__main__":
    main()
