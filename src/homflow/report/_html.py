"""The self-contained HTML report of a run: verdict, checks table with each value against its tolerance, figures as
PNG images sized to their slots, summary, provenance (versions, platform, device, git commit, command line), config.
"""

from __future__ import annotations

import datetime as _dt
import html
from pathlib import Path

from .._records import figure_from_dict
from ..store import Run, atomic_write_bytes, atomic_write_text
from ._display import FigureSpecDisplay, display_for
from ._page import checks_table, figure_block, figure_png, kv_table, page

__all__ = ["write_run_report", "render_figures", "run_displays"]


def run_displays(summary: dict, arrays: dict) -> list[tuple[str, str, object | None, str | None]]:
    """The Display of every figure spec stored in a run's summary: ``(name, title, display, error)`` per figure.

    A dedicated display (``spec.display``) that does not fit its arrays falls back to the generic one; a spec that
    cannot be drawn at all gives ``display=None`` and the error."""
    out = []
    for fd in summary.get("figures", []):
        try:
            spec = figure_from_dict(fd)
            try:
                disp = display_for(spec, arrays)
            except Exception:  # noqa: BLE001 - a dedicated display that does not fit: the generic one
                disp = FigureSpecDisplay(spec, arrays)
            out.append((spec.name, spec.title, disp, None))
        except Exception as e:  # noqa: BLE001 - reported in the page
            out.append((str(fd.get("name", "?")), str(fd.get("title", "")), None, f"{type(e).__name__}: {e}"))
    return out


def _png(spec, arrays) -> bytes:
    try:
        return figure_png(display_for(spec, arrays))
    except Exception:  # noqa: BLE001 - a dedicated display that does not fit or draw: the generic one
        return figure_png(FigureSpecDisplay(spec, arrays))


def render_figures(run: Run) -> list[tuple[str, str, bytes | None, str | None]]:
    """Draw every figure spec of a run into ``figures/<name>.png``; returns (name, title, png, error) per figure.

    A figure that cannot be drawn is reported with its error instead of breaking the report."""
    summary = run.read_json("summary.json", {}) or {}
    arrays = run.load_arrays()
    out = []
    for fd in summary.get("figures", []):
        try:
            spec = figure_from_dict(fd)
            png = _png(spec, arrays)
            atomic_write_bytes(run.path / "figures" / f"{_safe(spec.name)}.png", png)
            out.append((spec.name, spec.title, png, None))
        except Exception as e:  # noqa: BLE001 - reported in the page
            out.append((str(fd.get("name", "?")), str(fd.get("title", "")), None, f"{type(e).__name__}: {e}"))
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "figure"


def provenance_table(prov: dict) -> str:
    """The provenance of a run (what ran, where, from which source) as a table; '-' for what was not recorded."""
    if not prov:
        return "<p>Not recorded (a run made before homflow recorded provenance).</p>"
    return kv_table(prov)


def write_run_report(run: Run) -> Path:
    """Write ``report.html`` (and ``figures/*.png``) of a run; return its path."""
    rec = run.store.get(run.id)
    checks = run.read_json("checks.json", []) or []
    summary = run.read_json("summary.json", {}) or {}
    prov = run.read_json("provenance.json", {}) or {}
    cfg = (run.path / "config.toml").read_text() if (run.path / "config.toml").exists() else ""
    figs = render_figures(run)
    ok = all(c["passed"] for c in checks)
    n_ok = sum(bool(c["passed"]) for c in checks)
    fig_html = "".join(figure_block(png, title or name, err) for name, title, png, err in figs)
    meta = {"run": rec.id, "experiment": rec.experiment, "name": rec.name or "",
            "status": "completed" if rec.status == "running" else rec.status,  # written just before the index row
            "started": _dt.datetime.fromtimestamp(rec.started or rec.created).isoformat(timespec="seconds"),
            "duration (s)": summary.get("duration_s", rec.duration_s), "quick": rec.quick, "directory": rec.path,
            "open in Python": f"homflow.load_run({rec.id!r})"}
    body = f"""<h1>homflow run <code>{html.escape(rec.id)}</code>: {html.escape(rec.experiment)}</h1>
<p class="banner {'pass' if ok else 'fail'}">{n_ok} of {len(checks)} checks passed.</p>
<h2>Checks</h2>{checks_table(checks)}
<h2>Figures</h2><div class="figs">{fig_html or '<p>No figures.</p>'}</div>
<h2>Summary</h2>{kv_table(summary.get('summary', {}))}
<h2>Run</h2>{kv_table(meta)}
<h2>Provenance</h2>{provenance_table(prov)}
<h2>Config</h2><pre>{html.escape(cfg)}</pre>"""
    atomic_write_text(run.report_path, page(f"homflow run {rec.id}", body))
    return run.report_path
