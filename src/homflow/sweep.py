"""Sweeps: a grid over any config keys (dotted, e.g. ``init.scale``), each point one run of the store.

A sweep file is a run config plus a ``[sweep]`` table::

    experiment = "flow"
    [init]
    scale = 1e-2
    [sweep]
    workers = 1                  # processes for the local backend
    [sweep.grid]
    "init.scale" = [1e-2, 1e-3]
    "init.seed" = [0, 1]

Every point of the grid is validated before anything runs. Backends: ``local`` (in-process when ``workers = 1``,
otherwise a pool of spawned processes) and ``ray`` (``ray.init(address=...)`` or a local Ray, when installed).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import itertools
import secrets
from pathlib import Path
from typing import Any, Callable, Mapping

from .experiments._config import ConfigError, RunConfig, parse_config, read_toml, set_dotted
from .shards import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_MAX_RETRIES, enable_compilation_cache, run_shards
from .store import _COLUMNS as _INDEX_COLUMNS
from .store import path_inside, safe_component

__all__ = ["Sweep", "SweepResult", "load_sweep", "parse_sweep", "run_sweep", "run_grid_values", "load_manifest",
           "compute_point", "BACKENDS", "MAX_POINTS"]

BACKENDS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A base config and a grid ``{dotted key: [values]}``; ``configs`` lists the validated run configs."""

    base: Mapping[str, Any]
    grid: Mapping[str, tuple]
    configs: tuple[RunConfig, ...]
    workers: int = 1
    name: str | None = None

    @property
    def points(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, vals)) for vals in itertools.product(*(self.grid[k] for k in keys))]


@dataclasses.dataclass(frozen=True)
class SweepResult:
    sweep: str
    runs: list  # RunResult or dicts for failed points
    report: str | None

    @property
    def passed(self) -> bool:
        return all(getattr(r, "passed", False) for r in self.runs)


def parse_sweep(d: Mapping, *, quick: bool | None = None) -> Sweep:
    """Validate a sweep mapping: the ``[sweep]`` table (``grid``, ``workers``, ``name``) and every grid point.

    Raises:
        ConfigError: a missing or empty grid, a bad key or value in any grid point (naming the point).
    """
    if not isinstance(d, Mapping):
        raise ConfigError("", "a sweep config must be a table.")
    sw = d.get("sweep")
    if not isinstance(sw, Mapping):
        raise ConfigError("sweep", "a sweep config needs a [sweep] table with a [sweep.grid] of lists, e.g. "
                                   "\"init.scale\" = [1e-2, 1e-3].")
    allowed = ("grid", "workers", "name")
    for k in sw:
        if k not in allowed:
            import difflib

            close = difflib.get_close_matches(k, allowed, n=1)
            raise ConfigError(f"sweep.{k}", f"unknown key; allowed: {allowed}."
                                            + (f" Did you mean {close[0]!r}?" if close else ""))
    grid = sw.get("grid")
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError("sweep.grid", "must be a non-empty table of lists, e.g. \"init.scale\" = [1e-2, 1e-3].")
    g = {}
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"sweep.grid.{k}", f"must be a non-empty list of values; got {v!r}.")
        if k in ("experiment",):
            raise ConfigError(f"sweep.grid.{k}", "the experiment cannot vary within a sweep.")
        g[str(k)] = tuple(v)
    n_points = 1
    for v in g.values():
        n_points *= len(v)
    if n_points > MAX_POINTS:
        raise ConfigError("sweep.grid", f"has {n_points} points; at most {MAX_POINTS} are allowed in one sweep "
                                        f"(each point is a run with its own directory).")
    workers = sw.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError("sweep.workers", f"must be an integer >= 1; got {workers!r}.")
    name = sw.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError("sweep.name", f"must be a string; got {name!r}.")
    base = {k: v for k, v in d.items() if k != "sweep"}
    keys = list(g)
    configs = []
    for vals in itertools.product(*(g[k] for k in keys)):
        c = dict(base)
        for k, v in zip(keys, vals):
            c = set_dotted(c, k, v)
        label = ", ".join(f"{k}={v!r}" for k, v in zip(keys, vals))
        try:
            configs.append(parse_config(c, quick=quick))
        except ConfigError as e:
            raise ConfigError(e.key, f"{e} (grid point {label})") from None
    return Sweep(base, g, tuple(configs), workers, name)


def load_sweep(path, *, quick: bool | None = None) -> Sweep:
    """Read and validate a sweep TOML file (see the module docstring)."""
    return parse_sweep(read_toml(path, "sweep"), quick=quick)


# the most grid points one sweep may have (each is a run with its own directory)
MAX_POINTS = 10_000


def _sweep_id(sweep: Sweep) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    label = safe_component(sweep.name or sweep.configs[0].experiment, max_len=40)
    return f"sweep-{stamp}-{label}-{secrets.token_hex(2)}"


def _manifest_path(store, sweep_id: str) -> Path:
    return path_inside(store.root, store.root / "sweeps" / f"{safe_component(sweep_id)}.json", "sweep")


