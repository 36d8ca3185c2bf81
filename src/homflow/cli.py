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
import typer.core


def _plain(text: Any) -> str:
    """User text made safe to print: control characters (escape codes, newlines) shown as ``\\xNN`` escapes; printed
    with markup off, so ``[/x]`` stays literally ``[/x]``."""
    s = str(text)
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in s)


def _error_json(message: str, code: int, run_result=None) -> None:
    """One JSON object for a command that ended in an error; a run that raised names its (failed) run."""
    obj = {"run": None, "path": None, "checks": [], "passed": False, "status": "error", "error": message,
           "exit_code": code}
    if run_result is not None:
        obj.update(run=run_result.run, path=run_result.path, status=run_result.status)
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _print_error(label: str, message: str) -> None:
    from rich.text import Text

    _err_console().print(Text.assemble((label, "bold red"), " ", _plain(message)), soft_wrap=True)


class _OneLineErrors(typer.core.TyperGroup):
    """Usage errors (``--limit abc``, an unknown option) as one plain line on stderr, and as one JSON object on
    stdout when ``--json`` is given, instead of click's multi-line box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        click = typer.core._click  # typer's own click (vendored in recent typer)

        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(args=argv, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            rv = e.exit_code
        except click.ClickException as e:
            msg = e.format_message().strip().replace("\n", " ")
            cmd = next((a for a in argv if not a.startswith("-")), None)
            msg += f" (see `homflow {cmd + ' ' if cmd else ''}--help`)"
            if "--json" in argv:
                _error_json(msg, e.exit_code)
            _print_error("error:", msg)
            rv = e.exit_code
        except click.exceptions.Abort:
            _print_error("error:", "aborted")
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=_OneLineErrors, rich_markup_mode=None, help="homflow: gradient-flow laboratory for homogeneous neural networks. Exit codes: 0 every check "
                       "passed, 1 a check failed, 2 bad input. Runs are stored in --store / $HOMFLOW_STORE / ./runs.",
                  no_args_is_help=True,
                  add_completion=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})

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


def _bad_input_types() -> tuple:
    from .shards import ShardError

    return (BadInput, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ShardError)


def _cli(fn: Callable) -> Callable:
    """Map errors to exit codes: bad input (ValueError, ConfigError, BadInput, a damaged store, no Ray cluster) -> 2,
    other failures (the solver's, the disk's) -> 1; one plain line on stderr, and one JSON object on stdout with
    ``--json``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            msg = "interrupted; `homflow resume RUN` continues from the last checkpoint."
            if as_json:
                _error_json(msg, 130)
            _print_error("interrupted:", msg)
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - bad input or a failed run: say why in one line
            code = 2 if isinstance(e, _bad_input_types()) else 1
            msg = _one_line(e) if code == 2 else f"{type(e).__name__}: {_one_line(e)}"
            if as_json:
                _error_json(msg, code, getattr(e, "run_result", None))
            _print_error("error:" if code == 2 else "run failed:", msg)
            raise typer.Exit(code) from None

    return wrapper


def _store(path: Optional[Path], readonly: bool = False):
    from .store import RunStore

    return RunStore(path, readonly=readonly)


