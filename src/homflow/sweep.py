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

__all__ = ["Sweep", "SweepResult", "load_sweep", "parse_sweep", "run_sweep", "run_grid_values", "BACKENDS"]

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


def _worker(cfg_dict: dict, root: str, sweep_id: str) -> dict:
    """Run one grid point in a worker process (spawned: JAX does not survive fork); returns the result as JSON."""
    from . import enable_x64
    from .experiments import execute, parse_config
    from .store import RunStore

    enable_x64()
    try:
        return execute(parse_config(cfg_dict), RunStore(root), sweep=sweep_id).to_json()
    except Exception as e:  # noqa: BLE001 - the run is marked failed in the index; report and go on
        return {"run": None, "path": None, "status": "failed", "passed": False, "checks": [], "error": str(e)}


def run_sweep(sweep: Sweep, store, *, backend: str = "local", workers: int | None = None, address: str | None = None,
              progress: Callable[[float, str], None] | None = None) -> SweepResult:
    """Run every grid point of ``sweep`` as a run of ``store`` (tagged with one sweep id), then write the sweep report.

    Arguments:
        backend: ``'local'`` (in-process for one worker, a spawned process pool otherwise) or ``'ray'``.
        workers: processes for the local backend (default the sweep file's ``workers``).
        address: Ray cluster address (``ray.init(address=...)``); default a local Ray.

    Raises:
        ValueError: unknown backend, or ``ray`` requested but not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}; got {backend!r}.")
    workers = sweep.workers if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be an integer >= 1; got {workers!r}.")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    sweep_id = f"sweep-{stamp}-{sweep.name or sweep.configs[0].experiment}-{secrets.token_hex(2)}"
    progress = progress or (lambda f, m: None)
    n = len(sweep.configs)
    dicts = [c.to_dict() for c in sweep.configs]
    results: list = []
    if backend == "ray":
        try:
            import ray
        except ImportError:
            raise ValueError("`--backend ray` needs the ray package, which is not installed: pip install "
                             "'homflow[ray]' (or use --backend local).") from None
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True)
        remote = ray.remote(_worker)
        refs = [remote.remote(d, str(Path(store.root).resolve()), sweep_id) for d in dicts]
        for i, ref in enumerate(refs):
            results.append(ray.get(ref))
            progress((i + 1) / n, f"run {i + 1}/{n} done")
    elif workers == 1:
        from .experiments import execute

        for i, cfg in enumerate(sweep.configs):
            progress(i / n, f"run {i + 1}/{n}")

            def sub(f, m, i=i):
                progress((i + f) / n, f"run {i + 1}/{n}: {m}")

            try:
                results.append(execute(cfg, store, progress=sub, sweep=sweep_id))
            except Exception as e:  # noqa: BLE001 - marked failed in the index; go on with the grid
                results.append({"run": None, "status": "failed", "passed": False, "checks": [], "error": str(e)})
        progress(1.0, "sweep done")
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futs = [pool.submit(_worker, d, str(Path(store.root).resolve()), sweep_id) for d in dicts]
            done = 0
            for _ in cf.as_completed(futs):
                done += 1
                progress(done / n, f"{done}/{n} runs done")
            results = [f.result() for f in futs]
    from .report import write_sweep_report

    report = write_sweep_report(store, sweep_id, {k: list(v) for k, v in sweep.grid.items()})
    return SweepResult(sweep_id, results, str(report))


def run_grid_values(run, keys) -> dict[str, Any]:
    """The values of dotted ``keys`` in a stored run's config.toml."""
    import tomllib

    p = Path(run.path) / "config.toml"
    if not p.exists():
        return {}
    d = tomllib.loads(p.read_text())
    out = {}
    for k in keys:
        cur: Any = d
        for part in k.split("."):
            cur = cur.get(part) if isinstance(cur, Mapping) else None
        out[k] = cur
    return out