def _report_path(store, sweep_id: str) -> Path:
    return path_inside(store.root, store.root / "sweeps" / f"{safe_component(sweep_id)}.html", "sweep")


def _point_run_id(sweep_id: str, i: int) -> str:
    return f"{sweep_id}-p{i:04d}"


class _AssignedIds:
    """A view of a store whose ``create`` uses a chosen run id and sweep point (everything else forwarded)."""

    def __init__(self, store, run_id: str, point: int):
        self._store, self._run_id, self._point = store, run_id, point

    def __getattr__(self, name):
        return getattr(self._store, name)

    def create(self, experiment, **kw):
        return self._store.create(experiment, **{**kw, "run_id": self._run_id, "point": self._point})


def compute_point(task: dict) -> dict:
    """One sweep point in a worker: run the config in a scratch store, return its run directory's files (bytes).

    ``task``: ``{"config": dict, "run_id": str, "sweep": str, "point": int}``. Returns ``{"run_id", "files":
    {relative path: bytes}, "scratch": the scratch run directory, "error": None or the reason}``. The driver writes
    the files into the real store (:func:`_commit_point`); the worker never touches it.
    """
    import tempfile

    from .experiments import execute, parse_config
    from .store import RunStore

    with tempfile.TemporaryDirectory(prefix="homflow-shard-") as tmp:
        scratch = RunStore(tmp)
        error = None
        try:
            execute(parse_config(task["config"]), _AssignedIds(scratch, task["run_id"], task["point"]),
                    sweep=task["sweep"])
        except Exception as e:  # noqa: BLE001 - the run is recorded as failed with this reason
            error = f"{type(e).__name__}: {e}"
        run_dir = Path(tmp) / task["run_id"]
        files = {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
                 if p.is_file() and p.name != ".lock" and not p.name.endswith(".tmp")}
        return {"run_id": task["run_id"], "files": files, "scratch": str(run_dir.resolve()), "error": error}


def _commit_point(store, sweep_id: str, point: int, value: dict) -> None:
    """Write a worker's run directory into ``store`` (files first, then the index row), replacing an earlier
    attempt of the same point."""
    import json
    import shutil

    from .store import RUN_FILE, Run, atomic_write_bytes

    run = Run(store, value["run_id"])
    final = path_inside(store.root, run.path, "run_id")
    tmp = store.root / f".incoming-{run.id}-{secrets.token_hex(3)}"
    scratch = value["scratch"].encode()
    for rel, data in value["files"].items():
        target = path_inside(tmp, tmp / rel, "file")
        if rel.endswith((".html", ".json", ".txt")):
            data = data.replace(scratch, str(final).encode())  # the report names its directory
        atomic_write_bytes(target, data)
    (tmp / "figures").mkdir(exist_ok=True)
    (tmp / "checkpoints").mkdir(exist_ok=True)
    row = json.loads(value["files"][RUN_FILE]) if RUN_FILE in value["files"] else {}
    if value.get("error") and row.get("status") != "failed":
        row.update(status="failed", error=value["error"][:500])
    row.update(id=run.id, path=run.id, sweep=sweep_id, point=point)
    old = None
    if final.exists():
        old = store.root / f".old-{run.id}-{secrets.token_hex(3)}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    store._execute("DELETE FROM runs WHERE id=?", (run.id,))
    store._insert({k: v for k, v in row.items() if k in _INDEX_COLUMNS})
    store._write_run_file(run.id)


def _record_failure(store, sweep_id: str, point: int, cfg, run_id: str, reason: str) -> None:
    """A point that produced no run directory (its worker died too often): a ``failed`` run with the reason, so the
    report shows it and ``--resume`` runs it again."""
    import shutil

    from .experiments._config import config_to_toml

    path = store.root / run_id
    store._execute("DELETE FROM runs WHERE id=?", (run_id,))
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    run = store.create(cfg.experiment, name=cfg.name, quick=cfg.quick, sweep=sweep_id, run_id=run_id, point=point)
    run.write_text("config.toml", config_to_toml(cfg))
    store.finish(run_id, status="failed", error=reason[:500])


def _write_manifest(store, sweep_id: str, sweep: Sweep) -> None:
    import json

    from .store import atomic_write_text

    obj = {"sweep": sweep_id, "name": sweep.name, "grid": {k: list(v) for k, v in sweep.grid.items()},
           "points": [c.to_dict() for c in sweep.configs], "created": _dt.datetime.now().isoformat()}
    atomic_write_text(_manifest_path(store, sweep_id), json.dumps(obj, indent=1))


def load_manifest(store, sweep_id: str) -> tuple[Sweep, str]:
    """The :class:`Sweep` recorded by an earlier :func:`run_sweep` (for ``--resume``) and its full id.

    Raises:
        ValueError: no such sweep in the store (the message lists the known ones), or a damaged manifest.
    """
    import json

    from .experiments import parse_config

    d = store.root / "sweeps"
    known = sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []
    hits = [k for k in known if k == sweep_id] or [k for k in known if k.startswith(str(sweep_id))]
    if len(hits) != 1:
        raise ValueError(f"`--resume` {sweep_id!r} " + ("matches no sweep" if not hits else f"matches {len(hits)}")
                         + f" of the store {str(store.root)!r}; known sweeps: {', '.join(known[-5:]) or 'none'}.")
    path = _manifest_path(store, hits[0])
    try:
        obj = json.loads(path.read_text())
        configs = tuple(parse_config(c) for c in obj["points"])
        grid = {k: tuple(v) for k, v in obj["grid"].items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"the sweep manifest {str(path)!r} is damaged ({type(e).__name__}: {e}).") from None
    return Sweep({}, grid, configs, 1, obj.get("name")), hits[0]


