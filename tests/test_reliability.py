"""Reliability and security of the store and the CLI (issue 16), in the style of an attacker's audit: hostile names
stay inside the store, user text is never markup, a damaged index is named with its way out, a read-only store reads,
bad input is refused before a run exists (exit 2, one line, one JSON object with --json), one resume at a time.

Cheap tests (no flow is integrated); the SIGKILL, full-disk and sweep tests are in test_reliability_kill.py."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from homflow.cli import app
from homflow.store import DamagedFileError, Run, RunStore, StoreError, path_inside, safe_component

runner = CliRunner()

SMALL = """
experiment = "flow"
loss = "square"
analyses = ["loss_norm", "balance"]
[data]
kind = "teacher_student"
n = 12
d = 3
teacher_width = 2
labels = "value"
[model]
kind = "two_layer"
width = 4
[init]
scale = 1e-2
[flow]
t1 = 5.0
segments = 1
n_save = 8
"""


def invoke(args, store=None):
    extra = ["--store", str(store)] if store is not None else []
    return runner.invoke(app, [*args, *extra], catch_exceptions=False)


def one_line_error(res, code=2):
    """The CLI refused cleanly: the exit code, one line on stderr, no traceback."""
    err = res.stderr.strip()
    assert res.exit_code == code, (res.exit_code, res.stdout, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def json_error(res, code=2):
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stdout
    obj = json.loads(lines[0])
    assert obj["exit_code"] == code and obj["error"] and {"run", "path", "checks"} <= set(obj)
    return obj


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "small.toml"
    p.write_text(SMALL)
    return p


def _fake_completed(store: RunStore, name="done", error=None, status="completed"):
    """A run with the files a completed run has (no flow integrated)."""
    r = store.create("flow", name=name)
    r.write_text("config.toml", SMALL)
    r.save_arrays({"t": np.arange(3.0)})
    checks = [{"name": "c", "value": 0.0, "tolerance": 1.0, "passed": True}]
    r.write_json("checks.json", checks)
    r.write_json("summary.json", {"summary": {}, "passed": True, "duration_s": 0.1})
    store.finish(r.id, status=status, checks=checks, error=error, duration_s=0.1)
    return r


# 1. hostile names stay inside the store --------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "../../etc/passwd", "/tmp/x", "a/b", ".hidden", "..", "x\0y", ""])
def test_hostile_run_ids_refused(tmp_path, bad):
    s = RunStore(tmp_path / "store")
    with pytest.raises(ValueError, match="run_id"):
        s.create("flow", run_id=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


@pytest.mark.parametrize("bad", ["../../x", "/tmp/evil", "figures/../../x", "checkpoints/../../../y"])
def test_write_text_stays_in_run_dir(tmp_path, bad):
    r = RunStore(tmp_path / "store").create("flow")
    with pytest.raises(ValueError):
        r.write_text(bad, "pwned")
    assert not (tmp_path / "x").exists() and not Path("/tmp/evil").exists()
    assert r.write_text("figures/ok.txt", "fine").read_text() == "fine"


def test_safe_component_and_sweep_name(tmp_path):
    from homflow.sweep import _report_path, _sweep_id, parse_sweep

    for name in ["/../../../../../../../../tmp/x/ESCAPED", "[/x]", "..", "a\x1b[31mb", "名前", "x" * 500]:
        c = safe_component(name)
        assert c and c == safe_component(c) and "/" not in c and not c.startswith(".") and len(c) <= 120
    d = {"experiment": "flow", "sweep": {"name": "/../../../../../../../../tmp/x/ESCAPED",
                                         "grid": {"init.seed": [0]}}}
    sw = parse_sweep(d)
    store = RunStore(tmp_path / "store")
    sid = _sweep_id(sw)
    rp = _report_path(store, sid)
    assert store.root.resolve() in rp.parents and sid == safe_component(sid)
    with pytest.raises(ValueError, match="outside"):
        path_inside(store.root, store.root / ".." / "x")


# 2. user text is plain text -----------------------------------------------------------------------------------------
def test_markup_in_user_text_is_printed_literally(tmp_path, cfg):
    store = tmp_path / "store"
    res = invoke(["run", str(cfg), "--set", "[/x]=1"], store)
    assert "[/x]" in one_line_error(res)
    res = invoke(["run", str(cfg), "--set", "model.[bold]w[/bold]=1"], store)
    assert "[bold]w[/bold]" in one_line_error(res)
    s = RunStore(store)
    r = _fake_completed(s, name="[/x]", error="[/x] boom [red]", status="failed")
    res = invoke(["show", r.id], store)
    assert res.exit_code == 1 and "[/x] boom [red]" in res.stdout
    res = invoke(["list"], store)
    assert res.exit_code == 0 and r.id in res.stdout
    res = invoke(["sweep", "--help"])
    assert res.exit_code == 0 and "Usage" in res.stdout
    res = invoke(["run", str(cfg), "--set", "\x1b[31mkey=1"], store)  # a terminal escape code in a key
    err = one_line_error(res)
    assert "\x1b" not in err and "\\x1b" in err


# 3. a missing, empty or damaged index is named, and rebuilt by `store repair` -------------------------------------
@pytest.mark.parametrize("damage", ["delete", "empty", "garbage"])
def test_damaged_index_named_and_repaired(tmp_path, damage):
    store = tmp_path / "store"
    s = RunStore(store)
    a, b = _fake_completed(s, "a"), _fake_completed(s, "b")
    idx = store / "index.sqlite"
    for f in store.glob("index.sqlite*"):
        f.unlink()
    if damage == "empty":
        idx.write_bytes(b"")
    elif damage == "garbage":
        idx.write_bytes(b"this is not a database" * 100)
    for cmd in (["list"], ["show", a.id], ["list", "--json"]):
        res = invoke(cmd, store)
        err = one_line_error(res)
        assert "index.sqlite" in err and "store repair" in err
    res = invoke(["store", "check"], store)
    assert res.exit_code == 1
    res = invoke(["store", "repair", "--json"], store)
    assert res.exit_code == 0 and sorted(json.loads(res.stdout)["added"]) == sorted([a.id, b.id])
    recs = {r.id: r for r in RunStore(store).list()}
    assert set(recs) == {a.id, b.id} and all(r.status == "completed" and r.n_checks == 1 for r in recs.values())
    assert invoke(["store", "check"], store).exit_code == 0


def test_index_paths_are_relative_store_moves(tmp_path):
    s = RunStore(tmp_path / "one")
    r = _fake_completed(s)
    with sqlite3.connect(s.index_path) as con:
        (path,) = con.execute("SELECT path FROM runs").fetchone()
    assert not os.path.isabs(path)
    shutil.move(str(tmp_path / "one"), str(tmp_path / "two"))
    res = invoke(["show", r.id, "--json"], tmp_path / "two")
    assert res.exit_code == 0 and json.loads(res.stdout)["record"]["path"] == str((tmp_path / "two" / r.id).resolve())


# 7. a read-only store can be listed and shown ----------------------------------------------------------------------
def test_read_only_store(tmp_path):
    """A store whose files and directories have no write bit (read-only media, another user's store) is listed and
    shown without writing anything, not even SQLite's -wal/-shm files (also when running as root)."""
    store = tmp_path / "store"
    s = RunStore(store)
    r = _fake_completed(s)
    paths = [store, *store.rglob("*")]

    def snapshot():
        return {str(p): p.stat().st_mtime_ns for p in [store, *store.rglob("*")]}

    for p in paths:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    try:
        before = snapshot()
        res = invoke(["list", "--json"], store)
        assert res.exit_code == 0, res.stderr
        assert [x["id"] for x in json.loads(res.stdout)["runs"]] == [r.id]
        res = invoke(["show", r.id, "--json"], store)
        assert res.exit_code == 0 and json.loads(res.stdout)["status"] == "completed", res.stderr
        assert invoke(["store", "check"], store).exit_code == 0
        assert snapshot() == before  # nothing written, nothing created
        with pytest.raises(StoreError, match="read-only"):
            RunStore(store, readonly=True).create("flow")
    finally:
        for p in paths:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)


