"""The ``homflow`` commands that find, show, filter, export and delete stored runs (registered on the app of
:mod:`homflow.cli`). A ``RUN`` is a run id, ``latest``, a name or an experiment (its newest run), or an id prefix
(:func:`homflow._runs.find_run`). None of them imports JAX."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .cli import BadInput, JsonOpt, StoreOpt, _checks_table, _cli, _json_default, _out_console, _plain, _store, app

RunArg = typer.Argument("latest", metavar="RUN", help="A run id, 'latest', a name or a built-in's name (its newest "
                                                      "run), or an id prefix.")


def _piped() -> bool:
    return not sys.stdout.isatty()


def _params(defaults: dict) -> str:
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in defaults.items())


def _filtered(st, *, experiment, status, failed, passed, sweep, name, limit):
    recs = st.list(sweep=sweep)
    if experiment:
        recs = [r for r in recs if r.experiment == experiment]
    if status:
        recs = [r for r in recs if r.status == status]
    if failed:
        recs = [r for r in recs if r.passed is False or r.status == "failed"]
    if passed:
        recs = [r for r in recs if r.passed is True]
    if name:
        recs = [r for r in recs if r.name == name]
    return recs[:limit] if limit else recs


@app.command("list")
@_cli
def list_(store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt,
          limit: int = typer.Option(30, "--limit", min=0, help="Show at most this many runs (0: all)."),
          experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="Only runs of this experiment."),
          status: Optional[str] = typer.Option(None, "--status",
                                               help="Only runs with this status (completed, failed, interrupted, "
                                                    "running)."),
          failed: bool = typer.Option(False, "--failed", help="Only runs that failed (a check or the run itself)."),
          passed: bool = typer.Option(False, "--passed", help="Only runs whose checks all passed."),
          sweep: Optional[str] = typer.Option(None, "--sweep", help="Only the runs of this sweep."),
          name: Optional[str] = typer.Option(None, "--name", help="Only runs with this name."),
          ids: bool = typer.Option(False, "--ids", "-q", help="Print the run ids only, one a line.")) -> None:
    """List the built-in experiments (with their parameters) and the runs of the store, newest first.

    Piped (not a terminal), it prints one tab-separated line per run with the full id, and no table."""
    from .store import STATUSES

    if status is not None and status not in STATUSES:
        raise BadInput(f"`--status` must be one of {STATUSES}; got {status!r}.")
    if failed and passed:
        raise BadInput("`--failed` and `--passed` exclude each other; give one.")
    from .store import default_root

    root = Path(store) if store is not None else default_root()
    if root.exists():
        st = _store(store, readonly=True)
        recs = _filtered(st, experiment=experiment, status=status, failed=failed, passed=passed, sweep=sweep,
                         name=name, limit=limit)
    else:  # no run yet: the built-ins are still worth listing
        st, recs = None, []
    filtering = any((experiment, status, failed, passed, sweep, name, ids))
    if as_json:
        from .experiments import REGISTRY, get_experiment

        get_experiment("flow")  # fills the registry
        obj = {"run": None, "path": str(root.resolve()), "checks": [],
               "experiments": [{"name": e.name, "description": e.description, "defaults": e.defaults,
                                "quick": e.quick} for e in REGISTRY.values()],
               "runs": [r.to_dict() for r in recs]}
        sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
        return
    if ids:
        sys.stdout.write("".join(f"{r.id}\n" for r in recs))
        return
    if _piped():
        lines = ["run\texperiment\tname\tstatus\tchecks\tduration_s\tcreated"]
        for r in recs:
            checks = "-" if r.n_checks is None else f"{r.n_passed}/{r.n_checks}"
            lines.append("\t".join(_plain(v) for v in (r.id, r.experiment, r.name or "-", r.status, checks,
                                                      f"{r.duration_s:.1f}" if r.duration_s else "-",
                                                      r.created_iso)))
        sys.stdout.write("\n".join(lines) + "\n")
        return
    from rich.table import Table
    from rich.text import Text

    con = _out_console()
    if not filtering:
        from .experiments import REGISTRY, get_experiment

        get_experiment("flow")
        t = Table(title=Text("built-in experiments (homflow reproduce NAME [--quick] [--set KEY=VALUE])"))
        t.add_column("name", no_wrap=True)
        t.add_column("description")
        t.add_column("parameters (defaults; --quick changes)")
        for e in sorted(REGISTRY.values(), key=lambda e: e.name):
            t.add_row(Text(_plain(e.name)), Text(_plain(e.description)),
                      Text(_plain(_params(e.defaults) + (f"; quick: {_params(e.quick)}" if e.quick else ""))))
        con.print(t)
    t = Table(title=Text(_plain(f"runs in {root}" if st is not None else f"no runs yet in {root}")))
    t.add_column("run", no_wrap=True, overflow="fold")
    for c in ("experiment", "status", "checks", "duration (s)", "created"):
        t.add_column(c)
    for r in recs:
        checks = Text("-") if r.n_checks is None else Text.assemble(
            f"{r.n_passed}/{r.n_checks} ", ("PASS", "green") if r.passed else ("FAIL", "red"))
        t.add_row(*(Text(_plain(v)) for v in (r.id, r.experiment, r.status)), checks,
                  f"{r.duration_s:.1f}" if r.duration_s else "-", r.created_iso)
    con.print(t)


def _find(st, ref: str, experiment: str | None = None):
    from ._runs import find_run

    return find_run(st, ref, experiment=experiment)


@app.command()
@_cli
def show(run_id: str = RunArg, store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Show a stored run: status, checks, summary, provenance, files. Exit 0 if it completed and passed."""
    from .experiments import result_of

    st = _store(store, readonly=True)
    rec = _find(st, run_id)
    res = result_of(st, rec.id)
    run = st.open(rec.id)
    prov = run.read_json("provenance.json", {}) or {}
    if as_json:
        obj = res.to_json()
        obj["record"] = rec.to_dict()
        obj["checkpoints"] = run.checkpoints()
        obj["provenance"] = prov
        sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    else:
        con = _out_console()
        con.print(_plain(f"run {rec.id}: {rec.experiment}, status {rec.status}" + (f" ({rec.error})" if rec.error
                                                                                  else "")), markup=False)
        if res.checks:
            con.print(_checks_table(res.checks, "checks"))
        for k, v in (res.summary or {}).items():
            con.print(_plain(f"  {k}: {v}"), markup=False)
        for k in ("homflow", "jax", "python", "device", "git_commit", "command"):
            if prov.get(k):
                con.print(_plain(f"  {k}: {prov[k]}"), markup=False)
        con.print(_plain(f"directory: {rec.path}"), markup=False)
        if res.report:
            con.print(_plain(f"report: {res.report}"), markup=False)
        con.print(_plain(f"in Python: homflow.load_run({rec.id!r})"), markup=False)
    if rec.status != "completed":
        raise typer.Exit(1)
    raise typer.Exit(0 if res.passed else 1)


