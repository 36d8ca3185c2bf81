"""The HTML report of a sweep: one row per run (grid values, status, checks passed, a link to the run's report,
relative to the sweep report so the store can be moved or served), and per check its value across the grid (log axes
where the grid or the values span decades)."""

from __future__ import annotations

import html
import json
import os
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..store import atomic_write_text
from ._display import set_log_scale, wants_log
from ._page import figure_block, fmt, kv_table, page

__all__ = ["write_sweep_report", "grid_values", "relative_link", "plot_check"]


def grid_values(run, keys) -> dict[str, Any]:
    """The values of dotted ``keys`` (``init.scale``) in a stored run's ``config.toml`` (``None`` where absent)."""
    p = Path(run.path) / "config.toml"
    if not p.exists():
        return {k: None for k in keys}
    d = tomllib.loads(p.read_text())
    out = {}
    for k in keys:
        cur: Any = d
        for part in k.split("."):
            cur = cur.get(part) if isinstance(cur, Mapping) else None
        out[k] = cur
    return out


def relative_link(target: Path | str, page_dir: Path | str) -> str:
    """A URL to ``target`` relative to the directory of the page that links it (POSIX separators, percent-encoded)."""
    rel = os.path.relpath(Path(target).resolve(), Path(page_dir).resolve())
    return urllib.parse.quote(Path(rel).as_posix())


def _numeric(xs) -> bool:
    return all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)


def _check_figure(name: str, vals: dict[int, float], grid_of: dict[int, dict], grid: dict[str, list]) -> bytes:
    import io

    from matplotlib.figure import Figure as MplFigure

    from ._page import FIGURE_DPI, FIGURE_SIZE

    fig = MplFigure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI, layout="constrained")
    plot_check(fig.add_subplot(1, 1, 1), name, vals, grid_of, grid)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_check(ax, name: str, vals: dict[int, float], grid_of: dict[int, dict], grid: dict[str, list]):
    """Draw one check's value across a sweep on ``ax``: against the first grid key that varies (one line per value
    of the other varying keys), on a log axis where the grid or the values span decades; against the run number when
    that key is not numeric. ``vals`` and ``grid_of`` map a run's row number to its value and its grid values."""
    idx = np.array(sorted(vals))
    v = np.array([vals[i] for i in idx])
    varying = [k for k in grid if len(grid[k]) > 1]
    xk = varying[0] if varying else None
    xs = [grid_of[i].get(xk) for i in idx] if xk else []
    if xk and _numeric(xs):
        others = [k for k in varying if k != xk]
        groups: dict = {}
        for i, x, y in zip(idx, xs, v):
            groups.setdefault(tuple(grid_of[i].get(k) for k in others), []).append((x, y))
        for g, pts in groups.items():
            pts.sort()
            lab = ", ".join(f"{k}={val}" for k, val in zip(others, g)) or None
            ax.plot([a for a, _ in pts], [b for _, b in pts], "o-", label=lab)
        if wants_log(xs):
            ax.set_xscale("log")
        if others:
            ax.legend(fontsize=7)
        ax.set_xlabel(xk)
    else:
        ax.plot(idx, v, "o-")
        ax.set_xlabel("run # (row of the table)")
    if wants_log(v):
        set_log_scale(ax, v)
    ax.set_ylabel("value")
    ax.set_title(name)
    return ax


def write_sweep_report(store, sweep: str, grid: dict[str, list], path: Path | str | None = None) -> Path:
    """Write the HTML report of a sweep: one row per run (grid values, status, checks passed, a relative link to its
    report) and, per check, its value across the runs; return its path (default ``<store>/sweeps/<sweep>.html``)."""
    path = Path(path) if path is not None else Path(store.root) / "sweeps" / f"{sweep}.html"
    recs = list(reversed(store.list(sweep=sweep)))
    keys = list(grid)
    rows, values, grid_of = [], {}, {}
    for i, rec in enumerate(recs):
        run = store.open(rec.id)
        gv = grid_values(run, keys)
        grid_of[i] = gv
        for c in run.read_json("checks.json", []) or []:
            try:
                values.setdefault(c["name"], {})[i] = float(c["value"])
            except (TypeError, ValueError):
                pass
        verdict = ("PASS" if rec.passed else "FAIL") if rec.passed is not None else rec.status.upper()
        cls = "pass" if rec.passed else "fail"
        report = Path(rec.path) / "report.html"
        link = (f'<a href="{html.escape(relative_link(report, path.parent))}">{html.escape(rec.id)}</a>'
                if report.exists() else html.escape(rec.id))
        rows.append(f'<tr class="{cls}"><td class="num" data-label="#">{i}</td><td data-label="run">{link}</td>'
                    + "".join(f'<td data-label="{html.escape(k)}">{html.escape(fmt(gv.get(k)))}</td>' for k in keys)
                    + f'<td data-label="status">{html.escape(rec.status)}</td>'
                      f'<td class="num" data-label="checks passed">{rec.n_passed}/{rec.n_checks}</td>'
                      f'<td class="verdict">{verdict}</td>'
                      f'<td class="num" data-label="duration (s)">{fmt(rec.duration_s or 0.0)}</td></tr>')
    figs = []
    for name, vals in values.items():
        try:
            figs.append(figure_block(_check_figure(name, vals, grid_of, grid), name))
        except Exception as e:  # noqa: BLE001 - reported in the page
            figs.append(figure_block(None, name, f"{type(e).__name__}: {e}"))
    n_ok = sum(1 for r in recs if r.passed)
    body = f"""<h1>homflow sweep <code>{html.escape(sweep)}</code></h1>
<p class="banner {'pass' if n_ok == len(recs) else 'fail'}">{n_ok} of {len(recs)} runs passed every check.</p>
<h2>Grid</h2>{kv_table({k: json.dumps(v) for k, v in grid.items()})}
<h2>Runs</h2><div class="scroll"><table class="checks rows"><tr class="head"><th>#</th><th>run</th>
{''.join(f'<th>{html.escape(k)}</th>' for k in keys)}
<th>status</th><th>checks passed</th><th>verdict</th><th>duration (s)</th></tr>{''.join(rows)}</table></div>
<h2>Check values across the sweep</h2><div class="figs">{''.join(figs)}</div>"""
    atomic_write_text(path, page(f"homflow sweep {sweep}", body))
    return path
