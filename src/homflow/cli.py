"""Command-line interface ``homflow`` (typer + rich).

Exit codes: 0 every check passed, 1 a check failed (or the run failed), 2 bad input (a one-line reason on stderr, no
traceback). ``--json`` prints exactly one JSON object on stdout (progress goes to stderr) with at least ``run``,
``path`` and ``checks`` (a list of ``{name, value, tolerance, passed}``). The run store is ``--store``, else
``$HOMFLOW_STORE``, else ``./runs``.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

app = typer.Typer(help="homflow: gradient-flow laboratory for homogeneous neural networks. Exit codes: 0 every check "
                       "passed, 1 a check failed, 2 bad input. Runs are stored in --store / $HOMFLOW_STORE / ./runs.",
                  no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

StoreOpt = typer.Option(None, "--store", envvar="HOMFLOW_STORE", help="Run store directory (default ./runs).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object (run, path, checks, ...) on stdout.")
QuickOpt = typer.Option(False, "--quick", help="The quick form: smaller sizes, for a fast check.")


class BadInput(Exception):
    """A user error: exit code 2 with a one-line reason."""


def _err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _out_console():
    from rich.console import Console

    return Console(highlight=False)


def _one_line(e: BaseException) -> str:
    s = str(e).strip().replace("\n", " ")
    return s or type(e).__name__


def _cli(fn: Callable) -> Callable:
    """Map errors to exit codes: bad input (ValueError, ConfigError, BadInput) -> 2, other failures -> 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except (BadInput, ValueError, FileNotFoundError) as e:
            _err_console().print(f"[bold red]error:[/] {_one_line(e)}", soft_wrap=True, markup=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _err_console().print("interrupted; `homflow resume RUN` continues from the last checkpoint.")
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - a failed run: say why in one line
            _err_console().print(f"[bold red]run failed:[/] {type(e).__name__}: {_one_line(e)}", soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _store(path: Optional[Path]):
    from .store import RunStore

    return RunStore(path)


def _progress_runner(label: str, quiet: bool = False):
    """A rich progress bar on stderr and the ``progress(fraction, message)`` callback that drives it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), TextColumn("{task.fields[msg]}"), console=_err_console(), transient=True,
                    disable=quiet)
    task = prog.add_task(label, total=1.0, msg="")

    def cb(fraction: float, message: str) -> None:
        prog.update(task, completed=max(0.0, min(1.0, float(fraction))), msg=message[:70])

    return prog, cb


def _checks_table(checks: list[dict], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col, j in (("check", "left"), ("value", "right"), ("", "center"), ("tolerance", "right"),
                   ("verdict", "center")):
        t.add_column(col, justify=j)
    for c in checks:
        v = c["value"]
        vs = f"{v:.4g}" if isinstance(v, (int, float)) else str(v)
        t.add_row(str(c["name"]), vs, c.get("relation", "<="), f"{c['tolerance']:.3g}",
                  "[green]PASS[/]" if c["passed"] else "[red]FAIL[/]")
    return t


def _emit(result, *, as_json: bool, extra: dict | None = None, title: str = "checks") -> None:
    """Print a run's result (a table and the report path, or one JSON object) and exit with its verdict."""
    obj = result.to_json()
    obj.update(extra or {})
    if as_json:
        sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
        sys.stdout.flush()
    else:
        con = _out_console()
        con.print(_checks_table(result.checks, f"{title}: {result.run}"))
        skipped = (result.summary or {}).get("skipped")
        if skipped:
            for s in skipped:
                con.print(f"[yellow]skipped:[/] {s}")
        n_ok = sum(bool(c["passed"]) for c in result.checks)
        con.print(f"{n_ok}/{len(result.checks)} checks passed; status {result.status}.")
        con.print(f"run directory: {result.path}")
        if result.report:
            con.print(f"report: {result.report}")
    raise typer.Exit(0 if result.passed else 1)


def _json_default(o: Any):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


@app.callback()
def _main() -> None:
    """Exact gradient flows, certified KKT points, neuron splitting and the phases of small-initialisation training.

    Exit codes: 0 all checks pass, 1 a check failed, 2 bad input.
    """
    from . import enable_x64

    enable_x64()


def _execute(cfg, store, label: str, quiet: bool):
    from .experiments import execute

    prog, cb = _progress_runner(label, quiet)
    with prog:
        return execute(cfg, store, progress=cb)


@app.command()
@_cli
def demo(quick: bool = QuickOpt, store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt,
         set_: List[str] = typer.Option([], "--set", help="Override a parameter: --set delta=1e-4 (repeatable).")
         ) -> None:
    """The flagship: a small network from a tiny initialisation through early alignment with its NCF KKT point, the
    escape, the first saddle, the late max-margin phase, and the same network split wider; prints the report path and
    a checks table."""
    from .experiments import parse_config

    cfg = parse_config({"experiment": "demo", "name": "demo", **_parse_sets(set_)}, quick=quick)
    res = _execute(cfg, _store(store), "demo", as_json)
    _emit(res, as_json=as_json, title="homflow demo")


def _parse_sets(sets: List[str]) -> dict:
    import tomllib

    from .experiments import set_dotted

    out: dict = {}
    for s in sets or []:
        if "=" not in s:
            raise BadInput(f"`--set` takes KEY=VALUE (e.g. init.scale=1e-3); got {s!r}.")
        k, v = s.split("=", 1)
        try:
            val = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            val = v  # a bare string
        out = set_dotted(out, k.strip(), val)
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@app.command()
@_cli
def run(config: Path = typer.Argument(..., help="A TOML config (see examples/)."), quick: bool = QuickOpt,
        name: Optional[str] = typer.Option(None, "--name", help="A label for the run."),
        set_: List[str] = typer.Option([], "--set", help="Override a key: --set init.scale=1e-3 (repeatable)."),
        store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Run the experiment a TOML config describes, store it, write its report, print its checks."""
    import tomllib

    from .experiments import ConfigError, parse_config

    if not config.is_file():
        raise BadInput(f"config file not found: {str(config)!r}.")
    try:
        d = tomllib.loads(config.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("", f"{str(config)!r} is not valid TOML: {e}.") from None
    if "sweep" in d:
        raise BadInput(f"{str(config)!r} holds a [sweep] table: run it with `homflow sweep {config}`.")
    d = _merge(d, _parse_sets(set_))
    if name:
        d["name"] = name
    cfg = parse_config(d, quick=True if quick else None)
    res = _execute(cfg, _store(store), cfg.name or cfg.experiment, as_json)
    _emit(res, as_json=as_json)


@app.command()
@_cli
def reproduce(name: str = typer.Argument(..., help="A built-in experiment (`homflow list` shows them)."),
              quick: bool = QuickOpt,
              set_: List[str] = typer.Option([], "--set", help="Override a parameter: --set width=20 (repeatable)."),
              store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Reproduce a built-in result of the papers on its default parameters (or the quick form)."""
    from .experiments import parse_config

    cfg = parse_config({"experiment": name, **_parse_sets(set_)}, quick=quick)
    res = _execute(cfg, _store(store), name, as_json)
    _emit(res, as_json=as_json, title=name)


@app.command("list")
@_cli
def list_(store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt,
          limit: int = typer.Option(30, "--limit", help="Show at most this many past runs.")) -> None:
    """List the built-in experiments and the past runs of the store."""
    from rich.table import Table

    from .experiments import REGISTRY, get_experiment

    get_experiment("flow")  # fills the registry
    st = _store(store)
    runs = st.list(limit=limit)
    if as_json:
        obj = {"run": None, "path": str(st.root.resolve()), "checks": [],
               "experiments": [{"name": e.name, "description": e.description} for e in REGISTRY.values()],
               "runs": [r.to_dict() for r in runs]}
        sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
        return
    con = _out_console()
    t = Table(title="built-in experiments (homflow reproduce NAME [--quick])")
    t.add_column("name")
    t.add_column("description")
    for e in sorted(REGISTRY.values(), key=lambda e: e.name):
        t.add_row(e.name, e.description)
    con.print(t)
    t = Table(title=f"runs in {st.root}")
    for c in ("run", "experiment", "status", "checks", "duration (s)", "created"):
        t.add_column(c)
    for r in runs:
        checks = "-" if r.n_checks is None else f"{r.n_passed}/{r.n_checks}" + (" [green]PASS[/]" if r.passed
                                                                                 else " [red]FAIL[/]")
        t.add_row(r.id, r.experiment, r.status, checks, f"{r.duration_s:.1f}" if r.duration_s else "-",
                  r.created_iso)
    con.print(t)


@app.command()
@_cli
def show(run_id: str = typer.Argument(..., metavar="RUN", help="A run id (or a unique prefix, or its name)."),
         store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Show a stored run: status, checks, summary, files."""
    from .experiments import result_of

    st = _store(store)
    res = result_of(st, run_id)
    rec = st.get(res.run)
    if as_json:
        obj = res.to_json()
        obj["record"] = rec.to_dict()
        obj["checkpoints"] = st.open(rec.id).checkpoints()
        sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    else:
        con = _out_console()
        con.print(f"run {rec.id}: {rec.experiment}, status [bold]{rec.status}[/]"
                  + (f" ({rec.error})" if rec.error else ""))
        if res.checks:
            con.print(_checks_table(res.checks, "checks"))
        for k, v in (res.summary or {}).items():
            con.print(f"  {k}: {v}")
        con.print(f"directory: {rec.path}")
        if res.report:
            con.print(f"report: {res.report}")
    if rec.status != "completed":
        raise typer.Exit(1)
    raise typer.Exit(0 if res.passed else 1)


@app.command()
@_cli
def report(run_id: str = typer.Argument(..., metavar="RUN", help="A run id (or a unique prefix, or its name)."),
           store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """(Re)write the self-contained HTML report of a completed run and print its path."""
    from .experiments import result_of
    from .report import write_run_report

    st = _store(store)
    rec = st.get(run_id)
    if rec.status != "completed":
        raise BadInput(f"run {rec.id!r} is {rec.status}, not completed: there are no results to report"
                       + ("; `homflow resume` it first." if rec.status in ("interrupted", "failed") else "."))
    path = write_run_report(st.open(rec.id))
    res = result_of(st, rec.id)
    if as_json:
        sys.stdout.write(json.dumps(res.to_json(), default=_json_default) + "\n")
    else:
        _out_console().print(f"report: {path}")
    raise typer.Exit(0 if res.passed else 1)


@app.command()
@_cli
def resume(run_id: str = typer.Argument(..., metavar="RUN", help="An interrupted or failed run."),
           store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Continue an interrupted run from its last checkpoint (same final numbers as an uninterrupted run)."""
    from .experiments import resume as _resume

    st = _store(store)
    rec = st.get(run_id)
    if rec.status == "completed":
        raise BadInput(f"run {rec.id!r} is already completed; `homflow show {rec.id}` shows it.")
    prog, cb = _progress_runner(f"resume {rec.id}", as_json)
    with prog:
        res = _resume(rec.id, st, progress=cb)
    _emit(res, as_json=as_json, title="resumed")


@app.command()
@_cli
def sweep(config: Path = typer.Argument(..., help="A TOML config with a [sweep.grid] table of lists."),
          backend: str = typer.Option("local", "--backend", help="local (in-process / process pool) or ray."),
          workers: Optional[int] = typer.Option(None, "--workers", help="Processes for the local backend."),
          address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address."),
          quick: bool = QuickOpt, store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Run a grid over any config keys (e.g. seeds, widths, initial scales) and write a sweep report."""
    from .sweep import BACKENDS, load_sweep, run_sweep

    if backend not in BACKENDS:
        raise BadInput(f"`--backend` must be one of {BACKENDS}; got {backend!r}.")
    if workers is not None and workers < 1:
        raise BadInput(f"`--workers` must be >= 1; got {workers!r}.")
    sw = load_sweep(config, quick=True if quick else None)
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise BadInput("`--backend ray` needs the ray package, which is not installed: pip install "
                           "'homflow[ray]' (or use --backend local).") from None
    st = _store(store)
    prog, cb = _progress_runner(f"sweep of {len(sw.configs)} runs", as_json)
    with prog:
        res = run_sweep(sw, st, backend=backend, workers=workers, address=address, progress=cb)
    runs = [r.to_json() if hasattr(r, "to_json") else r for r in res.runs]
    checks = [dict(c, run=r["run"]) for r in runs for c in r.get("checks", [])]
    ok = all(r.get("passed") for r in runs)
    if as_json:
        obj = {"run": res.sweep, "sweep": res.sweep, "path": str(Path(res.report).parent.resolve()),
               "report": res.report, "passed": ok, "checks": checks, "runs": runs}
        sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    else:
        from rich.table import Table

        t = Table(title=f"sweep {res.sweep}")
        for c in ("run", "status", "checks passed"):
            t.add_column(c)
        for r in runs:
            cs = r.get("checks", [])
            t.add_row(str(r.get("run")), r.get("status", "?"), f"{sum(c['passed'] for c in cs)}/{len(cs)}"
                      + (f" ({r['error']})" if r.get("error") else ""))
        con = _out_console()
        con.print(t)
        con.print(f"sweep report: {res.report}")
    raise typer.Exit(0 if ok else 1)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
