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
    python benchmarks/census.py --problem small --n 64 --batch 16   # the quick census's problem (minutes)
    python benchmarks/census.py --ray --n 512         # a local Ray cluster: 2 shards in flight vs 1

``--ray``: a census's flows on the small problem of ``homflow reproduce census --quick`` (two-layer ReLU^2, d = 4,
width 8, n = 20; delta 1e-3, to 100 after the escape) as ``--shards`` shards through
:func:`homflow.shards.run_shards` on one local Ray cluster (``--address``, default a new local one with 2 CPUs),
with 1 and then 2 shards in flight; a warm-up pass first (Ray reuses its worker processes, which load compiled programs
from the shared persistent compilation cache).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _canon import DELTA, device_line, problem, table

from homflow.census import DriverOptions, precompile, run_members  # noqa: E402
from homflow.flow import NormAbove, gradient_flow, make_objective  # noqa: E402
from homflow.kkt import zero_preserving_groups  # noqa: E402


def _small_problem(n):
    """The problem of ``homflow reproduce census --quick``: two-layer ReLU^2, d = 4, width 8, n = 20; n directions."""
    import jax

    from homflow.activations import relu_power
    from homflow.data import Dataset
    from homflow.models import TwoLayer

    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 4))
    data = Dataset(X, np.sign(X[:, 0] * X[:, 1] + 0.3))
    model = TwoLayer(4, 8, relu_power(2), key=jax.random.PRNGKey(1))
    U = rng.standard_normal((n, 8 + 32))
    return model, data, U / np.linalg.norm(U, axis=1, keepdims=True)


def ray_main(args):
    import functools

    from homflow.census import run_members_sharded
    from homflow.shards import compilation_cache_dir, run_shards

    model, data, U = _small_problem(args.n)
    delta = 1e-3
    kw = dict(levels=100 * delta, horizons=1e6, t_after=args.t_after, rtol=args.rtol,
              groups=zero_preserving_groups(model), save_dt=args.t_after / 100,
              options=DriverOptions(batch_size=args.batch, chunk_steps=args.chunk))
    cache = str(compilation_cache_dir()) if compilation_cache_dir() else None
    head = None
    if args.address is None:  # a local two-CPU cluster on 127.0.0.1, stopped at the end (its own process group)
        head, args.address = _start_head()
    try:
        _ray_rows(args, model, data, U, delta, kw, cache, run_members_sharded, run_shards, functools)
    finally:
        if head is not None:
            import os
            import signal

            try:
                import ray

                ray.shutdown()
            finally:
                os.killpg(head.pid, signal.SIGTERM)
                head.wait(60)


def _start_head():
    import os
    import socket
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="hfray", dir="/tmp")  # Ray's socket paths must stay short
    # loopback only, no tokens on either side (as tests/test_ray.py; see homflow.shards._keep_ray_on_loopback)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
                             "--disable-usage-stats", f"--temp-dir={tmp}"],
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return head, f"127.0.0.1:{port}"
        except OSError:
            if head.poll() is not None:
                raise RuntimeError("`ray start --head` exited")
            time.sleep(0.5)
    raise RuntimeError("the Ray head did not answer within 180 s")


