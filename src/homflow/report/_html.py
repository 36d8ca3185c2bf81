"""Self-contained HTML reports: one per run (config, checks table with verdicts and residuals, figures as base64
PNG images, summary) and one per sweep (a table of runs by grid values, and check values across the grid)."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..store import Run, atomic_write_bytes, atomic_write_text
from ._display import FigureSpecDisplay, display_for

__all__ = ["write_run_report", "write_sweep_report", "render_figures", "figure_png"]

_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-family: monospace; }
tr.pass td.verdict { color: #0a7d2c; font-weight: bold; } tr.fail td.verdict { color: #b00020; font-weight: bold; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; } .figs figure { margin: 0; width: 520px; }
figcaption { font-size: .85em; color: #555; } .banner { padding: .5em 1em; border-radius: 4px; }
.banner.pass { background: #e3f6e8; } .banner.fail { background: #fde7ea; }
"""


def figure_png(display, *, dpi: int = 90, size=(6.4, 4.0)) -> bytes:
    """Draw a Display on a fresh (pyplot-free) matplotlib figure and return its PNG bytes."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=size, dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    display.plot(ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _spec_from_dict(d: dict):
    from ..experiments import Figure

    d = dict(d)
    for k in ("ys", "labels", "hlines"):
        d[k] = tuple(d.get(k, ()))
    known = set(Figure.__dataclass_fields__)
    return Figure(**{k: v for k, v in d.items() if k in known})


def render_figures(run: Run) -> list[tuple[str, str, bytes | None, str | None]]:
    """Draw every figure spec of a run into ``figures/<name>.png``; returns (name, title, png, error) per figure.

    A figure that cannot be drawn is reported with its error instead of breaking the report."""
    summary = run.read_json("summary.json", {}) or {}
    arrays = run.load_arrays()
    out = []
    for fd in summary.get("figures", []):
        try:
            spec = _spec_from_dict(fd)
            try:
                disp = display_for(spec, arrays)
                png = figure_png(disp)
            except Exception:  # a dedicated display that does not fit: fall back to the generic one
                png = figure_png(FigureSpecDisplay(spec, arrays))
            atomic_write_bytes(run.path / "figures" / f"{_safe(spec.name)}.png", png)
            out.append((spec.name, spec.title, png, None))
        except Exception as e:  # noqa: BLE001 - reported in the page
            out.append((str(fd.get("name", "?")), str(fd.get("title", "")), None, f"{type(e).__name__}: {e}"))
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "figure"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    if isinstance(v, str):
        try:
            return f"{float(v):.6g}"
        except ValueError:
            return v
    return str(v)


def _residual(c: dict) -> str:
    """How far inside (or outside) its tolerance a check is: value/tolerance for '<=', tolerance/value for '>='."""
    try:
        v, tol = float(c["value"]), float(c["tolerance"])
    except (TypeError, ValueError):
        return "-"
    if not (math.isfinite(v) and math.isfinite(tol)):
        return "-"
    if c.get("relation", "<=") == "<=":
        return f"{v / tol:.3g}" if tol != 0 else f"{v:.3g} (abs)"
    return f"{tol / v:.3g}" if v != 0 else "inf"


def checks_table(checks: list[dict]) -> str:
    rows = []
    for c in checks:
        cls = "pass" if c["passed"] else "fail"
        rows.append(
            f'<tr class="{cls}"><td>{html.escape(str(c["name"]))}</td><td class="num">{_fmt(c["value"])}</td>'
            f'<td>{html.escape(c.get("relation", "<="))}</td><td class="num">{_fmt(c["tolerance"])}</td>'
            f'<td class="num">{_residual(c)}</td><td class="verdict">{"PASS" if c["passed"] else "FAIL"}</td>'
            f'<td>{html.escape(str(c.get("description", "")))}</td></tr>')
    return ('<table class="checks"><tr><th>check</th><th>value</th><th></th><th>tolerance</th>'
            '<th>residual (value/tol; &lt; 1 passes)</th><th>verdict</th><th>description</th></tr>'
            + "".join(rows) + "</table>")


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"/>'


def _kv_table(d: dict) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            v = json.dumps(v, default=str)
        rows.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def write_run_report(run: Run) -> Path:
    """Write ``report.html`` (and ``figures/*.png``) of a run; return its path."""
    rec = run.store.get(run.id)
    checks = run.read_json("checks.json", []) or []
    summary = run.read_json("summary.json", {}) or {}
    cfg = (run.path / "config.toml").read_text() if (run.path / "config.toml").exists() else ""
    figs = render_figures(run)
    ok = all(c["passed"] for c in checks)
    n_ok = sum(bool(c["passed"]) for c in checks)
    fig_html = []
    for name, title, png, err in figs:
        if png is not None:
            fig_html.append(f"<figure>{_img(png, title or name)}<figcaption>{html.escape(title or name)}"
                            "</figcaption></figure>")
        else:
            fig_html.append(f"<figure><figcaption>{html.escape(name)}: could not be drawn ({html.escape(err or '')})"
                            "</figcaption></figure>")
    meta = {"run": rec.id, "experiment": rec.experiment, "name": rec.name or "",
            "status": "completed" if rec.status == "running" else rec.status,  # written just before the index row
            "started": _dt.datetime.fromtimestamp(rec.started or rec.created).isoformat(timespec="seconds"),
            "duration (s)": summary.get("duration_s", rec.duration_s), "quick": rec.quick, "directory": rec.path}
    page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>homflow run {html.escape(rec.id)}</title>
<style>{_CSS}</style></head><body>
<h1>homflow run <code>{html.escape(rec.id)}</code>: {html.escape(rec.experiment)}</h1>
<p class="banner {'pass' if ok else 'fail'}">{n_ok} of {len(checks)} checks passed.</p>
<h2>Checks</h2>{checks_table(checks)}
<h2>Figures</h2><div class="figs">{''.join(fig_html) or '<p>No figures.</p>'}</div>
<h2>Summary</h2>{_kv_table(summary.get('summary', {}))}
<h2>Run</h2>{_kv_table(meta)}
<h2>Config</h2><pre>{html.escape(cfg)}</pre>
</body></html>"""
    atomic_write_text(run.report_path, page)
    return run.report_path


def write_sweep_report(store, sweep: str, grid: dict[str, list], path: Path | str | None = None) -> Path:
    """Write the HTML report of a sweep: one row per run (grid values, status, checks passed) and, per check, its
    value across the runs; return its path (default ``<store>/sweeps/<sweep>.html``)."""
    from ..sweep import run_grid_values

    recs = list(reversed(store.list(sweep=sweep)))
    keys = list(grid)
    rows, values, grid_of = [], {}, {}
    for i, rec in enumerate(recs):
        run = store.open(rec.id)
        gv = run_grid_values(run, keys)
        grid_of[i] = gv
        checks = run.read_json("checks.json", []) or []
        for c in checks:
            try:
                values.setdefault(c["name"], {})[i] = float(c["value"])
            except (TypeError, ValueError):
                pass
        verdict = ("PASS" if rec.passed else "FAIL") if rec.passed is not None else rec.status.upper()
        cls = "pass" if rec.passed else "fail"
        link = f'<a href="{html.escape(Path(rec.path).as_uri())}">{html.escape(rec.id)}</a>' \
            if (Path(rec.path) / "report.html").exists() else html.escape(rec.id)
        rows.append(f'<tr class="{cls}"><td class="num">{i}</td><td>{link}</td>'
                    + "".join(f"<td>{html.escape(_fmt(gv.get(k)))}</td>" for k in keys)
                    + f'<td>{rec.status}</td><td class="num">{rec.n_passed}/{rec.n_checks}</td>'
                      f'<td class="verdict">{verdict}</td><td class="num">{_fmt(rec.duration_s or 0.0)}</td></tr>')
    figs = []
    for name, vals in values.items():
        from matplotlib.figure import Figure as MplFigure

        fig = MplFigure(figsize=(6.4, 3.6), dpi=90)
        ax = fig.add_subplot(1, 1, 1)
        idx = np.array(sorted(vals))
        v = np.array([vals[i] for i in idx])
        varying = [k for k in keys if len(grid[k]) > 1]
        xk = varying[0] if len(varying) >= 1 else None
        xs = [grid_of[i].get(xk) for i in idx] if xk else []
        if xk and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            others = [k for k in varying if k != xk]
            groups: dict = {}
            for i, x, y in zip(idx, xs, v):
                groups.setdefault(tuple(grid_of[i].get(k) for k in others), []).append((x, y))
            for g, pts in groups.items():
                pts.sort()
                lab = ", ".join(f"{k}={val}" for k, val in zip(others, g)) or None
                ax.plot([a for a, _ in pts], [b for _, b in pts], "o-", label=lab)
            xa = np.asarray(xs, float)
            if np.all(xa > 0) and xa.max() / xa.min() > 100:
                ax.set_xscale("log")
            if others:
                ax.legend(fontsize=7)
            ax.set_xlabel(xk)
        else:
            ax.plot(idx, v, "o-")
            ax.set_xlabel("run # (row of the table)")
        if np.all(v > 0) and v.max() / max(v.min(), 1e-300) > 100:
            ax.set_yscale("log")
        ax.set_ylabel("value")
        ax.set_title(name)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        figs.append(f"<figure>{_img(buf.getvalue(), name)}<figcaption>{html.escape(name)}</figcaption></figure>")
    n_ok = sum(1 for r in recs if r.passed)
    page = f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>homflow sweep {html.escape(sweep)}</title>
<style>{_CSS}</style></head><body>
<h1>homflow sweep <code>{html.escape(sweep)}</code></h1>
<p class="banner {'pass' if n_ok == len(recs) else 'fail'}">{n_ok} of {len(recs)} runs passed every check.</p>
<h2>Grid</h2>{_kv_table({k: json.dumps(v) for k, v in grid.items()})}
<h2>Runs</h2><table class="checks"><tr><th>#</th><th>run</th>{''.join(f'<th>{html.escape(k)}</th>' for k in keys)}
<th>status</th><th>checks passed</th><th>verdict</th><th>duration (s)</th></tr>{''.join(rows)}</table>
<h2>Check values across the sweep</h2><div class="figs">{''.join(figs)}</div>
</body></html>"""
    path = Path(path) if path is not None else store.root / "sweeps" / f"{sweep}.html"
    atomic_write_text(path, page)
    return path
