"""The runner: config -> run directory -> experiment -> arrays, checks, figure specs, provenance -> index.

``execute(cfg, store)`` starts a run, ``resume(run_id, store)`` continues an interrupted one from its checkpoints (the
experiment reads them through its :class:`Context`) and writes the same files an uninterrupted run would. The runner
draws nothing: it hands the stored run to a ``report`` writer (by default :func:`homflow.report.write_run_report`).
A run that raises is marked ``failed`` and the exception carries its :class:`RunResult` as ``exc.run_result``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from typing import Any, Callable

import numpy as np

from .._provenance import provenance
from .._records import Outcome
from ._config import RunConfig, config_to_toml, load_config
from ._registry import Context, get_experiment

__all__ = ["RunResult", "execute", "resume", "result_of"]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a finished run reports: its id, directory, status, checks (dicts with name/value/tolerance/passed) and
    summary, and the report's path."""

    run: str
    path: str
    status: str
    checks: list[dict]
    summary: dict
    report: str | None
    duration_s: float | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == "completed" and all(c["passed"] for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "path": self.path, "status": self.status, "passed": self.passed,
                "checks": self.checks, "summary": self.summary, "report": self.report,
                "duration_s": self.duration_s, "error": self.error}


def _context(run, cfg: RunConfig, progress: Callable[[float, str], None] | None) -> Context:
    return Context(progress=progress or (lambda f, m: None), save_checkpoint=run.save_checkpoint,
                   load_checkpoint=run.load_checkpoint, quick=cfg.quick, write_text=run.write_text)


def _check_outcome(out: Any, name: str) -> Outcome:
    if not isinstance(out, Outcome):
        raise TypeError(f"experiment {name!r} returned {type(out).__name__}, not an Outcome.")
    for f in out.figures:
        for k in (f.x, *f.ys):
            if k not in out.arrays:
                raise ValueError(f"experiment {name!r}: figure {f.name!r} names the array {k!r}, which it did not "
                                 f"return (arrays: {sorted(out.arrays)}).")
    return out


def _run_in(store, run, cfg: RunConfig, progress, *, report) -> RunResult:
    exp = get_experiment(cfg.experiment)
    t0 = time.time()
    prior = run.read_json("summary.json", {}) or {}
    elapsed_before = float(prior.get("elapsed_before_s", 0.0))
    try:
        out = _check_outcome(exp.fn(dict(cfg.params), _context(run, cfg, progress)), cfg.experiment)
    except KeyboardInterrupt:
        dur = elapsed_before + time.time() - t0
        run.write_json("summary.json", {"elapsed_before_s": dur, "status": "interrupted"})
        store.finish(run.id, status="interrupted", error="interrupted (Ctrl-C); resume it with `homflow resume`",
                     duration_s=dur)
        raise
    except BaseException as e:
        dur = elapsed_before + time.time() - t0
        msg = f"{type(e).__name__}: {e}"
        error = msg.splitlines()[0][:500] if msg else "failed"
        run.write_text("error.txt", traceback.format_exc())
        store.finish(run.id, status="failed", error=error, duration_s=dur)
        try:
            e.run_result = RunResult(run.id, str(run.path.resolve()), "failed", [], {}, None, dur, error)
        except AttributeError:  # pragma: no cover - an exception type that takes no attributes
            pass
        raise
    checks = [c.to_dict() for c in out.checks]
    run.save_arrays(out.arrays)
    run.write_json("checks.json", checks)
    dur = elapsed_before + time.time() - t0
    summary = {"experiment": cfg.experiment, "summary": _jsonable(out.summary),
               "figures": [dataclasses.asdict(f) for f in out.figures], "duration_s": dur,
               "elapsed_before_s": dur, "passed": out.passed}
    run.write_json("summary.json", summary)
    report_path = None
    if report:
        if progress:
            progress(0.97, "writing the report")
        if report is True:
            from ..report import write_run_report as report

        try:
            report_path = str(report(run))
        except Exception as e:  # noqa: BLE001 - the results are stored; `homflow report` can retry
            summary["report_error"] = f"{type(e).__name__}: {e}"
            run.write_json("summary.json", summary)
    store.finish(run.id, status="completed", checks=checks, duration_s=dur)
    if progress:
        progress(1.0, "done")
    return RunResult(run.id, str(run.path.resolve()), "completed", checks, summary["summary"], report_path, dur)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else str(v)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def execute(cfg: RunConfig, store, *, progress: Callable[[float, str], None] | None = None, sweep: str | None = None,
            report: bool | Callable = True) -> RunResult:
    """Run ``cfg`` as a new run of ``store`` (its directory, config.toml, provenance.json, index row), then store its
    outcome and write its report.

    Arguments:
        report: ``True`` for :func:`homflow.report.write_run_report`, ``False`` for none, or a callable
            ``report(run) -> path``.

    Raises whatever the experiment raises (the run is then marked ``failed`` with the reason and the exception gets
    ``run_result``, the failed :class:`RunResult`; ``KeyboardInterrupt`` marks it ``interrupted``, resumable).
    """
    run = store.create(cfg.experiment, name=cfg.name, quick=cfg.quick, sweep=sweep)
    run.write_text("config.toml", config_to_toml(cfg))
    run.write_json("provenance.json", provenance())
    return _run_in(store, run, cfg, progress, report=report)


def resume(run_id: str, store, *, progress: Callable[[float, str], None] | None = None,
           report: bool | Callable = True) -> RunResult:
    """Continue the run ``run_id`` from its last checkpoint (any status but ``running`` with a live process).

    The experiment is called again with the stored config; it finds its checkpoints through the context and goes on
    from there, so the final numbers are those of an uninterrupted run.

    Raises:
        ValueError: unknown run, or a run that is still running.
    """
    rec = store.get(run_id)
    if rec.status == "running":
        raise ValueError(f"run {rec.id!r} is still running (pid {rec.pid}); wait for it or kill it first.")
    run = store.open(rec.id)
    cfg = load_config(run.path / "config.toml")
    store.mark_running(rec.id)
    prov = run.read_json("provenance.json", {}) or {}
    prov.setdefault("resumed", []).append(provenance())
    run.write_json("provenance.json", prov)
    return _run_in(store, run, cfg, progress, report=report)


def result_of(store, run_id: str) -> RunResult:
    """The :class:`RunResult` of a stored run (finished or not) from its files and index row."""
    rec = store.get(run_id)
    run = store.open(rec.id)
    checks = run.read_json("checks.json", []) or []
    summary = (run.read_json("summary.json", {}) or {}).get("summary", {})
    report = str(run.report_path) if run.report_path.exists() else None
    return RunResult(rec.id, rec.path, rec.status, checks, summary, report, rec.duration_s, rec.error)
