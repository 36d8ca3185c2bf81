"""Run store: atomic files, the SQLite (WAL) index and its statuses, and a SIGKILLed run that resumes exactly."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from homflow.experiments import execute, load_config, resume
from homflow.store import RunStore, atomic_write_text

KILL_CONFIG = """
experiment = "flow"
name = "killme"
loss = "square"
analyses = ["loss_norm", "balance"]
[data]
kind = "teacher_student"
n = 40
d = 5
teacher_width = 3
p = 2
labels = "value"
[model]
kind = "two_layer"
width = 10
[init]
scale = 1e-2
[flow]
t1 = 720.0
segments = 6
n_save = 10
"""


def test_index_wal_status_and_lookup(tmp_path):
    s = RunStore(tmp_path)
    with sqlite3.connect(s.index_path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    r1 = s.create("flow", name="alpha")
    r2 = s.create("flow", name="beta")
    assert {r.id for r in s.list()} == {r1.id, r2.id}
    assert s.get(r1.id).status == "running" and s.get("alpha").id == r1.id
    s.finish(r1.id, status="completed", checks=[{"passed": True}, {"passed": False}], duration_s=1.5)
    rec = s.get(r1.id)
    assert (rec.status, rec.n_checks, rec.n_passed, rec.passed, rec.duration_s) == ("completed", 2, 1, False, 1.5)
    with pytest.raises(ValueError, match="no run"):
        s.get("does-not-exist")
    with pytest.raises(ValueError, match="status"):
        s.finish(r2.id, status="exploded")
    # every run has its own directory with the standard sub-directories
    assert (r1.path / "figures").is_dir() and (r1.path / "checkpoints").is_dir()


def test_dead_process_is_marked_interrupted(tmp_path):
    s = RunStore(tmp_path)
    r = s.create("flow")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    s._execute("UPDATE runs SET pid=? WHERE id=?", (proc.pid, r.id))
    assert s.get(r.id).status == "interrupted"


def test_atomic_writes_and_checkpoints(tmp_path):
    s = RunStore(tmp_path)
    r = s.create("flow")
    r.save_checkpoint("flow", {"theta": np.arange(3.0), "k": 2})
    ck = r.load_checkpoint("flow")
    np.testing.assert_array_equal(ck["theta"], np.arange(3.0))
    assert int(ck["k"]) == 2 and r.checkpoints() == ["flow"]
    assert r.load_checkpoint("other") is None
    with pytest.raises(ValueError, match="name"):
        r.save_checkpoint("../evil", {})
    atomic_write_text(r.path / "x.txt", "one")
    atomic_write_text(r.path / "x.txt", "two")
    assert (r.path / "x.txt").read_text() == "two"
    leftovers = [p for p in r.path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.slow
def test_sigkill_mid_flow_resumes_to_identical_numbers(tmp_path):
    cfg_path = tmp_path / "kill.toml"
    cfg_path.write_text(KILL_CONFIG)
    root = tmp_path / "store"
    env = {**os.environ, "HOMFLOW_STORE": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "homflow.cli", "run", str(cfg_path), "--json"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    ck = None
    while time.time() < deadline and proc.poll() is None:
        hits = list(root.glob("*/checkpoints/flow.npz")) if root.exists() else []
        if hits:
            ck = hits[0]
            break
        time.sleep(0.05)
    assert ck is not None, "the run wrote no checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = RunStore(root)
    (rec,) = store.list()
    assert rec.status == "interrupted"  # the index stays consistent: the dead run is marked, not left 'running'
    with sqlite3.connect(store.index_path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    seg = int(np.load(ck)["segment"])
    assert seg < 5, "the run finished before it could be killed"
    assert not (Path(rec.path) / "arrays.npz").exists()

    # another run in the same store while the killed one waits: the index and the other run are unaffected
    ref = execute(load_config(cfg_path), store, report=False)
    res = resume(rec.id, store, report=False)
    assert res.status == "completed" and store.get(rec.id).status == "completed"
    assert store.get(ref.run).status == "completed"
    a = np.load(Path(res.path) / "arrays.npz")
    b = np.load(Path(ref.path) / "arrays.npz")
    assert set(a.files) == set(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit
    assert [c["value"] for c in res.checks] == [c["value"] for c in ref.checks]
    summary = res.summary
    assert summary["stats"]["resumed_from"] == seg + 1