def _progress_runner(label: str, quiet: bool = False):
    """A rich progress bar on stderr and the ``progress(fraction, message)`` callback that drives it."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}", markup=False, style="bold"), BarColumn(),
                    TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                    TextColumn("{task.fields[msg]}", markup=False), console=_err_console(), transient=True,
                    disable=quiet)
    task = prog.add_task(_plain(label), total=1.0, msg="")

    def cb(fraction: float, message: str) -> None:
        prog.update(task, completed=max(0.0, min(1.0, float(fraction))), msg=_plain(message)[:70])

    return prog, cb


def _checks_table(checks: list[dict], title: str):
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(_plain(title)))
    for col, j in (("check", "left"), ("value", "right"), ("", "center"), ("tolerance", "right"),
                   ("verdict", "center")):
        t.add_column(col, justify=j)
    for c in checks:
        v = c["value"]
        vs = f"{v:.4g}" if isinstance(v, (int, float)) else str(v)
        t.add_row(Text(_plain(c["name"])), Text(_plain(vs)), Text(_plain(c.get("relation", "<="))),
                  f"{c['tolerance']:.3g}", Text("PASS", "green") if c["passed"] else Text("FAIL", "red"))
    return t


def _emit(result, *, as_json: bool, extra: dict | None = None, title: str = "checks",
          report_expected: bool = True) -> None:
    """Print a run's result (a table and the report path, or one JSON object) and exit with its verdict (1 also
    when the report could not be written)."""
    obj = result.to_json()
    obj.update(extra or {})
    if result.status == "completed" and not result.report and report_expected:
        obj["error"] = f"the report could not be written ({_report_error(result.path)})"
        obj["passed"] = False
    if as_json:
        sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
        sys.stdout.flush()
    else:
        con = _out_console()
        con.print(_checks_table(result.checks, f"{title}: {result.run}"))
        skipped = (result.summary or {}).get("skipped")
        if skipped:
            for s in skipped:
                con.print(f"skipped: {_plain(s)}", markup=False)
        n_ok = sum(bool(c["passed"]) for c in result.checks)
        con.print(f"{n_ok}/{len(result.checks)} checks passed; status {_plain(result.status)}.", markup=False)
        con.print(f"run directory: {_plain(result.path)}", markup=False)
        if result.report:
            con.print(f"report: {_plain(result.report)}", markup=False)
    if result.status == "completed" and not result.report and report_expected:
        why = _report_error(result.path)
        _print_error("error:", f"the report of run {result.run} could not be written ({why}); the results are "
                               f"stored; `homflow report {result.run}` writes it again.")
        raise typer.Exit(1)
    raise typer.Exit(0 if result.passed else 1)


def _report_error(path) -> str:
    try:
        return str(json.loads((Path(path) / "summary.json").read_text()).get("report_error") or "unknown reason")
    except (OSError, ValueError):
        return "unknown reason"


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


def _version(value: bool) -> None:
    if value:
        from . import __version__

        sys.stdout.write(f"homflow {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_version,
                                       help="Print homflow's version and exit.")) -> None:
    """Exact gradient flows, certified KKT points, neuron splitting and the phases of small-initialisation training.

    Exit codes: 0 all checks pass, 1 a check failed, 2 bad input.
    """
    import os

    # float64 for every command, without importing JAX for the ones that do not compute (list, show, --help): JAX
    # reads the variable when it is first imported; if it already is, switch it now.
    os.environ["JAX_ENABLE_X64"] = "1"
    if "jax" in sys.modules:
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
        if any(not (c.isprintable() or c == " ") for c in s):
            raise BadInput(f"`--set` must be one line without control characters; got {s!r}.")
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
    from .experiments import parse_config
    from .experiments._config import read_toml

    d = read_toml(config, "config")
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


@app.command()
@_cli
def report(run_id: str = typer.Argument(..., metavar="RUN", help="A run id, 'latest', a name or a built-in's name "
                                                                 "(its newest run), or an id prefix."),
           store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """(Re)write the self-contained HTML report of a completed run and print its path."""
    from .experiments import result_of
    from .report import write_run_report
    from ._runs import find_run

    st = _store(store)
    rec = find_run(st, run_id)
    if rec.status != "completed":
        raise BadInput(f"run {rec.id!r} is {rec.status}, not completed: there are no results to report"
                       + ("; `homflow resume` it first." if rec.status in ("interrupted", "failed") else "."))
    path = write_run_report(st.open(rec.id))
    res = result_of(st, rec.id)
    if as_json:
        sys.stdout.write(json.dumps(res.to_json(), default=_json_default) + "\n")
    else:
        _out_console().print(_plain(f"report: {path}"), markup=False)
    raise typer.Exit(0 if res.passed else 1)


@app.command()
@_cli
def resume(run_id: str = typer.Argument(..., metavar="RUN", help="An interrupted or failed run."),
           store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Continue an interrupted run from its last checkpoint (same final numbers as an uninterrupted run)."""
    from .experiments import resume as _resume
    from ._runs import find_run

    st = _store(store)
    rec = find_run(st, run_id)
    if rec.status == "completed":
        raise BadInput(f"run {rec.id!r} is already completed; `homflow show {rec.id}` shows it.")
    prog, cb = _progress_runner(f"resume {rec.id}", as_json)
    with prog:
        res = _resume(rec.id, st, progress=cb)
    _emit(res, as_json=as_json, title="resumed")


