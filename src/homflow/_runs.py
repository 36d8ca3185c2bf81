"""Open stored runs from Python: :func:`load_run` gives one run (config, summary, checks, arrays, trajectory,
provenance, figures as Display objects that re-plot), :func:`runs` the whole index as a pandas DataFrame.

Example::

    import homflow
    run = homflow.load_run("latest")           # or an id, a prefix, a name, a built-in's name
    run.checks_frame()                         # the checks as a DataFrame
    run.figures["loss_norm"].plot()            # the report's figure, on your own axes
    homflow.runs().query("experiment == 'demo' and passed")   # every run of the store

A reference to a run (``ref``) is, in this order: a run id; ``latest`` (the newest run); the name or the experiment
of runs (the newest of them: ``max-margin`` after ``homflow reproduce max-margin``); a unique prefix of an id; or the
path of a run directory.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_run", "runs", "find_run", "delete_run", "StoredRun", "StoredTrajectory", "LATEST"]

LATEST = ("latest", "last")
"""References that name the newest run of a store."""


def _store(store):
    """A store opened read-only (no directory or index is created by looking)."""
    from .store import RunStore

    if store is None or isinstance(store, (str, Path)):
        return RunStore(store, readonly=True)
    return store


def find_run(store, ref: str, *, experiment: str | None = None):
    """The :class:`homflow.store.RunRecord` that ``ref`` names (see the module docstring for the forms).

    Arguments:
        store: a :class:`homflow.store.RunStore`.
        ref: the reference.
        experiment: only runs of this experiment (for ``latest``).

    Raises:
        ValueError: nothing matches, or an id prefix matches several runs.
    """
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"`run` must be a run id, 'latest', a name or an id prefix; got {ref!r}.")
    recs = store.list()
    if experiment is not None:
        recs = [r for r in recs if r.experiment == experiment]
    for r in recs:
        if r.id == ref:
            return r
    if ref in LATEST:
        if not recs:
            where = f" of experiment {experiment!r}" if experiment else ""
            raise ValueError(f"the store {str(store.root)!r} holds no run{where} yet.")
        return recs[0]
    named = [r for r in recs if r.name == ref or r.experiment == ref]
    if named:
        return named[0]  # list() is newest first
    prefixed = [r for r in recs if r.id.startswith(ref)]
    if len(prefixed) == 1:
        return prefixed[0]
    if prefixed:
        ids = ", ".join(r.id for r in prefixed[:5])
        raise ValueError(f"`run` {ref!r} matches {len(prefixed)} runs ({ids}...); give more of the id.")
    raise ValueError(f"no run {ref!r} in the store {str(store.root)!r} (not an id, 'latest', a name, an experiment "
                     f"or an id prefix); `homflow list` shows the runs.")


@dataclasses.dataclass(frozen=True)
class StoredTrajectory:
    """A trajectory read back from a run's arrays: times ``ts``, and where stored ``loss``, ``log_loss``, ``norm``
    and the flattened parameters ``thetas`` (``None`` when the run saved only the final parameters)."""

    ts: np.ndarray
    loss: np.ndarray | None
    log_loss: np.ndarray | None
    norm: np.ndarray | None
    thetas: np.ndarray | None
    theta_final: np.ndarray | None

    def frame(self):
        """The per-time quantities as a pandas DataFrame (one row per saved time)."""
        import pandas as pd

        cols = {"t": self.ts}
        for k in ("loss", "log_loss", "norm"):
            v = getattr(self, k)
            if v is not None and len(v) == len(self.ts):
                cols[k] = v
        return pd.DataFrame(cols)


class StoredRun:
    """One stored run, read lazily from its directory. Build it with :func:`load_run`.

    Attributes: ``id``, ``path``, ``record`` (its index row, or ``None`` for a directory outside an index),
    ``config`` (the run's config as a dict), ``summary``, ``checks`` (list of dicts), ``provenance``, ``arrays``
    (name -> NumPy array), ``figures`` (name -> Display), ``report_path``.
    """

    def __init__(self, path: Path | str, record=None):
        self.path = Path(path)
        self.id = record.id if record is not None else self.path.name
        self.record = record

    def __repr__(self) -> str:
        st = self.record.status if self.record is not None else "?"
        return f"StoredRun({self.id!r}, experiment={self.experiment!r}, status={st!r}, passed={self.passed})"

    def _json(self, name: str, default):
        p = self.path / name
        return json.loads(p.read_text()) if p.exists() else default

    @cached_property
    def config(self) -> dict:
        p = self.path / "config.toml"
        return tomllib.loads(p.read_text()) if p.exists() else {}

    @property
    def experiment(self) -> str | None:
        return self.record.experiment if self.record is not None else self.config.get("experiment")

    @cached_property
    def _summary_file(self) -> dict:
        return self._json("summary.json", {}) or {}

    @property
    def summary(self) -> dict:
        """The experiment's summary (measured numbers, solver statistics)."""
        return self._summary_file.get("summary", {})

    @cached_property
    def checks(self) -> list[dict]:
        return self._json("checks.json", []) or []

    @property
    def passed(self) -> bool | None:
        """Whether every check passed (``None`` for a run with no checks stored: failed or interrupted)."""
        return all(c["passed"] for c in self.checks) if self.checks else None

    @cached_property
    def provenance(self) -> dict:
        return self._json("provenance.json", {}) or {}

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        p = self.path / "arrays.npz"
        if not p.exists():
            return {}
        with np.load(p, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    @property
    def report_path(self) -> Path | None:
        p = self.path / "report.html"
        return p if p.exists() else None

    @property
    def figures(self) -> dict[str, Any]:
        """The report's figures as Display objects (``.plot(ax=...)`` draws one on your axes and returns it)."""
        from .report import run_displays

        out = {}
        for name, _title, disp, err in run_displays(self._summary_file, self.arrays):
            if disp is not None:
                out[name] = disp
        return out

    def trajectory(self, prefix: str = "") -> StoredTrajectory | None:
        """The trajectory saved under ``prefix`` (``''`` for the flow experiment, ``'late_'`` for the demo's late
        phase): times ``{prefix}t``, and ``{prefix}loss``, ``{prefix}log_loss``, ``{prefix}norm``,
        ``{prefix}thetas``, ``{prefix}theta_final`` where stored; ``None`` when the run saved no times."""
        a = self.arrays
        ts = a.get(f"{prefix}t", a.get(f"{prefix}ts"))
        if ts is None:
            return None
        get = lambda k: a.get(f"{prefix}{k}")  # noqa: E731
        thetas = get("thetas")
        final = get("theta_final")
        if final is None and thetas is not None:
            final = thetas[-1]
        return StoredTrajectory(np.asarray(ts), get("loss"), get("log_loss"), get("norm"), thetas, final)

    def checks_frame(self):
        """The checks as a pandas DataFrame (name, value, relation, tolerance, passed, description)."""
        import pandas as pd

        cols = ["name", "value", "relation", "tolerance", "passed", "description"]
        df = pd.DataFrame(self.checks, columns=cols)
        df["value"] = pd.to_numeric(df["value"], errors="coerce")  # 'nan'/'inf' stored as strings
        return df

    def arrays_frame(self, x: str | None = None):
        """The 1-D arrays that share the length of ``x`` (default: the most common length among the 1-D arrays,
        ties to the longer) as the columns of a pandas DataFrame, ``x`` first."""
        import pandas as pd

        one_d = {k: v for k, v in self.arrays.items() if np.ndim(v) == 1}
        if not one_d:
            return pd.DataFrame()
        if x is not None:
            if x not in one_d:
                raise ValueError(f"`x` must name a 1-D array of the run; got {x!r} (1-D arrays: {sorted(one_d)}).")
            n = len(one_d[x])
        else:
            lengths = [len(v) for v in one_d.values()]
            n = max(set(lengths), key=lambda m: (lengths.count(m), m))
        cols = {k: v for k, v in one_d.items() if len(v) == n}
        if x is not None:
            cols = {x: cols.pop(x), **cols}
        return pd.DataFrame(cols)


def load_run(id_or_path: str | Path, store=None) -> StoredRun:
    """Open a stored run.

    Arguments:
        id_or_path: a run directory, or a reference to a run of ``store`` (an id, ``'latest'``, a name, an
            experiment's name for its newest run, an id prefix).
        store: a :class:`homflow.store.RunStore` or its directory; default ``$HOMFLOW_STORE`` or ``./runs``.

    Returns:
        A :class:`StoredRun`.

    Raises:
        ValueError: no run matches (or an id prefix matches several).
    """
    p = Path(id_or_path)
    if p.is_dir() and (p / "config.toml").exists():
        from .store import RunStore

        rec = None
        try:
            rec = RunStore(p.parent, readonly=True).get(p.name)
        except Exception:  # noqa: BLE001 - a directory outside an index: read its files alone
            rec = None
        return StoredRun(p, rec)
    st = _store(store)
    rec = find_run(st, str(id_or_path))
    return StoredRun(rec.path, rec)


def runs(store=None):
    """The run index as a pandas DataFrame, newest first: id, experiment, name, status, quick, created, started,
    finished (as timestamps), duration_s, n_checks, n_passed, passed, path, sweep, pid, host, error."""
    import pandas as pd

    st = _store(store)
    recs = st.list()
    from .store import RunRecord

    cols = [f.name for f in dataclasses.fields(RunRecord)]
    df = pd.DataFrame([r.to_dict() for r in recs], columns=cols)
    for c in ("created", "started", "finished"):
        if c in df:
            df[c] = pd.to_datetime(df[c], unit="s")
    return df


def delete_run(store, ref: str) -> str:
    """Delete a run (its directory and its index row); returns its id. A running run is refused.

    Raises:
        ValueError: no such run, or it is still running.
    """
    rec = find_run(store, ref)
    if rec.status == "running":
        raise ValueError(f"run {rec.id!r} is still running (pid {rec.pid}); stop it before deleting it.")
    from .store import path_inside

    path = path_inside(store.root, Path(rec.path), "run")
    store._execute("DELETE FROM runs WHERE id=?", (rec.id,))
    if path.exists():
        shutil.rmtree(path)
    return rec.id