def run_sweep(sweep: Sweep | None, store, *, backend: str = "local", workers: int | None = None,
              address: str | None = None, resume: str | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
              num_cpus: float = 1.0, num_gpus: float = 0.0, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
              cache_dir: str | None = None, progress: Callable[[float, str], None] | None = None) -> SweepResult:
    """Run every grid point of ``sweep`` as a run of ``store`` (run ids ``<sweep id>-pNNNN``), then write the sweep
    report. Workers compute and return each run's files; the driver alone writes the store and its index.

    Arguments:
        backend: ``'local'`` (in-process for one worker, spawned processes otherwise) or ``'ray'``.
        workers: shards in flight at once (default the sweep file's ``workers``).
        address: Ray cluster address (``ray.init(address=...)``); default a local Ray.
        resume: the id (or a unique prefix) of an earlier sweep of ``store``: its completed points are kept, the
            others run again, and the report is written (``sweep`` is then ignored and may be ``None``).
        max_retries: extra attempts for a point whose worker process died.
        num_cpus, num_gpus: Ray resources of each point. connect_timeout_s: how long to wait for a Ray cluster.
        cache_dir: JAX's persistent compilation cache shared by all workers (default
            :func:`homflow.shards.compilation_cache_dir`).

    Raises:
        ValueError: unknown backend, bad workers, unknown ``resume`` sweep, too many points.
        ShardError: ``ray`` requested but not installed, or no cluster at ``address``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}; got {backend!r}.")
    if resume is not None:
        sweep, sweep_id = load_manifest(store, resume)
    else:
        if sweep is None:
            raise ValueError("`sweep` is required unless `resume` names an earlier sweep.")
        sweep_id = _sweep_id(sweep)
        _write_manifest(store, sweep_id, sweep)
    workers = sweep.workers if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be an integer >= 1; got {workers!r}.")
    cache = enable_compilation_cache(cache_dir)
    progress = progress or (lambda f, m: None)
    done = {r.point for r in store.list(sweep=sweep_id) if r.status == "completed" and r.point is not None}
    tasks = {i: {"config": c.to_dict(), "run_id": _point_run_id(sweep_id, i), "sweep": sweep_id, "point": i}
             for i, c in enumerate(sweep.configs) if i not in done}
    results: dict[int, Any] = {}

    def on_result(i, value):
        _commit_point(store, sweep_id, i, value)
        results[i] = value.get("error")

    def on_failure(i, reason):
        _record_failure(store, sweep_id, i, sweep.configs[i], tasks[i]["run_id"], reason)
        results[i] = reason

    if backend == "local" and workers == 1:
        from .experiments import execute

        for j, (i, t) in enumerate(tasks.items()):
            def sub(f, m, j=j):
                progress((j + f) / len(tasks), f"run {j + 1}/{len(tasks)}: {m}")

            old = store.root / t["run_id"]
            if old.exists():  # an earlier, unfinished attempt of this point (resume)
                import shutil

                store._execute("DELETE FROM runs WHERE id=?", (t["run_id"],))
                shutil.rmtree(old, ignore_errors=True)
            try:
                execute(sweep.configs[i], _AssignedIds(store, t["run_id"], i), progress=sub, sweep=sweep_id)
                results[i] = None
            except Exception as e:  # noqa: BLE001 - marked failed in the index; go on with the grid
                results[i] = f"{type(e).__name__}: {e}"
    else:
        run_shards(compute_point, tasks, on_result=on_result, on_failure=on_failure, backend=backend,
                   workers=workers, max_retries=max_retries, address=address, num_cpus=num_cpus, num_gpus=num_gpus,
                   connect_timeout_s=connect_timeout_s, cache_dir=str(cache) if cache else None, progress=progress)
    progress(1.0, "writing the sweep report")
    from .experiments import result_of
    from .report import write_sweep_report

    report = write_sweep_report(store, sweep_id, {k: list(v) for k, v in sweep.grid.items()},
                                path=_report_path(store, sweep_id))
    runs = []
    for i in range(len(sweep.configs)):
        rid = _point_run_id(sweep_id, i)
        try:
            runs.append(result_of(store, rid))
        except ValueError as e:
            runs.append({"run": rid, "path": None, "status": "failed", "passed": False, "checks": [],
                         "error": results.get(i) or str(e)})
    return SweepResult(sweep_id, runs, str(report))


def run_grid_values(run, keys) -> dict[str, Any]:
    """The values of dotted ``keys`` in a stored run's config.toml (``None`` where absent)."""
    from .report import grid_values

    return grid_values(run, keys)