@app.command()
@_cli
def sweep(config: Optional[Path] = typer.Argument(None, help="A TOML config with a [sweep.grid] table of lists."),
          backend: str = typer.Option("local", "--backend", help="local (in-process / process pool) or ray."),
          workers: Optional[int] = typer.Option(None, "--workers", help="Points computed at once (processes for "
                                                                        "local, tasks in flight for ray)."),
          address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (host:port)."),
          resume_: Optional[str] = typer.Option(None, "--resume", metavar="SWEEP",
                                                help="Finish an earlier sweep of the store (its id or a prefix): "
                                                     "completed points are kept, the others run, the report is "
                                                     "written."),
          retries: int = typer.Option(2, "--retries", help="Extra attempts for a point whose worker died."),
          gpus: float = typer.Option(0.0, "--gpus", help="GPUs per point (ray)."),
          cpus: float = typer.Option(1.0, "--cpus", help="CPUs per point (ray)."),
          timeout: float = typer.Option(30.0, "--timeout", help="Seconds to wait for the Ray cluster at --address."),
          cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", envvar="HOMFLOW_JAX_CACHE",
                                                   help="JAX compilation cache shared by the workers (default "
                                                        "~/.cache/homflow/jax; 'off' disables it)."),
          quick: bool = QuickOpt, store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Run a grid over any config keys (e.g. seeds, widths, initial scales) and write a sweep report."""
    from .sweep import BACKENDS, load_sweep, run_sweep

    if backend not in BACKENDS:
        raise BadInput(f"`--backend` must be one of {BACKENDS}; got {backend!r}.")
    if workers is not None and workers < 1:
        raise BadInput(f"`--workers` must be >= 1; got {workers!r}.")
    if retries < 0 or not timeout > 0 or not cpus > 0 or not gpus >= 0:
        raise BadInput(f"`--retries` must be >= 0, `--timeout` and `--cpus` > 0, `--gpus` >= 0; got {retries!r}, "
                       f"{timeout!r}, {cpus!r}, {gpus!r}.")
    if (config is None) == (resume_ is None):
        raise BadInput("give a sweep config file, or `--resume SWEEP` to finish an earlier sweep (not both).")
    sw = load_sweep(config, quick=True if quick else None) if config is not None else None
    if backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise BadInput("`--backend ray` needs the ray package, which is not installed: pip install "
                           "'homflow[ray]' (or use --backend local).") from None
    cache = None if cache_dir is None else (None if str(cache_dir).lower() in ("off", "none", "0") else cache_dir)
    if cache_dir is not None and cache is None:
        import os

        os.environ["HOMFLOW_JAX_CACHE"] = "off"
    st = _store(store)
    label = f"sweep of {len(sw.configs)} runs" if sw is not None else f"resume of sweep {resume_}"
    prog, cb = _progress_runner(label, as_json)
    with prog:
        res = run_sweep(sw, st, backend=backend, workers=workers, address=address, resume=resume_,
                        max_retries=retries, num_cpus=cpus, num_gpus=gpus, connect_timeout_s=timeout,
                        cache_dir=None if cache is None else str(cache), progress=cb)
    runs = [r.to_json() if hasattr(r, "to_json") else r for r in res.runs]
    checks = [dict(c, run=r["run"]) for r in runs for c in r.get("checks", [])]
    ok = all(r.get("passed") for r in runs)
    if as_json:
        obj = {"run": res.sweep, "sweep": res.sweep, "path": str(Path(res.report).parent.resolve()),
               "report": res.report, "passed": ok, "checks": checks, "runs": runs}
        sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
    else:
        from rich.table import Table
        from rich.text import Text

        t = Table(title=Text(_plain(f"sweep {res.sweep}")))
        for c in ("run", "status", "checks passed"):
            t.add_column(c)
        for r in runs:
            cs = r.get("checks", [])
            t.add_row(Text(_plain(r.get("run"))), Text(_plain(r.get("status", "?"))),
                      Text(_plain(f"{sum(c['passed'] for c in cs)}/{len(cs)}"
                                  + (f" ({r['error']})" if r.get("error") else ""))))
        con = _out_console()
        con.print(t)
        con.print(_plain(f"sweep report: {res.report}"), markup=False)
    raise typer.Exit(0 if ok else 1)


store_app = typer.Typer(help="Check or repair the run store: its SQLite index against the run directories.",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(store_app, name="store")


def _store_report(found: dict, as_json: bool, title: str) -> None:
    if as_json:
        obj = {"run": None, "path": None, "checks": [], **found}
        sys.stdout.write(json.dumps(obj, default=_json_default) + "\n")
        return
    con = _out_console()
    con.print(_plain(f"{title}: index {found['index']}; {found['runs']} runs indexed, {found['dirs']} run "
                     f"directories"), markup=False)
    for key, what in (("orphans", "run directory without an index row"), ("missing", "index row without a "
                      "directory"), ("damaged", "damaged file"), ("added", "indexed"), ("dropped", "dropped")):
        for x in found.get(key) or []:
            con.print(_plain(f"  {what}: {x}"), markup=False)
    if found.get("moved"):
        con.print(_plain(f"  the damaged index was moved to {found['moved']}"), markup=False)


@store_app.command("check")
@_cli
def store_check(store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Compare the index with the run directories (read-only): orphans, missing directories, damaged files.
    Exit 0 if all is well, 1 if `homflow store repair` has something to do."""
    from .store import RunStore

    found = RunStore(store, readonly=True, check_index=False).check()
    if as_json:
        found = {**found, "path": None}
    _store_report(found, as_json, "store check")
    raise typer.Exit(0 if found["ok"] else 1)


@store_app.command("repair")
@_cli
def store_repair(store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Rebuild the index from the run directories: a damaged index is moved aside, orphans are indexed, rows whose
    directory is gone are dropped."""
    from .store import RunStore

    found = RunStore(store, check_index=False).repair()
    _store_report(found, as_json, "store repair")
    raise typer.Exit(0)


from . import _cli_runs  # noqa: E402,F401  (list, show, latest, delete, export)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
