"""Wall time of `homflow sweep` with one and two workers (local process pool and a local Ray), same run.

Usage: .venv/bin/python benchmarks/sweep_workers.py [SWEEP.toml] [--ray] [--unpinned] [--repeat N]

``--unpinned`` adds the local pool with two workers not pinned to CPUs of their own (``HOMFLOW_PIN_WORKERS=off``:
every process on every core, XLA's default threads), the baseline of the pinned pool (homflow.shards.cpu_plan).
``benchmarks/sweep_relu_depth3.toml`` is a sweep of four depth-3 ReLU flows (the non-smooth solver, ~35 s each).

Each configuration runs as a fresh `homflow sweep ... --store <tmp>` process (the whole command is timed: imports,
worker start, compilation or cache loads, the runs, the reports). The JAX persistent compilation cache is a
temporary directory shared by every command of this script: the first command fills it ("cold"), the later ones
find it warm. Reported: seconds per configuration and the ratio workers=1 / workers=2 (> 1: two workers faster).
The machine's load average is printed alongside: on a shared machine the ratio, not the seconds, is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU: list[float] = []  # CPU seconds (user + sys) of each command and its workers


def run(cmd: list[str], env: dict) -> float:
    """Seconds of one command; exits if any point of the sweep did not complete."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([*cmd, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    try:
        runs = json.loads(p.stdout.strip().splitlines()[-1])["runs"]
    except (ValueError, KeyError, IndexError):
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    bad = [r for r in runs if r.get("status") != "completed"]
    if bad:
        sys.exit(f"{' '.join(cmd)}: {len(bad)} points did not complete: {bad[0].get('error')}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep", nargs="?", default=str(ROOT / "examples" / "sweep_scales.toml"))
    ap.add_argument("--ray", action="store_true", help="also time --backend ray with 1 and 2 workers (local Ray)")
    ap.add_argument("--unpinned", action="store_true", help="also the local pool, 2 workers, not pinned")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    homflow = str(Path(sys.executable).with_name("homflow"))
    with tempfile.TemporaryDirectory(prefix="homflow-bench-") as tmp:
        env = {**os.environ, "HOMFLOW_JAX_CACHE": str(Path(tmp) / "cache")}
        configs = ([("local", 1), ("local", 2)] + ([("local-unpinned", 2)] if a.unpinned else [])
                   + ([("ray", 1), ("ray", 2)] if a.ray else []))
        print(f"load average before: {os.getloadavg()[0]:.1f}; cpus: {os.cpu_count()}")
        cold = run([homflow, "sweep", a.sweep, "--workers", "1", "--store", str(Path(tmp) / "cold")], env)
        print(f"cold cache, local, workers=1: {cold:.1f} s wall, {CPU[-1]:.1f} s CPU")
        times: dict = {c: [] for c in configs}
        for r in range(a.repeat):
            for backend, w in configs:
                store = Path(tmp) / f"{backend}-{w}-{r}"
                env_c = {**env, "HOMFLOW_PIN_WORKERS": "off"} if backend == "local-unpinned" else env
                times[(backend, w)].append(run([homflow, "sweep", a.sweep, "--backend", backend.split("-")[0],
                                                "--workers", str(w), "--store", str(store)], env_c))
                print(f"warm cache, {backend}, workers={w}: {times[(backend, w)][-1]:.1f} s wall, {CPU[-1]:.1f} s CPU "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
        for backend in ("local", "local-unpinned", "ray"):
            if (backend, 2) in times:
                t1, t2 = min(times[(backend.split("-")[0], 1)]), min(times[(backend, 2)])
                print(f"{backend}: workers=1 {t1:.1f} s, workers=2 {t2:.1f} s, ratio {t1 / t2:.2f}x")


if __name__ == "__main__":
    main()
