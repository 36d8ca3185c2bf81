"""Random SIGKILLs of runs and sweeps, a full disk (a file-size limit), and `homflow sweep --resume` (issue 16).

Each test runs the real CLI in a subprocess and checks what an operator would: the index stays consistent (SQLite
integrity, no run left `running`), a resumed run gives the numbers of an uninterrupted one bit for bit, a sweep whose
worker dies completes with every point once, a sweep whose driver dies leaves no worker behind and is finished by
`--resume`, and a run that cannot write its files exits non-zero with one line."""

import json
import os
import random
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from homflow.store import RunStore

RUN = """
experiment = "flow"
name = "killme"
loss = "square"
analyses = ["loss_norm", "balance"]
[data]
kind = "teacher_student"
n = 30
d = 4
teacher_width = 3
labels = "value"
[model]
kind = "two_layer"
width = 8
[init]
scale = 1e-2
[flow]
t1 = 400.0
segments = 5
n_save = 10
[[checks]]
metric = "balance_drift"
tolerance = 1e-6
"""

SWEEP = RUN.replace('name = "killme"\n', "").replace("t1 = 400.0", "t1 = 60.0").replace("segments = 5", "segments = 2") \
    + '[sweep]\nname = "kill"\n[sweep.grid]\n"init.seed" = [0, 1, 2, 3]\n'


def cli(*args):
    return [sys.executable, "-m", "homflow.cli", *args]


def env_for(tmp_path):
    return {**os.environ, "HOMFLOW_JAX_CACHE": str(tmp_path / "cache")}


def integrity(store: Path) -> str:
    with sqlite3.connect(store / "index.sqlite") as con:
        return con.execute("PRAGMA integrity_check").fetchone()[0]


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_random_sigkill_of_runs_resumes_bit_identical(tmp_path):
    """Kill `homflow run` at random moments; every killed run is `interrupted` in a sound index and resumes to the
    arrays of an uninterrupted run, bit for bit."""
    rng = random.Random(16)
    cfg = tmp_path / "run.toml"
    # many short segments: the flow takes a few seconds, and the kills (up to 3 s after the first checkpoint) must
    # be able to land inside it
    cfg.write_text(RUN.replace("segments = 5", "segments = 40"))
    store = tmp_path / "store"
    env = env_for(tmp_path)
    ref = subprocess.run(cli("run", str(cfg), "--json", "--store", str(store)), env=env, capture_output=True,
                         text=True)
    assert ref.returncode == 0, ref.stderr
    ref_arrays = np.load(Path(json.loads(ref.stdout)["path"]) / "arrays.npz")
    figures = {"kills": 0, "interrupted": 0, "finished_first": 0, "resumed_identical": 0}
    for _ in range(3):
        proc = subprocess.Popen(cli("run", str(cfg), "--json", "--store", str(store)), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        known = {r.id for r in RunStore(store).list()}
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not [
                p for p in store.glob("*killme*/checkpoints/*.npz") if p.parent.parent.name not in known]:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 3.0))
        figures["kills"] += 1
        if proc.poll() is not None:
            figures["finished_first"] += 1
            continue
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert integrity(store) == "ok"
        new = [r for r in RunStore(store).list() if r.id not in known]
        if not new:
            continue
        (rec,) = new
        if rec.status == "completed":  # the kill landed after the run finished (while the process exited): intact
            got = np.load(Path(rec.path) / "arrays.npz")
            for k in ref_arrays.files:
                np.testing.assert_array_equal(got[k], ref_arrays[k], err_msg=k)
            figures["finished_first"] += 1
            continue
        assert rec.status == "interrupted", rec
        figures["interrupted"] += 1
        res = subprocess.run(cli("resume", rec.id, "--json", "--store", str(store)), env=env, capture_output=True,
                             text=True)
        assert res.returncode == 0, res.stderr
        got = np.load(Path(rec.path) / "arrays.npz")
        assert set(got.files) == set(ref_arrays.files)
        for k in got.files:
            np.testing.assert_array_equal(got[k], ref_arrays[k], err_msg=k)
        figures["resumed_identical"] += 1
    print("random SIGKILL of runs:", figures)
    assert figures["interrupted"] >= 1 and figures["resumed_identical"] == figures["interrupted"]
    assert RunStore(store).check()["ok"]


