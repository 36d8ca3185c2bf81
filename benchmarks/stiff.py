"""The stiff phase of the canonical problem (issue 7): homflow's 'auto'/'stiff' engine against diffrax Tsit5 and
Kvaerno5 as they come, fixed-step GD (JAX, PyTorch), SciPy BDF/LSODA with the exact Hessian, torchdiffeq.

    .venv/bin/python benchmarks/stiff.py [--t1 250] [--kvaerno-steps 300]

Kvaerno5 (diffrax's implicit solver with an autodiff Jacobian) is run for a capped number of steps and its projected
cost printed: at this size it was measured 100x slower than Tsit5 per unit time.
"""

from __future__ import annotations

import argparse

from _canon import device_line, problem, reference, rel_err, table, timed, torch_available
from flow_cost import ratios, run_t250, torchdiffeq_row

from homflow.flow import gradient_flow  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kvaerno-steps", type=int, default=300)
    ap.add_argument("--torchdiffeq", action="store_true", help="torchdiffeq dopri5 to t1 = 250 (~700k evaluations)")
    args = ap.parse_args()
    print(device_line())
    model, data, objective, thetas = problem(1)
    th0 = thetas[0]
    rows = run_t250(model, data, objective, th0)
    tr, w = timed(lambda: gradient_flow(model, data, loss="square", t1=250.0, rtol=1e-8, solver="kvaerno5",
                                        theta0=th0, ts=[0.0, 250.0], max_steps=args.kvaerno_steps, throw=False),
                 repeats=1)
    t_end = float(tr.ts[-1])
    rows.append({"method": "diffrax Kvaerno5 rtol 1e-08", "grad_evals": None, "grad-eq": None, "wall_s": w,
                 "error": rel_err(tr.thetas[-1], reference(250.0)) if tr.success else None,
                 "steps": tr.stats["num_steps"],
                 "note": f"capped: reached t = {t_end:.3g} in {w:.3g} s (projected {w * 250 / max(t_end, 1e-9):.3g} s)"})
    if args.torchdiffeq and torch_available():
        rows.append(torchdiffeq_row(th0, reference(250.0), 250.0, 1e-8))
    print("\n== canonical problem to t1 = 250 (stiff after t ~ 80) ==")
    table(rows, ["method", "grad_evals", "grad-eq", "wall_s", "error", "steps", "note"])
    ratios([r for r in rows if r["grad-eq"] is not None])


if __name__ == "__main__":
    main()