# 8. bad input refused before a run exists ----------------------------------------------------------------------------
def test_bad_files_refused_before_a_run_exists(tmp_path, cfg):
    store = tmp_path / "store"
    zero = tmp_path / "zero.npz"
    zero.write_bytes(b"")
    cplx = tmp_path / "cplx.npz"
    np.savez(cplx, X=np.ones((4, 3)) + 1j, y=np.ones(4))
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    adir = tmp_path / "dir.npz"
    adir.mkdir()
    for path, needle in ((zero, "empty"), (cplx, "complex"), (fifo, "FIFO"), (adir, "directory")):
        res = invoke(["run", str(cfg), "--json", "--set", "data.kind='file'", "--set", f"data.path='{path}'"], store)
        assert needle in one_line_error(res) and "data.path" in json_error(res)["error"]
    assert not store.exists() or RunStore(store).list() == []  # no run row was ever created
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = invoke(["run", str(cfg), "--json"], afile / "store")  # --store under a file
    assert "is a file" in one_line_error(res) and json_error(res)
    res = invoke(["list", "--limit", "abc", "--json"], store)
    assert "--limit" in one_line_error(res) and json_error(res)


def test_complex_dataset_api_refused():
    from homflow.data import Dataset

    with pytest.raises(ValueError, match="complex"):
        Dataset(np.ones((3, 2)) + 1j, np.ones(3))
    with pytest.raises(ValueError, match="complex"):
        Dataset(np.ones((3, 2)), np.ones(3) * 1j)