def _ray_rows(args, model, data, U, delta, kw, cache, run_members_sharded, run_shards, functools):
    rows = []
    for workers in (2, 1, 2):  # the first pass warms the workers and the cache
        runner = functools.partial(run_shards, backend="ray", workers=workers, address=args.address, cache_dir=cache,
                                   connect_timeout_s=300.0)
        warm = not rows  # the warm-up: every member gives up at t = 1 (compiles and loads, integrates little)
        th = delta * U
        t = time.perf_counter()
        r = run_members_sharded(model, data, "square", th, n_shards=args.shards, runner=runner,
                                **{**kw, "horizons": 1.0} if warm else kw)
        w = time.perf_counter() - t
        rows.append({"in_flight": workers, "members": th.shape[0], "shards": args.shards,
                     "member_evals": int(r.grad_evals.sum()), "utilisation": r.utilisation, "wall_s": w})
    rows = rows[1:]
    print(f"\nsmall problem census through Ray ({args.address or 'new local cluster'}), {args.n} directions")
    table(rows, ["in_flight", "members", "shards", "member_evals", "utilisation", "wall_s"])
    print(f"2 shards in flight: {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}x the speed of 1")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="directions")
    ap.add_argument("--singles", type=int, default=None, help="single calls on the first k members (default all)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=400, help="engine steps per member per chunk (refill_step)")
    ap.add_argument("--chunk-evals", type=int, default=8000, help="batched gradients per chunk (refill, stage lock step)")
    ap.add_argument("--ways", default="refill,refill_step,classic",
                    help="which batched ways to run (refill: stage lock step; refill_step; classic)")
    ap.add_argument("--t1", type=float, default=250.0)
    ap.add_argument("--rtol", type=float, default=1e-8)
    ap.add_argument("--smoke", action="store_true", help="4 directions to t1 = 20 (any machine, seconds)")
    ap.add_argument("--ray", action="store_true", help="Ray: 2 shards in flight vs 1 (see the module docstring)")
    ap.add_argument("--problem", choices=("canonical", "small"), default="canonical",
                    help="small: the quick census's problem, to the escape and --t-after more")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--save", default=None, help="write the refill run's per-member evaluations to this .npz")
    ap.add_argument("--t-after", type=float, default=100.0)
    args = ap.parse_args()
    if args.ray:
        print(device_line())
        return ray_main(args)
    if args.smoke:
        args.n, args.singles, args.batch, args.t1, args.chunk = 4, 2, 2, 20.0, 50
    singles = args.n if args.singles is None else min(args.singles, args.n)
    print(device_line())
    if args.problem == "canonical":
        model, data, objective, thetas = problem(args.n)
        kw = dict(levels=100 * DELTA, horizons=args.t1, ends=args.t1, rtol=args.rtol, save_dt=args.t1 / 200)
        what = f"canonical problem, delta = {DELTA:g}, escape at 100 delta, t1 = {args.t1:g}"
    else:
        model, data, U = _small_problem(args.n)
        objective, _ = make_objective(model, data, "square")
        thetas = 1e-3 * U
        kw = dict(levels=0.1, horizons=1e6, t_after=args.t_after, rtol=args.rtol, save_dt=args.t_after / 100)
        what = f"small problem, delta = 1e-3, escape at 100 delta, then {args.t_after:g} more"
    groups = zero_preserving_groups(model)
    kw["groups"] = groups
    rows, ends = [], {}
    ways = (("refill", DriverOptions(batch_size=args.batch, chunk_evals=args.chunk_evals)),
            ("refill_step", DriverOptions(batch_size=args.batch, chunk_steps=args.chunk, lockstep="step")),
            ("classic", DriverOptions(batch_size=args.batch, refill=False, lockstep="step")))
    for name, opts in ways:
        if name not in args.ways.split(","):
            continue
        precompile(objective, args.n, thetas.shape[1], opts)
        t = time.perf_counter()
        r = run_members(objective, thetas, options=opts, **kw)
        w = time.perf_counter() - t
        ends[name] = r.theta_end
        rows.append({"way": name, "members": args.n, "batch": args.batch, "member_evals": int(r.grad_evals.sum()),
                     "slot_evals": int(r.slot_evals), "utilisation": r.utilisation,
                     "busy_utilisation": r.busy_utilisation, "calls": r.calls, "wall_s": w,
                     "escaped": int(np.isfinite(r.t_escape).sum())})
        print(rows[-1], flush=True)
        if name == "refill":  # what the same members would pay without refill / compaction (stage lock step):
            # a batch of the stage lock step pays exactly max(member evaluations) batched gradients
            # (tests/test_batched.py), so batches of --batch members in order give
            ev = np.asarray(r.grad_evals, dtype=float)
            paid = sum(args.batch * ev[i:i + args.batch].max() for i in range(0, ev.size, args.batch))
            print(f"  without refill (computed: each batch of {args.batch} pays its largest member's evaluations): "
                  f"slot evaluations {paid:.0f}, utilisation {ev.sum() / paid:.3f}", flush=True)
            if args.save:
                np.savez(args.save, grad_evals=ev, t_escape=np.asarray(r.t_escape), theta_end=r.theta_end)

    def single(k):
        if args.problem == "canonical":
            tr = gradient_flow(model, data, loss="square", theta0=thetas[k], t1=args.t1, rtol=args.rtol,
                               ts=[0.0, args.t1])
        else:  # to the escape, then t_after more (atol of the first leg kept: 0.1 rtol delta)
            tr0 = gradient_flow(model, data, loss="square", theta0=thetas[k], t1=1e6, rtol=args.rtol, ts=[0.0, 1e6],
                                events=NormAbove(0.1))
            tr = gradient_flow(model, data, loss="square", theta0=tr0.thetas[-1], t1=args.t_after, rtol=args.rtol,
                               atol=0.1 * args.rtol * 1e-3, ts=[0.0, args.t_after])
            return tr.thetas[-1], int(tr0.stats["grad_evals"]) + int(tr.stats["grad_evals"])
        return tr.thetas[-1], int(tr.stats["grad_evals"])

    single(0)  # compiles
    t = time.perf_counter()
    ev, th_single = 0, []
    for k in range(singles):
        th, e = single(k)
        ev += e
        th_single.append(th)
    w = time.perf_counter() - t
    scale = args.n / singles
    rows.append({"way": "single" + (f" ({singles}, x{scale:g})" if singles < args.n else ""), "members": args.n,
                 "batch": 1, "member_evals": int(ev * scale), "slot_evals": int(ev * scale), "utilisation": 1.0,
                 "calls": args.n, "wall_s": w * scale, "escaped": None})
    th_single = np.asarray(th_single)
    nb = len(rows) - 1  # the batched ways; the last row is the single calls
    for row in rows[:nb]:
        e = ends[row["way"]][:singles]
        row["max_rel_diff_vs_single"] = float(np.max(np.linalg.norm(e - th_single, axis=1) /
                                                     np.linalg.norm(th_single, axis=1)))
    print(f"\n{what}, {args.n} directions, rtol {args.rtol:g}")
    table(rows, ["way", "members", "batch", "member_evals", "slot_evals", "utilisation", "busy_utilisation", "calls",
                 "wall_s", "escaped", "max_rel_diff_vs_single"])
    base = rows[nb]["wall_s"]
    for row in rows[:nb]:
        print(f"{row['way']}: {base / row['wall_s']:.2f}x the single calls' wall time, "
              f"{rows[nb]['member_evals'] / row['slot_evals']:.2f}x their gradient evaluations per slot evaluation")


if __name__ == "__main__":
    main()