@app.command()
@_cli
def latest(experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="The newest run of this "
                                                                                       "experiment."),
           store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Print the id of the newest run (e.g. `homflow show $(homflow latest -e demo)`)."""
    st = _store(store, readonly=True)
    rec = _find(st, "latest", experiment)
    if as_json:
        sys.stdout.write(json.dumps({"run": rec.id, "path": rec.path, "checks": [], "record": rec.to_dict()},
                                    default=_json_default) + "\n")
    else:
        sys.stdout.write(rec.id + "\n")


@app.command()
@_cli
def delete(run_ids: List[str] = typer.Argument(..., metavar="RUN...", help="Runs to delete (ids, names, ...)."),
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask (needed when not at a terminal)."),
           store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Delete runs: their directories and index rows (a running run is refused)."""
    from ._runs import delete_run

    st = _store(store)
    recs = [_find(st, r) for r in run_ids]
    if not yes:
        if not sys.stdin.isatty():
            raise BadInput("`homflow delete` asks before deleting; not at a terminal, pass --yes.")
        typer.confirm(f"delete {len(recs)} run(s): {', '.join(r.id for r in recs)}?", abort=True)
    deleted = [delete_run(st, r.id) for r in recs]
    if as_json:
        sys.stdout.write(json.dumps({"run": None, "path": str(st.root), "checks": [], "deleted": deleted}) + "\n")
    else:
        for d in deleted:
            _out_console().print(_plain(f"deleted {d}"), markup=False)


@app.command()
@_cli
def export(run_id: Optional[str] = typer.Argument(None, metavar="[RUN]", help="A run (default: the index of all "
                                                                                "runs)."),
           csv: Optional[Path] = typer.Option(None, "--csv", help="Write a CSV file."),
           parquet: Optional[Path] = typer.Option(None, "--parquet", help="Write a Parquet file."),
           table: str = typer.Option("checks", "--table", help="For a RUN: 'checks' or 'arrays' (its 1-D arrays "
                                                                 "of the trajectory's length)."),
           store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Export the run index, or a run's checks or arrays, as CSV or Parquet (pandas)."""
    from ._runs import StoredRun, runs

    if (csv is None) == (parquet is None):
        raise BadInput("give exactly one of `--csv PATH` and `--parquet PATH`.")
    if table not in ("checks", "arrays"):
        raise BadInput(f"`--table` must be 'checks' or 'arrays'; got {table!r}.")
    st = _store(store, readonly=True)
    if run_id is None:
        df, what = runs(st), "index"
    else:
        rec = _find(st, run_id)
        r = StoredRun(rec.path, rec)
        df, what = (r.checks_frame() if table == "checks" else r.arrays_frame()), f"{rec.id} {table}"
    out = csv if csv is not None else parquet
    out.parent.mkdir(parents=True, exist_ok=True)
    if csv is not None:
        df.to_csv(out, index=False)
    else:
        try:
            df.to_parquet(out, index=False)
        except ImportError as e:
            raise BadInput(f"`--parquet` needs pyarrow: pip install 'homflow[export]' ({e}).") from None
    if as_json:
        sys.stdout.write(json.dumps({"run": run_id, "path": str(out), "checks": [], "rows": len(df),
                                     "columns": list(map(str, df.columns))}) + "\n")
    else:
        _out_console().print(_plain(f"wrote {len(df)} rows ({what}) to {out}"), markup=False)
