"""The run store: one directory per run plus an SQLite index (WAL mode) of runs, their status, timings and verdicts.

Layout of a run directory ``<root>/<run id>/``::

    run.json         the run's own record (id, experiment, status, timings, verdicts): the directory describes itself,
                     so ``homflow store repair`` can rebuild a lost or damaged index from the run directories
    config.toml      the full configuration (experiment name and its parameters)
    arrays.npz       the arrays the experiment returned
    checks.json      the checks with their verdicts
    summary.json     the experiment's summary, its figure specs, timings
    figures/*.png    the figures (written by the report)
    report.html      the self-contained report
    checkpoints/     ``<name>.npz`` checkpoints of long computations
    .lock            held (``flock``) by the process that runs or resumes the run: one at a time

Every file is written atomically (a temporary file in the same directory, then ``os.replace``), so killing a run at
any moment leaves complete files only: the index and the other runs are never touched by a dying run. A run whose
process died while ``running`` is reported as ``interrupted`` (its pid is gone) and can be resumed from its last
checkpoint. Every name that becomes a path (run ids, file names, sweep names) is reduced to a safe component and the
final path is checked to lie inside the store. Paths in the index are relative to the store, so a store can be moved.
A store opened with ``readonly=True`` (``homflow list``, ``show``) never writes, and works on a read-only directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import io
import json
import os
import re
import secrets
import socket
import sqlite3
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["RunStore", "Run", "RunRecord", "STATUSES", "StoreError", "DamagedFileError", "default_root",
           "atomic_write_bytes", "atomic_write_text", "safe_component", "path_inside"]

STATUSES = ("running", "completed", "failed", "interrupted")

INDEX_NAME = "index.sqlite"
RUN_FILE = "run.json"
RESERVED_DIRS = ("sweeps", "cache")  # store-level directories that are not runs

_COLUMNS = ("id", "experiment", "name", "status", "quick", "created", "started", "finished", "duration_s", "n_checks",
            "n_passed", "passed", "path", "sweep", "pid", "host", "error", "point")

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
    error TEXT,
    point INTEGER
);
CREATE INDEX IF NOT EXISTS runs_sweep ON runs (sweep);
"""

# the longest name component a run id or file name may have (most file systems allow 255 bytes)
MAX_COMPONENT = 120


class StoreError(ValueError):
    """The store cannot be used as it is (missing, damaged or unreadable index, missing run directory, busy run):
    the message names the file and the way out."""


class DamagedFileError(StoreError):
    """A file of a run (arrays, checkpoint, JSON) that cannot be read: the message names it and what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def default_root() -> Path:
    """The store root: ``$HOMFLOW_STORE`` if set, else ``./runs``."""
    return Path(os.environ.get("HOMFLOW_STORE") or "runs")


def safe_component(name: str, *, max_len: int = MAX_COMPONENT) -> str:
    """``name`` reduced to one safe path component: letters, digits, ``-``, ``_`` and inner ``.``, at most
    ``max_len`` characters; never empty, never ``.``/``..``, never hidden.

    >>> safe_component("/../../tmp/x/ESCAPED")
    'tmp-x-ESCAPED'
    >>> safe_component("[/x]")
    'x'
    """
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name))
    s = re.sub(r"-{2,}", "-", s).strip("-.")
    s = s[:max_len].strip("-.")
    return s or "x"


def _plain_component(name) -> bool:
    """One path component that cannot leave its directory: no separator, NUL or control character, not hidden, not
    ``.``/``..``, at most ``MAX_COMPONENT`` characters (new ids are :func:`safe_component`; older stores may hold ids
    with other letters, which stay readable)."""
    return (isinstance(name, str) and 0 < len(name) <= MAX_COMPONENT and not name.startswith(".")
            and not any(c in name for c in "/\\\0") and name.isprintable() and name.strip() == name)


def path_inside(root: os.PathLike | str, path: os.PathLike | str, what: str = "path") -> Path:
    """``path`` if it lies inside the directory ``root`` (after resolving ``..`` and links), else a
    :class:`ValueError` naming it."""
    root_r = Path(root).resolve()
    p = Path(path)
    p_r = (p if p.is_absolute() else Path(root) / p).resolve()
    if p_r != root_r and root_r not in p_r.parents:
        raise ValueError(f"`{what}` {str(path)!r} would lie outside the store directory {str(root_r)!r}.")
    return p_r


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


def _load_npz(path: Path, hint: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        reason = "it holds Python objects, not plain arrays" if "pickle" in str(e) else f"{type(e).__name__}: {e}"
        raise DamagedFileError(f"the file {str(path)!r} is damaged or not a NumPy .npz archive ({reason}); {hint}") \
            from None


def _disk_trouble(e: Exception) -> bool:
    """SQLite's words for a full disk, a file-size limit or an I/O error (not a damaged file)."""
    return any(w in str(e).lower() for w in ("full", "disk i/o", "too large"))


