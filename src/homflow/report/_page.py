"""The pieces every HTML report shares: the style sheet, figures as PNG images sized to their slots, tables.

Sizing: a figure is drawn at ``FIGURE_SIZE`` inches and ``FIGURE_DPI`` dots per inch (640 x 400 px) with
matplotlib's constrained layout (tick labels, a twin axis's label and legends stay inside the canvas), and shown at
``width: 100%`` of its slot in a grid whose columns are at most as wide as the page: the browser scales the whole
image, so nothing is cut whatever the width of the window.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Any

import numpy as np

__all__ = ["CSS", "FIGURE_DPI", "FIGURE_SIZE", "figure_png", "img_tag", "figure_block", "kv_table", "fmt",
           "residual", "checks_table", "page"]

FIGURE_SIZE = (6.4, 4.0)
"""Size of a report figure in inches."""
FIGURE_DPI = 100
"""Resolution of a report figure: ``FIGURE_SIZE * FIGURE_DPI`` = 640 x 400 px, shown scaled to its slot."""

CSS = """
* { box-sizing: border-box; }
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 1em auto; padding: 0 1em;
       max-width: 1400px; color: #222; overflow-wrap: break-word; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
code, table.kv td { overflow-wrap: anywhere; }
.scroll { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-family: monospace; white-space: nowrap; }
tr.pass td.verdict { color: #0a7d2c; font-weight: bold; } tr.fail td.verdict { color: #b00020; font-weight: bold; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; white-space: pre-wrap;
      overflow-wrap: anywhere; }
.figs { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 440px), 1fr)); gap: 1em; }
.figs figure { margin: 0; min-width: 0; }
.figs img { display: block; width: 100%; height: auto; }
figcaption { font-size: .85em; color: #555; } .banner { padding: .5em 1em; border-radius: 4px; }
.banner.pass { background: #e3f6e8; } .banner.fail { background: #fde7ea; }
@media (max-width: 700px) {
  table.rows tr.head { display: none; }
  table.rows, table.rows tbody, table.rows tr, table.rows td { display: block; width: 100%; }
  table.rows tr { border: 1px solid #ccc; margin-bottom: .6em; }
  table.rows td { border: none; padding: .1em .5em; }
  table.rows td.num { text-align: left; white-space: normal; }
  table.rows td[data-label]::before { content: attr(data-label) ": "; color: #666; font-family: sans-serif; }
}
"""


def figure_png(display, *, dpi: int = FIGURE_DPI, size=FIGURE_SIZE) -> bytes:
    """Draw a Display on a fresh (pyplot-free) matplotlib figure with constrained layout; return its PNG bytes."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=size, dpi=dpi, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    display.plot(ax=ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` holding ``png`` as a data URI, with its intrinsic size (the CSS scales it to its slot)."""
    w, h = png_size(png)
    return (f'<img alt="{html.escape(alt)}" width="{w}" height="{h}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"/>')


def png_size(png: bytes) -> tuple[int, int]:
    """Width and height in pixels from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("`png` is not a PNG image.")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def figure_block(png: bytes | None, caption: str, error: str | None = None) -> str:
    """One slot of the figure grid: the image and its caption, or the reason it could not be drawn."""
    if png is None:
        return (f"<figure><figcaption>{html.escape(caption)}: could not be drawn ({html.escape(error or '')})"
                "</figcaption></figure>")
    return f"<figure>{img_tag(png, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def fmt(v: Any) -> str:
    """A value for a table cell: floats with 6 significant digits, numeric strings likewise, the rest as text."""
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


def residual(c: dict) -> str:
    """Where a check's value stands against its tolerance, in words that hold for every sign.

    ``value / tolerance`` ("0.01 x tol") when the tolerance is positive and the value not negative (a '<=' check
    passes below 1, a '>=' check above 1); otherwise the difference ("tol - 0.000344": the value lies 0.000344
    below the tolerance), since a ratio with a negative value or a zero tolerance means nothing.

    >>> residual({"value": 2e-13, "tolerance": 1e-11, "relation": "<="})
    '0.02 x tol'
    >>> residual({"value": -3.44e-4, "tolerance": 1e-10, "relation": "<="})
    'tol - 0.000344'
    """
    try:
        v, tol = float(c["value"]), float(c["tolerance"])
    except (TypeError, ValueError, KeyError):
        return "-"
    if not (math.isfinite(v) and math.isfinite(tol)):
        return "-"
    if tol > 0 and v >= 0:
        return f"{v / tol:.3g} x tol"
    d = v - tol
    if d == 0:
        return "= tol"
    return f"tol {'+' if d > 0 else '-'} {abs(d):.3g}"


def checks_table(checks: list[dict]) -> str:
    """The checks as an HTML table: name, value, relation, tolerance, value against tolerance, verdict, description."""
    rows = []
    for c in checks:
        cls = "pass" if c["passed"] else "fail"
        desc = str(c.get("description", ""))
        rows.append(
            f'<tr class="{cls}"><td class="name">{html.escape(str(c["name"]))}</td>'
            f'<td class="num" data-label="value">{fmt(c["value"])}</td>'
            f'<td data-label="passes when">{html.escape(c.get("relation", "<="))}</td>'
            f'<td class="num" data-label="tolerance">{fmt(c["tolerance"])}</td>'
            f'<td class="num" data-label="value vs tolerance">{html.escape(residual(c))}</td>'
            f'<td class="verdict">{"PASS" if c["passed"] else "FAIL"}</td>'
            f'<td{" data-label=" + chr(34) + "description" + chr(34) if desc else ""}>{html.escape(desc)}</td></tr>')
    return ('<div class="scroll"><table class="checks rows"><tr class="head"><th>check</th><th>value</th><th></th>'
            '<th>tolerance</th><th>value vs tolerance</th><th>verdict</th><th>description</th></tr>' + "".join(rows)
            + "</table></div>")


def kv_table(d: dict) -> str:
    """A two-column table of a mapping (nested mappings and lists as JSON)."""
    rows = []
    for k, v in d.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        rows.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(fmt(v))}</td></tr>")
    return '<div class="scroll"><table class="kv">' + "".join(rows) + "</table></div>"


def page(title: str, body: str) -> str:
    """A complete self-contained HTML page (no script, no external resource)."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n{body}\n</body></html>")
