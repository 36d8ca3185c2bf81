"""Census flows on the canonical problem: refilled lock-step batches vs the classic lock step vs single calls.

Every member runs from ``delta * u_k`` (delta = 1e-3, the canonical directions) through its escape
(``||theta|| = 100 delta``) to ``t1`` (default 250) with the stiff-aware engine at rtol 1e-8; the three ways are

* ``refill``: :func:`homflow.census.run_members` with refill and tail compaction (batch ``--batch``);
* ``classic``: the same driver with ``refill=False``: batches of ``--batch`` members, each phase one engine call
  (what ``gradient_flow_batch(method='batched')`` does), finished members riding along;
* ``single``: :func:`homflow.flow.gradient_flow` per member (``solver='auto'``), on the first ``--singles`` members
  (the total is extrapolated linearly to all members and marked so).

Printed: member gradient evaluations (what the members needed), slot evaluations (batched evaluations times the batch
size: what the lock step paid), utilisation (their ratio), engine calls, wall time, and the largest relative
difference of the end states against the single calls.

    python benchmarks/census.py                       # 1,024 directions (long on a small CPU)
    python benchmarks/census.py --n 64 --singles 16   # a subset
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _canon import DELTA, device_line, problem, table

from homflow.census import DriverOptions, precompile, run_members  # noqa: E402
from homflow.flow import gradient_flow  # noqa: E402
from homflow.kkt import zero_preserving_groups  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="directions")
    ap.add_argument("--singles", type=int, default=None, help="single calls on the first k members (default all)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=400, help="engine steps per member per chunk (refill)")
    ap.add_argument("--t1", type=float, default=250.0)
    ap.add_argument("--rtol", type=float, default=1e-8)
    ap.add_argument("--smoke", action="store_true", help="4 directions to t1 = 20 (any machine, seconds)")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.singles, args.batch, args.t1, args.chunk = 4, 2, 2, 20.0, 50
    singles = args.n if args.singles is None else min(args.singles, args.n)
    print(device_line())
    model, data, objective, thetas = problem(args.n)
    groups = zero_preserving_groups(model)
    kw = dict(levels=100 * DELTA, horizons=args.t1, ends=args.t1, rtol=args.rtol, groups=groups,
              save_dt=args.t1 / 200)
    rows, ends = [], {}
    for name, opts in (("refill", DriverOptions(batch_size=args.batch, chunk_steps=args.chunk)),
                       ("classic", DriverOptions(batch_size=args.batch, refill=False))):
        precompile(objective, args.n, thetas.shape[1], opts)
        t = time.perf_counter()
        r = run_members(objective, thetas, options=opts, **kw)
        w = time.perf_counter() - t
        ends[name] = r.theta_end
        rows.append({"way": name, "members": args.n, "batch": args.batch, "member_evals": int(r.grad_evals.sum()),
                     "slot_evals": int(r.slot_evals), "utilisation": r.utilisation, "calls": r.calls, "wall_s": w,
                     "escaped": int(np.isfinite(r.t_escape).sum())})
    gradient_flow(model, data, loss="square", theta0=thetas[0], t1=1.0, rtol=args.rtol, ts=[0.0, 1.0])  # compile
    t = time.perf_counter()
    ev, th_single = 0, []
    for k in range(singles):
        tr = gradient_flow(model, data, loss="square", theta0=thetas[k], t1=args.t1, rtol=args.rtol,
                           ts=[0.0, args.t1])
        ev += int(tr.stats["grad_evals"])
        th_single.append(tr.thetas[-1])
    w = time.perf_counter() - t
    scale = args.n / singles
    rows.append({"way": "single" + (f" ({singles}, x{scale:g})" if singles < args.n else ""), "members": args.n,
                 "batch": 1, "member_evals": int(ev * scale), "slot_evals": int(ev * scale), "utilisation": 1.0,
                 "calls": args.n, "wall_s": w * scale, "escaped": None})
    th_single = np.asarray(th_single)
    for row in rows[:2]:
        e = ends[row["way"]][:singles]
        row["max_rel_diff_vs_single"] = float(np.max(np.linalg.norm(e - th_single, axis=1) /
                                                     np.linalg.norm(th_single, axis=1)))
    print(f"\ncanonical problem, {args.n} directions, delta = {DELTA:g}, escape at 100 delta, t1 = {args.t1:g}, "
          f"rtol {args.rtol:g}")
    table(rows, ["way", "members", "batch", "member_evals", "slot_evals", "utilisation", "calls", "wall_s", "escaped",
                 "max_rel_diff_vs_single"])
    base = rows[2]["wall_s"]
    for row in rows[:2]:
        print(f"{row['way']}: {base / row['wall_s']:.2f}x the single calls' wall time, "
              f"{rows[2]['member_evals'] / row['slot_evals']:.2f}x their gradient evaluations per slot evaluation")


if __name__ == "__main__":
    main()