def test_empty_config_and_newline_set_refused(tmp_path, cfg):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert "empty" in one_line_error(invoke(["run", str(empty)], tmp_path / "s"))
    assert "one line" in one_line_error(invoke(["run", str(cfg), "--set", "init.scale=1e-3\nflow.t1=1e9"],
                                               tmp_path / "s"))
    assert "one line" in one_line_error(invoke(["run", str(cfg), "--name", "a\nb"], tmp_path / "s"))


def test_report_that_fails_to_write_exits_nonzero(tmp_path, cfg, monkeypatch):
    import errno

    import homflow.report as report

    def full(*a, **k):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(report, "write_run_report", full)
    res = invoke(["run", str(cfg), "--json"], tmp_path / "store")
    assert res.exit_code == 1 and "report" in res.stderr and "File too large" in res.stderr
    assert "report could not be written" in json.loads(res.stdout)["error"]


# 9. missing run directories and damaged run files are named ---------------------------------------------------------
def test_deleted_run_dir_named(tmp_path):
    store = tmp_path / "store"
    r = _fake_completed(RunStore(store))
    shutil.rmtree(r.path)
    for cmd in (["show", r.id], ["report", r.id], ["resume", r.id]):
        err = one_line_error(invoke(cmd, store))
        assert "missing" in err or "completed" in err
    assert "missing" in one_line_error(invoke(["show", r.id], store)) and not r.path.exists()
    found = RunStore(store).check()
    assert found["missing"] == [r.id] and not found["ok"]
    assert RunStore(store).repair()["dropped"] == [r.id] and RunStore(store).list() == []


def test_garbage_arrays_and_checkpoint_named(tmp_path):
    s = RunStore(tmp_path / "store")
    r = _fake_completed(s)
    (r.path / "arrays.npz").write_bytes(b"\x80\x04garbage pickle")
    with pytest.raises(DamagedFileError, match="arrays.npz") as e:
        r.load_arrays()
    assert "homflow run" in str(e.value)
    r.save_checkpoint("flow", {"x": np.ones(2)})
    (r.checkpoint_dir / "flow.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DamagedFileError, match=r"flow\.npz.*rm .*homflow resume"):
        r.load_checkpoint("flow")
    assert len(s.check()["damaged"]) == 2


# 10. one resume at a time, literal prefixes, orphans ---------------------------------------------------------------
def test_one_resume_at_a_time(tmp_path):
    s = RunStore(tmp_path / "store")
    r = s.create("flow")
    s.finish(r.id, status="interrupted")
    s.mark_running(r.id)  # this process resumes it and holds its lock
    other = RunStore(tmp_path / "store")  # another opener (flock is per open file: as another process would be)
    with pytest.raises(StoreError, match="another process"):
        other.mark_running(r.id)
    s.finish(r.id, status="completed")
    with pytest.raises(StoreError, match="completed"):
        other.mark_running(r.id)


def test_sql_wildcards_are_literal(tmp_path):
    store = tmp_path / "store"
    _fake_completed(RunStore(store))
    for pat in ("_", "%", "2%", "_0"):
        assert "no run" in one_line_error(invoke(["show", pat], store))


def test_orphan_from_a_kill_between_dir_and_row(tmp_path, monkeypatch):
    s = RunStore(tmp_path / "store")

    def killed(row):
        raise KeyboardInterrupt  # the process dies after the directory exists, before its index row

    monkeypatch.setattr(s, "_insert", killed)
    with pytest.raises(KeyboardInterrupt):
        s.create("flow", name="orphan")
    monkeypatch.undo()
    s._unlock(next(iter(s._locks), ""))
    (orphan,) = [p.name for p in s.run_dirs()]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    meta = json.loads((s.root / orphan / "run.json").read_text())
    (s.root / orphan / "run.json").write_text(json.dumps({**meta, "pid": dead.pid}))  # its process is gone
    assert RunStore(tmp_path / "store").list() == []
    found = RunStore(tmp_path / "store").check()
    assert found["orphans"] == [orphan] and not found["ok"]
    RunStore(tmp_path / "store").repair()
    (rec,) = RunStore(tmp_path / "store").list()
    assert rec.id == orphan and rec.status == "interrupted"


def test_run_class_refuses_traversal(tmp_path):
    s = RunStore(tmp_path / "store")
    for bad in ("../x", "a/../../b", "sweeps"):
        with pytest.raises(ValueError):
            Run(s, bad)