def _writable(path: Path) -> bool:
    """Writable by us and not marked read-only (no write bit: a read-only store even for root)."""
    try:
        return os.access(path, os.W_OK) and bool(os.stat(path).st_mode & 0o222)
    except OSError:
        return False


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
    """One row of the index (``path``: the absolute run directory, computed from the store root)."""

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
    point: int | None = None

    @property
    def created_iso(self) -> str:
        return _dt.datetime.fromtimestamp(self.created).isoformat(timespec="seconds")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Run:
    """A run directory: atomic writers and readers for its files, and checkpoints.

    Raises:
        ValueError: if ``run_id`` is not a safe path component (``../x``, ``a/b``, hidden names).
    """

    def __init__(self, store: "RunStore", run_id: str):
        if not _plain_component(run_id) or run_id in RESERVED_DIRS:
            raise ValueError(f"`run_id` must be a plain name of letters, digits, '-', '_' and '.'; got {run_id!r}.")
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

    def file(self, name: str) -> Path:
        """The path of the file ``name`` (a relative path such as ``figures/x.png``) inside the run directory.

        Raises:
            ValueError: if ``name`` is absolute or leads outside the run directory.
        """
        if not isinstance(name, str) or not name or os.path.isabs(name) or "\0" in name:
            raise ValueError(f"`name` must be a relative file name inside the run directory; got {name!r}.")
        path_inside(self.path, self.path / name, "name")
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        p = self.file(name)
        atomic_write_text(p, text)
        return p

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2, default=_json_default))

    def read_json(self, name: str, default: Any = None) -> Any:
        p = self.file(name)
        if not p.exists():
            return default
        try:
            return json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DamagedFileError(f"the file {str(p)!r} is damaged ({type(e).__name__}: {e}); `homflow store check` "
                                   f"lists damaged runs; rerun the run's config.toml to recreate it.") from None

    def save_arrays(self, arrays: dict[str, Any], name: str = "arrays.npz") -> Path:
        p = self.file(name)
        atomic_write_bytes(p, _npz_bytes(arrays))
        return p

    def load_arrays(self, name: str = "arrays.npz") -> dict[str, np.ndarray]:
        p = self.file(name)
        hint = (f"the run's results are lost: rerun its config (`homflow run {self.path / 'config.toml'}`) or delete "
                f"the run directory {str(self.path)!r} and run `homflow store repair`.")
        return _load_npz(p, hint) if p.exists() else {}

    def save_checkpoint(self, name: str, arrays: dict[str, Any]) -> None:
        """Write the checkpoint ``name`` atomically (the previous one stays valid until the new one is complete)."""
        _check_name(name)
        atomic_write_bytes(self.checkpoint_dir / f"{name}.npz", _npz_bytes(arrays))

    def load_checkpoint(self, name: str) -> dict[str, np.ndarray] | None:
        """The checkpoint ``name``, ``None`` if there is none.

        Raises:
            DamagedFileError: the checkpoint cannot be read (the message says how to restart without it).
        """
        _check_name(name)
        p = self.checkpoint_dir / f"{name}.npz"
        hint = (f"delete it (rm {str(p)!r}) and `homflow resume {self.id}` recomputes that part from the start.")
        return _load_npz(p, hint) if p.exists() else None

    def checkpoints(self) -> list[str]:
        if not self.checkpoint_dir.exists():
            return []
        return sorted(p.stem for p in self.checkpoint_dir.glob("*.npz"))

    @property
    def record(self) -> RunRecord:
        return self.store.get(self.id)


def _check_name(name: str) -> None:
    if not _plain_component(name):
        raise ValueError(f"checkpoint `name` must be a plain file name (letters, digits, '-', '_', '.'); got {name!r}.")


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


def _lock_file(path: Path):
    """Take an exclusive, non-blocking ``flock`` on ``path``; the open file (to keep) or ``None`` if it is held."""
    import fcntl

    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


