"""Benchmark: the canonical problem to t = 250 through `homflow run`, default solver vs `--set flow.solver=tsit5`.

The config below is the canonical problem as a user writes it (teacher-student data n = 100, d = 10, teacher width 5;
two-layer ReLU^2 net of width 50; init scale 1e-3; square loss; t1 = 250; rtol 1e-8; 4 checkpointed segments). Each
run goes through the whole CLI (config, store, checkpoints, report) in a fresh process; the table gives, per solver, the
gradient evaluations the flow took (summed over segments), the final loss and norm, and the wall and CPU time of the
process (compilation included). Acceptance (issue 10): the default needs >= 5x fewer gradient evaluations than Tsit5
and ends at the same point (final loss and norm within 1e-5, relative).

Run: .venv/bin/python benchmarks/run_solvers.py [--t1 250] [--solvers auto,tsit5]
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

CONFIG = """experiment = "flow"
name = "canonical"
loss = "square"
analyses = ["loss_norm"]

[data]
kind = "teacher_student"
n = 100
d = 10
teacher_width = 5
p = 2

[model]
kind = "two_layer"
width = 50
activation = "relu_power"
p = 2

[init]
scale = 1e-3
seed = 0

[flow]
t1 = {t1}
rtol = 1e-8
segments = 4
n_save = 25
"""


def run(config: str, store: str, sets: list[str]) -> dict:
    exe = os.path.join(os.path.dirname(sys.executable), "homflow")
    cmd = [exe, "run", config, "--store", store, "--json"] + [a for s in sets for a in ("--set", s)]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    with open(os.path.join(res["path"], "summary.json")) as f:
        summary = json.load(f)["summary"]
    return {"exit": out.returncode, "wall_s": wall, "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
            "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--t1", type=float, default=250.0)
    ap.add_argument("--solvers", default="default,tsit5")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="homflow_run_solvers_")
    config = os.path.join(tmp, "canonical.toml")
    with open(config, "w") as f:
        f.write(CONFIG.format(t1=args.t1))
    rows = []
    for name in args.solvers.split(","):
        sets = [] if name == "default" else [f"flow.solver={name}"]
        r = run(config, os.path.join(tmp, "runs"), sets)
        s = r["summary"]
        st = s.get("stats", {})
        rows.append({"solver": f"{name} ({st.get('solver')})", "exit": r["exit"], "grad_evals": st.get("grad_evals"),
                     "steps": st.get("num_steps"), "stiff_steps": st.get("num_stiff_steps"),
                     "loss_final": s.get("loss_final"), "norm_final": s.get("norm_final"),
                     "wall_s": round(r["wall_s"], 1), "cpu_s": round(r["cpu_s"], 1)})
        print(json.dumps(rows[-1]), flush=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.10g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    if len(rows) >= 2 and all(r["grad_evals"] for r in rows[:2]):
        a, b = rows[0], rows[1]
        print(f"\ngradient evaluations {b['solver']} / {a['solver']}: {b['grad_evals'] / a['grad_evals']:.2f}x; "
              f"relative difference of the final loss {abs(a['loss_final'] - b['loss_final']) / abs(b['loss_final']):.2e},"
              f" of the final norm {abs(a['norm_final'] - b['norm_final']) / abs(b['norm_final']):.2e}")


if __name__ == "__main__":
    main()