def _start_sweep(tmp_path, *extra):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(SWEEP)
    store = tmp_path / "store"
    proc = subprocess.Popen(cli("sweep", str(cfg), "--workers", "2", "--json", "--store", str(store), *extra),
                            env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, store


def _wait_workers(proc, n=1, timeout=240):
    """The spawned workers of a sweep (``--workers 2``: one process beside the driver's own thread)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        kids = [c for c in children(proc.pid) if alive(c)]
        if len(kids) >= n:
            return kids
        time.sleep(0.1)
    raise AssertionError("the sweep's workers did not start")


@pytest.mark.slow
def test_sweep_survives_a_killed_worker(tmp_path):
    proc, store = _start_sweep(tmp_path)
    kids = _wait_workers(proc)
    time.sleep(random.Random(12).uniform(3.0, 6.0))  # inside a point (imports, compile or flow)
    os.kill(kids[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    obj = json.loads(out.strip().splitlines()[-1])
    assert [r["status"] for r in obj["runs"]] == ["completed"] * 4 and Path(obj["report"]).is_file()
    recs = RunStore(store).list(sweep=obj["sweep"])
    assert sorted(r.point for r in recs) == [0, 1, 2, 3]  # each point once, the killed one retried
    assert integrity(store) == "ok" and RunStore(store).check()["ok"]


@pytest.mark.slow
def test_killed_sweep_driver_stops_workers_and_resumes(tmp_path):
    proc, store = _start_sweep(tmp_path)
    kids = _wait_workers(proc)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r.status == "completed" for r in RunStore(store).list()):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.time() + 15
    while time.time() < deadline and any(alive(k) for k in kids):
        time.sleep(0.1)
    assert not any(alive(k) for k in kids), "workers outlived the killed sweep"
    assert integrity(store) == "ok"
    (manifest,) = (store / "sweeps").glob("*.json")
    sweep_id = manifest.stem
    done_before = {r.point for r in RunStore(store).list(sweep=sweep_id) if r.status == "completed"}
    assert 1 <= len(done_before) < 4
    res = subprocess.run(cli("sweep", "--resume", sweep_id[:-2], "--workers", "2", "--json", "--store", str(store)),
                         env=env_for(tmp_path), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    obj = json.loads(res.stdout.strip().splitlines()[-1])
    assert obj["sweep"] == sweep_id and [r["status"] for r in obj["runs"]] == ["completed"] * 4
    recs = RunStore(store).list(sweep=sweep_id)
    assert sorted(r.point for r in recs) == [0, 1, 2, 3] and Path(obj["report"]).is_file()
    assert RunStore(store).check()["ok"]
    res = subprocess.run(cli("sweep", "--resume", "no-such-sweep", "--store", str(store)), env=env_for(tmp_path),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "no sweep" in res.stderr


@pytest.mark.slow
def test_full_disk_fails_with_one_line(tmp_path):
    """A file-size limit (as a full disk), first below the index's size, then just below the report's size: the run
    exits 1 with one line naming the failure, the index stays sound, and no run is left `running`."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN.replace("t1 = 400.0", "t1 = 20.0").replace("segments = 5", "segments = 1"))
    free = subprocess.run(cli("run", str(cfg), "--json", "--store", str(tmp_path / "free")), env=env_for(tmp_path),
                          capture_output=True, text=True)
    assert free.returncode == 0, free.stderr
    report = Path(json.loads(free.stdout)["report"])
    biggest_other = max(p.stat().st_size for p in report.parent.rglob("*") if p.is_file() and p != report)
    assert report.stat().st_size > biggest_other + 1
    for limit, needle in ((16 * 1024, ""), (report.stat().st_size - 1, "report")):
        store = tmp_path / f"store-{limit}"
        RunStore(store)  # the index exists before the limit applies

        def set_limit(limit=limit):
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        res = subprocess.run(cli("run", str(cfg), "--store", str(store)), env=env_for(tmp_path),
                             capture_output=True, text=True, preexec_fn=set_limit)
        err = res.stderr.strip()
        assert res.returncode == 1, (limit, res.returncode, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1 and needle in err, err
        assert any(w in err for w in ("File too large", "disk is full", "cannot write")), err
        assert integrity(store) == "ok"
        found = RunStore(store).check()  # a run directory without its row would be an orphan for `store repair`
        assert found["index"] == "ok" and found["runs"] + len(found["orphans"]) <= 1
        assert all(r.status != "running" for r in RunStore(store).list())
    (rec,) = RunStore(tmp_path / f"store-{report.stat().st_size - 1}").list()
    assert rec.status == "completed"  # the results are stored; only the report is missing