class RunStore:
    """A directory of runs and its SQLite index ``index.sqlite`` (WAL mode, so readers never block the writer).

    Arguments:
        root: the store directory (created if missing, unless ``readonly``); default :func:`default_root`.
        readonly: open the index read-only and never write (for listing and showing runs; works on a read-only
            directory).

    Raises:
        StoreError: ``root`` is not a directory, or the index is missing, empty or damaged while run directories exist
            (the message names the file and says ``homflow store repair`` rebuilds it).

    >>> import tempfile
    >>> s = RunStore(tempfile.mkdtemp())
    >>> r = s.create("flow", name="x")
    >>> s.get(r.id).status
    'running'
    """

    def __init__(self, root: os.PathLike | str | None = None, *, readonly: bool = False, check_index: bool = True):
        self.root = Path(root) if root is not None else default_root()
        self.readonly = bool(readonly)
        self.index_path = self.root / INDEX_NAME
        self._locks: dict[str, Any] = {}
        for parent in (self.root, *self.root.parents):
            if parent.exists() and not parent.is_dir():
                raise StoreError(f"`store` must be a directory; {str(parent)!r} is a file.")
        if self.readonly:
            if not self.root.is_dir():
                raise StoreError(f"no run store at {str(self.root)!r} (no such directory).")
        else:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the store directory {str(self.root)!r}: {e.strerror or e}.") from None
        if check_index:
            self._open_index()

    # -- the index file ---------------------------------------------------------------------------------------------
    def run_dirs(self) -> list[Path]:
        """The run directories of the store (sub-directories holding ``run.json`` or ``config.toml``)."""
        out = []
        with contextlib.suppress(OSError):
            for p in sorted(self.root.iterdir()):
                if p.is_dir() and not p.name.startswith(".") and p.name not in RESERVED_DIRS \
                        and ((p / RUN_FILE).is_file() or (p / "config.toml").is_file()):
                    out.append(p)
        return out

    def _damaged(self, what: str) -> StoreError:
        return StoreError(f"the run index {str(self.index_path)!r} {what}; `homflow store repair --store "
                          f"{str(self.root)!r}` rebuilds it from the run directories.")

    def _open_index(self) -> None:
        exists = self.index_path.exists()
        if exists and not self.index_path.is_file():
            raise self._damaged("is not a regular file")
        if not exists or self.index_path.stat().st_size == 0:
            n = len(self.run_dirs())
            if n:
                raise self._damaged(f"is {'missing' if not exists else 'empty (0 bytes)'} while the store holds {n} "
                                    f"run director{'y' if n == 1 else 'ies'}")
            if self.readonly:
                return  # an empty store: nothing to list
        try:
            if self.readonly:
                with self._connect() as con:
                    con.execute("SELECT count(*) FROM runs").fetchone()
            else:
                with self._connect() as con:
                    con.executescript(_SCHEMA)
                    cols = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
                    if "point" not in cols:  # a store written before sweep points were recorded
                        con.execute("ALTER TABLE runs ADD COLUMN point INTEGER")
        except sqlite3.DatabaseError as e:
            if "readonly" in str(e) or "read-only" in str(e):
                raise StoreError(f"the store {str(self.root)!r} is read-only ({e}); only `homflow list`, `show` and "
                                 f"`store check` work on it.") from None
            if _disk_trouble(e):
                raise OSError(errno.ENOSPC, f"cannot write the run index {str(self.index_path)!r}: {e}") from None
            raise self._damaged(f"cannot be read ({type(e).__name__}: {e})") from None

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            uri = self.index_path.resolve().as_uri()
            con = None
            if _writable(self.root) and _writable(self.index_path):
                try:  # read-only, but seeing a concurrent writer's WAL
                    con = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30.0, isolation_level=None)
                    con.execute("SELECT count(*) FROM sqlite_master").fetchone()
                except sqlite3.OperationalError:
                    con = None
            if con is None:  # a read-only directory or file: read the file as it is (no -wal/-shm to create)
                con = sqlite3.connect(f"{uri}?immutable=1", uri=True, timeout=30.0, isolation_level=None)
            try:
                yield con
            finally:
                con.close()
            return
        con = sqlite3.connect(self.index_path, timeout=30.0, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute("PRAGMA busy_timeout=30000")
            yield con
        finally:
            con.close()

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        if self.readonly and not self.index_path.exists():
            return []
        try:
            with self._connect() as con:
                return con.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise self._damaged(f"cannot be read ({type(e).__name__}: {e})") from None

    def _execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        if self.readonly:
            raise StoreError(f"the store {str(self.root)!r} was opened read-only; cannot write to it.")
        try:
            with self._connect() as con:
                con.execute("BEGIN IMMEDIATE")
                try:
                    rows = con.execute(sql, args).fetchall()
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                return rows
        except sqlite3.DatabaseError as e:
            if "readonly" in str(e):
                raise StoreError(f"the store {str(self.root)!r} is read-only ({e}).") from None
            if _disk_trouble(e):
                raise OSError(errno.ENOSPC, f"cannot write the run index {str(self.index_path)!r}: {e}") from None
            raise self._damaged(f"cannot be written ({type(e).__name__}: {e})") from None

    # -- the run's own record (run.json) ----------------------------------------------------------------------------
    def _write_run_file(self, run_id: str) -> None:
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE id=?", (run_id,))
        if rows:
            d = dict(zip(_COLUMNS, rows[0]))
            d["path"] = run_id
            with contextlib.suppress(OSError):  # the index row is what counts; run.json is its copy for repairs
                atomic_write_text(self.root / run_id / RUN_FILE, json.dumps(d, indent=2))

    # -- creating and updating runs --------------------------------------------------------------------------------
    def create(self, experiment: str, *, name: str | None = None, quick: bool = False, sweep: str | None = None,
               run_id: str | None = None, point: int | None = None) -> Run:
        """Register a new run (status ``running``, this process's pid, its lock held) and create its directory.

        The directory and its ``run.json`` come first, the index row last: a kill in between leaves an orphan that
        ``homflow store check`` finds and ``store repair`` indexes.

        Raises:
            ValueError: a ``run_id`` that is not a safe name, or one that exists already.
        """
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        slug = safe_component(name or experiment, max_len=40)
        run_id = run_id if run_id is not None else f"{stamp}-{slug}-{secrets.token_hex(3)}"
        run = Run(self, run_id)
        path_inside(self.root, run.path, "run_id")
        try:
            run.path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise ValueError(f"`run_id` {run_id!r} exists already in the store {str(self.root)!r}.") from None
        (run.path / "figures").mkdir(exist_ok=True)
        run.checkpoint_dir.mkdir(exist_ok=True)
        self._lock(run_id)
        now = time.time()
        row = dict(id=run_id, experiment=experiment, name=name, status="running", quick=int(bool(quick)), created=now,
                   started=now, path=run_id, sweep=sweep, pid=os.getpid(), host=socket.gethostname(), point=point)
        atomic_write_text(run.path / RUN_FILE, json.dumps(row, indent=2))
        self._insert(row)
        return run

    def _insert(self, row: dict) -> None:
        cols = [c for c in _COLUMNS if c in row]
        self._execute(f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                      tuple(row[c] for c in cols))

    def _lock(self, run_id: str) -> None:
        if run_id in self._locks:
            return
        f = _lock_file(self.root / run_id / ".lock")
        if f is None:
            raise StoreError(f"run {run_id!r} is being run or resumed by another process; wait for it to finish.")
        self._locks[run_id] = f

    def _unlock(self, run_id: str) -> None:
        f = self._locks.pop(run_id, None)
        if f is not None:
            f.close()

    def mark_running(self, run_id: str) -> None:
        """Mark a run as running again (``resume``), owned by this process, holding its lock.

        Raises:
            StoreError: another process holds the run (one resume at a time), the run completed meanwhile, or its
                directory is missing.
        """
        self.open(run_id)
        self._lock(run_id)
        rec = self.get(run_id)
        if rec.status == "completed" or (rec.status == "running" and rec.pid != os.getpid() and _pid_alive(rec.pid)):
            self._unlock(run_id)
            raise StoreError(f"run {run_id!r} is {rec.status} (by another process); nothing to resume.")
        self._execute("UPDATE runs SET status='running', pid=?, host=?, error=NULL, started=? WHERE id=?",
                      (os.getpid(), socket.gethostname(), time.time(), run_id))
        self._write_run_file(run_id)

    def finish(self, run_id: str, *, status: str, checks: list[dict] | None = None, error: str | None = None,
               duration_s: float | None = None) -> None:
        """Record the end of a run: its status, verdicts (number of checks, passed) and timing; release its lock."""
        if status not in STATUSES:
            raise ValueError(f"`status` must be one of {STATUSES}; got {status!r}.")
        n = n_ok = ok = None
        if checks is not None:
            n = len(checks)
            n_ok = sum(bool(c["passed"]) for c in checks)
            ok = int(n_ok == n)
        try:
            self._execute(
                "UPDATE runs SET status=?, finished=?, duration_s=COALESCE(?, duration_s), n_checks=COALESCE(?, "
                "n_checks), n_passed=COALESCE(?, n_passed), passed=COALESCE(?, passed), error=? WHERE id=?",
                (status, time.time(), duration_s, n, n_ok, ok, error, run_id),
            )
            self._write_run_file(run_id)
        finally:
            self._unlock(run_id)

    # -- reading ----------------------------------------------------------------------------------------------------
    def _dead(self, rec: RunRecord) -> bool:
        return rec.status == "running" and rec.host == socket.gethostname() and not _pid_alive(rec.pid)

    def _refresh_dead(self) -> None:
        """Mark ``running`` runs of this host whose process is gone as ``interrupted`` (in memory when read-only)."""
        if self.readonly:
            return
        for r in self._records("SELECT * FROM runs WHERE status='running'"):
            if self._dead(r):
                self._execute("UPDATE runs SET status='interrupted', error=COALESCE(error, ?) WHERE id=? AND "
                              "status='running'", (_INTERRUPTED, r.id))
                self._write_run_file(r.id)

    def _records(self, sql: str, args: tuple = ()) -> list[RunRecord]:
        rows = self._query(sql.replace("SELECT *", f"SELECT {', '.join(_COLUMNS)}"), args)
        recs = [self._record(r) for r in rows]
        if self.readonly:  # show a dead run as the writer would record it
            recs = [dataclasses.replace(r, status="interrupted", error=r.error or _INTERRUPTED) if self._dead(r) else r
                    for r in recs]
        return recs

    def _record(self, row: tuple) -> RunRecord:
        d = dict(zip(_COLUMNS, row))
        d["quick"] = bool(d["quick"])
        d["passed"] = None if d["passed"] is None else bool(d["passed"])
        d["path"] = str(self.root.resolve() / d["id"])  # relative in the index; old stores held absolute paths
        return RunRecord(**d)

    def list(self, *, sweep: str | None = None, limit: int | None = None) -> list[RunRecord]:
        """All runs, newest first (optionally those of one sweep)."""
        self._refresh_dead()
        sql = "SELECT * FROM runs" + (" WHERE sweep=?" if sweep else "") + " ORDER BY created DESC, id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self._records(sql, (sweep,) if sweep else ())

    def get(self, run: str) -> RunRecord:
        """The run with id ``run``, or the unique run whose id starts with (or whose name equals) ``run``.

        The prefix is matched literally (``_`` and ``%`` are characters, not wildcards).

        Raises:
            ValueError: if no run or several runs match.
        """
        self._refresh_dead()
        if not isinstance(run, str) or not run:
            raise ValueError(f"`run` must be a run id, a prefix of one or a run name; got {run!r}.")
        rows = self._records("SELECT * FROM runs WHERE id=?", (run,))
        if not rows:
            rows = self._records("SELECT * FROM runs WHERE substr(id, 1, ?)=? OR name=? ORDER BY created DESC",
                                 (len(run), run, run))
        if not rows:
            raise ValueError(f"no run {run!r} in the store {str(self.root)!r}; `homflow list` shows the runs.")
        if len(rows) > 1:
            ids = [r.id for r in rows[:5]]
            raise ValueError(f"`run` {run!r} matches {len(rows)} runs ({', '.join(ids)}...); give more of the id.")
        return rows[0]

    def open(self, run: str) -> Run:
        """The :class:`Run` (directory handle) of ``run`` (an id, an id prefix or a name).

        Raises:
            StoreError: the run's directory is missing (the message says how to clean the index).
        """
        r = Run(self, self.get(run).id)
        if not r.path.is_dir():
            raise StoreError(f"run {r.id!r}: its directory {str(r.path)!r} is missing; `homflow store check` lists "
                             f"such runs and `homflow store repair` drops them from the index.")
        return r

    def sweeps(self) -> list[str]:
        rows = self._query("SELECT DISTINCT sweep FROM runs WHERE sweep IS NOT NULL")
        return sorted(r[0] for r in rows)

    # -- check and repair -------------------------------------------------------------------------------------------
    def check(self) -> dict[str, Any]:
        """Compare the index with the run directories without writing anything.

        Returns:
            ``{"index": "ok" | reason, "runs": n indexed, "dirs": n run directories, "orphans": [ids of directories
            without an index row], "missing": [ids of rows without a directory], "damaged": [files that cannot be
            read], "ok": bool}``.
        """
        index = "ok"
        rows: dict[str, RunRecord] = {}
        try:
            ro = RunStore(self.root, readonly=True)
            rows = {r.id: r for r in ro.list()}
        except StoreError as e:
            index = str(e)
        dirs = {p.name: p for p in self.run_dirs()}
        orphans = sorted(set(dirs) - set(rows))
        missing = sorted(set(rows) - set(dirs))
        damaged = []
        for rid, p in dirs.items():
            for f in (RUN_FILE, "checks.json", "summary.json"):
                if (p / f).exists():
                    try:
                        json.loads((p / f).read_text())
                    except (ValueError, UnicodeDecodeError, OSError):
                        damaged.append(str(p / f))
            for f in [p / "arrays.npz", *sorted((p / "checkpoints").glob("*.npz"))]:
                if f.exists() and not zipfile.is_zipfile(f):
                    damaged.append(str(f))
        return {"index": index, "runs": len(rows), "dirs": len(dirs), "orphans": orphans, "missing": missing,
                "damaged": damaged, "ok": index == "ok" and not orphans and not missing and not damaged}

    def repair(self) -> dict[str, Any]:
        """Rebuild the index from the run directories: a damaged index is moved aside (``index.sqlite.damaged-*``)
        and recreated, orphan directories are indexed (a run whose process is gone as ``interrupted``), rows whose
        directory is missing are dropped.

        Returns:
            what :meth:`check` found, plus ``{"added": [...], "dropped": [...], "moved": path or None}``.
        """
        if self.readonly:
            raise StoreError(f"the store {str(self.root)!r} was opened read-only; cannot repair it.")
        found = self.check()
        moved = None
        if found["index"] != "ok":
            if self.index_path.exists():
                moved = self.index_path.with_name(f"{INDEX_NAME}.damaged-{int(time.time())}")
                os.replace(self.index_path, moved)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(str(self.index_path) + suffix)
        self._open_index_fresh()
        rows = {r[0] for r in self._query("SELECT id FROM runs")}
        added = []
        for p in self.run_dirs():
            if p.name not in rows:
                self._insert(_row_from_dir(p))
                added.append(p.name)
        dropped = sorted(rows - {p.name for p in self.run_dirs()})
        for rid in dropped:
            self._execute("DELETE FROM runs WHERE id=?", (rid,))
        self._refresh_dead()
        return {**found, "added": added, "dropped": dropped, "moved": str(moved) if moved else None}

    def _open_index_fresh(self) -> None:
        with self._connect() as con:
            con.executescript(_SCHEMA)
            if "point" not in {r[1] for r in con.execute("PRAGMA table_info(runs)")}:
                con.execute("ALTER TABLE runs ADD COLUMN point INTEGER")


_INTERRUPTED = "process ended without finishing (killed?); resume it with `homflow resume`"


def _row_from_dir(p: Path) -> dict[str, Any]:
    """The index row of the run directory ``p``: its ``run.json``, else what its files say (older runs)."""
    d: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        d = json.loads((p / RUN_FILE).read_text())
    if not isinstance(d, dict):
        d = {}
    d = {k: d.get(k) for k in _COLUMNS if k in d}
    d["id"] = p.name
    d["path"] = p.name
    if not d.get("experiment"):
        exp = "unknown"
        with contextlib.suppress(OSError, ValueError):
            import tomllib

            exp = str(tomllib.loads((p / "config.toml").read_text()).get("experiment", "flow"))
        d["experiment"] = exp
    if d.get("created") is None:
        d["created"] = p.stat().st_mtime
    d.setdefault("quick", 0)
    if d.get("status") not in STATUSES:
        d["status"] = "interrupted"
    if d["status"] == "running" and (d.get("host") != socket.gethostname() or not _pid_alive(d.get("pid"))):
        d["status"] = "interrupted"
        d["error"] = d.get("error") or _INTERRUPTED
    if d["status"] != "completed" and (p / "summary.json").is_file() and (p / "checks.json").is_file() \
            and (p / "arrays.npz").is_file():
        with contextlib.suppress(OSError, ValueError):
            checks = json.loads((p / "checks.json").read_text())
            summary = json.loads((p / "summary.json").read_text())
            if isinstance(checks, list) and "passed" in summary:
                d.update(status="completed", n_checks=len(checks), error=None,
                         n_passed=sum(bool(c.get("passed")) for c in checks),
                         passed=int(all(c.get("passed") for c in checks)), duration_s=summary.get("duration_s"))
    return d
