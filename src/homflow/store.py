"""The run store: one directory per run plus an SQLite index (WAL mode) of runs, their status, timings and verdicts.

Layout of a run directory ``<root>/<run id>/``::

    config.toml      the full configuration (experiment name and its parameters)
    arrays.npz       the arrays the experiment returned
    checks.json      the checks with their verdicts
    summary.json     the experiment's summary, its figure specs, timings
    figures/*.png    the figures (written by the report)
    report.html      the self-contained report
    checkpoints/     ``<name>.npz`` checkpoints of long computations

Every file is written atomically (a temporary file in the same directory, then ``os.replace``), so killing a run at
any moment leaves complete files only: the index and the other runs are never touched by a dying run. A run whose
process died while ``running`` is reported as ``interrupted`` (its pid is gone) and can be resumed from its last
checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import io
import json
import os
import secrets
import socket
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["RunStore", "Run", "RunRecord", "STATUSES", "default_root", "atomic_write_bytes", "atomic_write_text"]

STATUSES = ("running", "completed", "failed", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    name TEXT,
    status TEXT NOT NULL,
    quick INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    duration_s REAL,
    n_checks INTEGER,
    n_passed INTEGER,
    passed INTEGER,
    path TEXT NOT NULL,
    sweep TEXT,
    pid INTEGER,
    host TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_sweep ON runs (sweep);
"""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def default_root() -> Path:
    """The store root: ``$HOMFLOW_STORE`` if set, else ``./runs``."""
    return Path(os.environ.get("HOMFLOW_STORE") or "runs")


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _npz_bytes(arrays: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process
        return True
    # a zombie (killed child not yet reaped) is dead for our purposes
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One row of the index."""

    id: str
    experiment: str
    name: str | None
    status: str
    quick: bool
    created: float
    started: float | None
    finished: float | None
    duration_s: float | None
    n_checks: int | None
    n_passed: int | None
    passed: bool | None
    path: str
    sweep: str | None
    pid: int | None
    host: str | None
    error: str | None

    @property
    def created_iso(self) -> str:
        return _dt.datetime.fromtimestamp(self.created).isoformat(timespec="seconds")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Run:
    """A run directory: atomic writers and readers for its files, and checkpoints."""

    def __init__(self, store: "RunStore", run_id: str):
        self.store = store
        self.id = run_id
        self.path = store.root / run_id

    # -- files ----------------------------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    def write_text(self, name: str, text: str) -> Path:
        atomic_write_text(self.path / name, text)
        return self.path / name

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2, default=_json_default))

    def read_json(self, name: str, default: Any = None) -> Any:
        p = self.path / name
        if not p.exists():
            return default
        return json.loads(p.read_text())

    def save_arrays(self, arrays: dict[str, Any], name: str = "arrays.npz") -> Path:
        atomic_write_bytes(self.path / name, _npz_bytes(arrays))
        return self.path / name

    def load_arrays(self, name: str = "arrays.npz") -> dict[str, np.ndarray]:
        p = self.path / name
        return _load_npz(p) if p.exists() else {}

    def save_checkpoint(self, name: str, arrays: dict[str, Any]) -> None:
        """Write the checkpoint ``name`` atomically (the previous one stays valid until the new one is complete)."""
        _check_name(name)
        atomic_write_bytes(self.checkpoint_dir / f"{name}.npz", _npz_bytes(arrays))
        self.store._touch(self.id)

    def load_checkpoint(self, name: str) -> dict[str, np.ndarray] | None:
        _check_name(name)
        p = self.checkpoint_dir / f"{name}.npz"
        return _load_npz(p) if p.exists() else None

    def checkpoints(self) -> list[str]:
        if not self.checkpoint_dir.exists():
            return []
        return sorted(p.stem for p in self.checkpoint_dir.glob("*.npz"))

    @property
    def record(self) -> RunRecord:
        return self.store.get(self.id)


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "/\\\0") or name.startswith("."):
        raise ValueError(f"checkpoint `name` must be a plain file name; got {name!r}.")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


class RunStore:
    """A directory of runs and its SQLite index ``index.sqlite`` (WAL mode, so readers never block the writer).

    Arguments:
        root: the store directory (created if missing); default :func:`default_root`.

    >>> import tempfile
    >>> s = RunStore(tempfile.mkdtemp())
    >>> r = s.create("flow", name="x")
    >>> s.get(r.id).status
    'running'
    """

    def __init__(self, root: os.PathLike | str | None = None):
        self.root = Path(root) if root is not None else default_root()
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"`store` must be a directory; {str(self.root)!r} is a file.")
        self.root.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / "index.sqlite"
        with self._connect() as con:
            con.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.index_path, timeout=30.0, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA busy_timeout=30000")
            yield con
        finally:
            con.close()

    def _execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                rows = con.execute(sql, args).fetchall()
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return rows

    # -- creating and updating runs --------------------------------------------------------------------------------
    def create(self, experiment: str, *, name: str | None = None, quick: bool = False, sweep: str | None = None,
               run_id: str | None = None) -> Run:
        """Register a new run (status ``running``, this process's pid) and create its directory."""
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in (name or experiment))[:40]
        run_id = run_id or f"{stamp}-{slug}-{secrets.token_hex(3)}"
        run = Run(self, run_id)
        run.path.mkdir(parents=True, exist_ok=False)
        (run.path / "figures").mkdir(exist_ok=True)
        run.checkpoint_dir.mkdir(exist_ok=True)
        now = time.time()
        self._execute(
            "INSERT INTO runs (id, experiment, name, status, quick, created, started, path, sweep, pid, host) "
            "VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
            (run_id, experiment, name, int(bool(quick)), now, now, str(run.path.resolve()), sweep, os.getpid(),
             socket.gethostname()),
        )
        return run

    def mark_running(self, run_id: str) -> None:
        """Mark a run as running again (``resume``), owned by this process."""
        self._execute("UPDATE runs SET status='running', pid=?, host=?, error=NULL, started=? WHERE id=?",
                      (os.getpid(), socket.gethostname(), time.time(), run_id))

    def finish(self, run_id: str, *, status: str, checks: list[dict] | None = None, error: str | None = None,
               duration_s: float | None = None) -> None:
        """Record the end of a run: its status, verdicts (number of checks, passed) and timing."""
        if status not in STATUSES:
            raise ValueError(f"`status` must be one of {STATUSES}; got {status!r}.")
        n = n_ok = ok = None
        if checks is not None:
            n = len(checks)
            n_ok = sum(bool(c["passed"]) for c in checks)
            ok = int(n_ok == n)
        self._execute(
            "UPDATE runs SET status=?, finished=?, duration_s=COALESCE(?, duration_s), n_checks=COALESCE(?, n_checks),"
            " n_passed=COALESCE(?, n_passed), passed=COALESCE(?, passed), error=? WHERE id=?",
            (status, time.time(), duration_s, n, n_ok, ok, error, run_id),
        )

    def _touch(self, run_id: str) -> None:
        pass  # checkpoints live in the run directory; the index is updated on status changes only

    # -- reading ----------------------------------------------------------------------------------------------------
    def _refresh_dead(self) -> None:
        """Mark ``running`` runs of this host whose process is gone as ``interrupted``."""
        host = socket.gethostname()
        rows = self._execute("SELECT id, pid, host FROM runs WHERE status='running'")
        for rid, pid, h in rows:
            if h == host and not _pid_alive(pid):
                self._execute("UPDATE runs SET status='interrupted', error=COALESCE(error, 'process ended without "
                              "finishing (killed?); resume it with `homflow resume`') WHERE id=? AND status='running'",
                              (rid,))

    def list(self, *, sweep: str | None = None, limit: int | None = None) -> list[RunRecord]:
        """All runs, newest first (optionally those of one sweep)."""
        self._refresh_dead()
        sql = "SELECT * FROM runs" + (" WHERE sweep=?" if sweep else "") + " ORDER BY created DESC, id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._connect() as con:
            rows = con.execute(sql, (sweep,) if sweep else ()).fetchall()
        return [_record(r) for r in rows]

    def get(self, run: str) -> RunRecord:
        """The run with id ``run``, or the unique run whose id starts with (or whose name equals) ``run``.

        Raises:
            ValueError: if no run or several runs match.
        """
        self._refresh_dead()
        with self._connect() as con:
            rows = con.execute("SELECT * FROM runs WHERE id=?", (run,)).fetchall()
            if not rows:
                rows = con.execute("SELECT * FROM runs WHERE id LIKE ? OR name=? ORDER BY created DESC",
                                   (run.replace("%", "") + "%", run)).fetchall()
        if not rows:
            raise ValueError(f"no run {run!r} in the store {str(self.root)!r}; `homflow list` shows the runs.")
        if len(rows) > 1:
            ids = [r[0] for r in rows[:5]]
            raise ValueError(f"`run` {run!r} matches {len(rows)} runs ({', '.join(ids)}...); give more of the id.")
        return _record(rows[0])

    def open(self, run: str) -> Run:
        """The :class:`Run` (directory handle) of ``run`` (an id, an id prefix or a name)."""
        return Run(self, self.get(run).id)

    def sweeps(self) -> list[str]:
        rows = self._execute("SELECT DISTINCT sweep FROM runs WHERE sweep IS NOT NULL")
        return sorted(r[0] for r in rows)


def _record(row: tuple) -> RunRecord:
    (rid, exp, name, status, quick, created, started, finished, dur, n, n_ok, ok, path, sweep, pid, host, err) = row
    return RunRecord(rid, exp, name, status, bool(quick), created, started, finished, dur, n, n_ok,
                     None if ok is None else bool(ok), path, sweep, pid, host, err)
