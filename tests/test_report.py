"""Reports: Display objects draw what they computed; the HTML report holds the checks table and its figures as
embedded PNG images."""

import base64
import re
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure as MplFigure  # noqa: E402

from homflow.experiments import Figure, check  # noqa: E402
from homflow.report import (  # noqa: E402
    AlignmentDisplay,
    FigureSpecDisplay,
    KKTResidualDisplay,
    LossNormDisplay,
    MarginDisplay,
    SaddleDisplay,
    SparsityDisplay,
    TrajectoryErrorDisplay,
    display_for,
    write_run_report,
)
from homflow.store import RunStore  # noqa: E402


def _ax():
    return MplFigure().add_subplot(1, 1, 1)


def test_displays_return_self_and_draw_their_data():
    t = np.concatenate([[0.0], np.geomspace(1e-3, 1e2, 20)])
    loss, norm = np.exp(-t / 10), 1e-3 * (1 + t)
    ax = _ax()
    d = LossNormDisplay(t, loss, norm).plot(ax=ax)
    assert d.ax_ is ax and d.figure_ is ax.figure
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xdata(), t[1:])  # t = 0 dropped on the log axis
    np.testing.assert_allclose(line.get_ydata(), loss[1:])
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log" and d.ax_norm_.get_yscale() == "log"
    with pytest.raises(ValueError, match="same shape"):
        LossNormDisplay(t, loss[:-1], norm)
    # the loss far below 1e-300 is drawn from log L
    d = LossNormDisplay(t, np.zeros_like(t), norm, log_loss=-10.0 * np.ones_like(t)).plot(ax=_ax())
    np.testing.assert_allclose(d.ax_.get_lines()[0].get_ydata(), np.exp(-10.0))

    ax = _ax()
    AlignmentDisplay(t, {"a": np.ones_like(t), "b": np.zeros_like(t)}).plot(ax=ax)
    assert len([ln for ln in ax.get_lines() if ln.get_label() in ("a", "b")]) == 2
    ax = _ax()
    MarginDisplay(t, t / (1 + t), t / (2 + t), target=1.0).plot(ax=ax)
    assert len(ax.get_lines()) == 3
    ax = _ax()
    TrajectoryErrorDisplay(t, {"err": 1e-13 * np.ones_like(t)}, tolerance=1e-11).plot(ax=ax)
    assert ax.get_yscale() == "log"
    ax = _ax()
    SaddleDisplay(t, loss, saddle=(1.0, 10.0), escape=0.5).plot(ax=ax)
    assert len(ax.patches) == 1  # the shaded plateau
    sp = SparsityDisplay([1.0, 1e-9, 0.5], threshold=1e-4).plot(ax=_ax())
    assert sp.n_active == 2 and len(sp.ax_.patches) == 3
    k = KKTResidualDisplay(["stationarity", "feasibility"], [1e-12, 1e-3], [1e-9, 1e-9]).plot(ax=_ax())
    colors = [tuple(p.get_facecolor()) for p in k.ax_.patches]
    assert colors[0] != colors[1]  # pass and fail bars differ


def test_generic_figure_spec_and_dispatch():
    arrays = {"x": np.arange(5.0), "y": np.arange(5.0) ** 2, "Y2": np.ones((5, 2)), "short": np.ones(3)}
    spec = Figure("f", "title", "x", ("y", "Y2"), ("y", "ones"))
    d = FigureSpecDisplay(spec, arrays).plot(ax=_ax())
    assert len(d.ax_.get_lines()) == 3  # a 2-D y gives one line per column
    with pytest.raises(ValueError, match="short"):
        FigureSpecDisplay(Figure("g", "t", "x", ("short",)), arrays)
    with pytest.raises(ValueError, match="missing|not stored"):
        FigureSpecDisplay(Figure("g", "t", "x", ("nope",)), arrays)
    assert isinstance(display_for(Figure("l", "t", "x", ("y", "y"), display="loss_norm"), arrays), LossNormDisplay)
    assert isinstance(display_for(spec, arrays), FigureSpecDisplay)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.rows, self._row, self._in_td, self.tables = [], [], None, False, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "table" and "checks" in (a.get("class") or "").split():
            self.tables += 1
        if tag == "tr":
            self._row = []
        if tag in ("td", "th"):
            self._in_td = True
            if self._row is not None:
                self._row.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_td = False
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._in_td and self._row:
            self._row[-1] += data


def test_html_report_holds_checks_table_and_images(tmp_path):
    store = RunStore(tmp_path)
    run = store.create("flow", name="r")
    run.write_text("config.toml", 'experiment = "flow"\n')
    t = np.linspace(0.0, 10.0, 11)
    run.save_arrays({"t": t, "loss": np.exp(-t), "norm": 1 + t})
    checks = [check("loss small", 1e-5, 1e-3).to_dict(), check("margin", 0.2, 0.5, ">=").to_dict()]
    run.write_json("checks.json", checks)
    figs = [Figure("loss_norm", "loss and norm", "t", ("loss", "norm"), display="loss_norm"),
            Figure("bad", "a figure naming a missing array", "t", ("nope",))]
    import dataclasses

    run.write_json("summary.json", {"summary": {"x": 1.0}, "figures": [dataclasses.asdict(f) for f in figs]})
    path = write_run_report(run)
    page = path.read_text()
    p = _Collect()
    p.feed(page)
    assert p.tables == 1
    rows = [r for r in p.rows if r and r[0] in ("loss small", "margin")]
    assert [r[0] for r in rows] == ["loss small", "margin"]
    verdicts = [r[5].strip() for r in rows]
    assert verdicts == ["PASS", "FAIL"]
    assert rows[0][4].strip() == "0.01 x tol"  # value / tolerance
    assert len(p.imgs) == 1 and p.imgs[0].startswith("data:image/png;base64,")
    png = base64.b64decode(p.imgs[0].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run.path / "figures" / "loss_norm.png").read_bytes() == png
    assert "could not be drawn" in page  # the broken figure is reported, not fatal
    assert re.search(r"1 of 2 checks passed", page)
    assert "src=\"http" not in page and "<script" not in page  # self-contained


# -- issue 13: honest figures, meaningful residuals, relative sweep links --------------------------------------------


def test_value_vs_tolerance_column_is_meaningful_for_every_sign():
    from homflow.report import residual

    # a negative value of a '<=' check passes by a margin: a ratio (-3.44e6) would mean nothing
    assert residual(check("excess", -3.44e-4, 1e-10).to_dict()) == "tol - 0.000344"
    assert residual(check("lam_min", -0.0344, 0.0).to_dict()) == "tol - 0.0344"
    assert residual(check("err", 2e-13, 1e-11).to_dict()) == "0.02 x tol"
    assert residual(check("cos", 0.999, 0.99, ">=").to_dict()) == "1.01 x tol"
    assert residual(check("reached", 1.0, 1.0, ">=").to_dict()) == "1 x tol"
    assert residual({"value": "nan", "tolerance": 1.0}) == "-"
    for v, tol in ((-5.0, 1e-10), (-1.0, 0.0), (3.0, -1.0), (0.0, 0.0)):
        cell = residual(check("c", v, tol).to_dict())
        assert "e+" not in cell  # never a huge meaningless ratio


def test_exact_zeros_are_drawn_as_zeros_not_at_a_floor():
    # an error that is exactly 0 before the first step, then ~1e-9: the axis must not reach down to 1e-300
    t = np.concatenate([[0.0], np.geomspace(1e-3, 1e8, 30)])
    err = np.where(t < 1.0, 0.0, 1e-9 * (1 + np.log1p(t)))
    d = TrajectoryErrorDisplay(t, {"relative error": err}, tolerance=1e-6).plot(ax=_ax())
    lo, hi = d.ax_.get_ylim()
    assert lo == 0.0 and d.ax_.get_yscale() == "symlog"
    assert hi < 1e-3  # the axis spans the data and the tolerance, not 1e6
    ydata = d.ax_.get_lines()[0].get_ydata()
    assert np.sum(ydata == 0.0) == np.sum((t > 0) & (t < 1.0))  # zeros are plotted at 0
    # a KKT residual of 0 is a bar of height 0 labelled "0", not a bar up to some floor
    k = KKTResidualDisplay(["stationarity", "feasibility", "slackness"], [0.17, 0.0, 0.011]).plot(ax=_ax())
    heights = [p.get_height() for p in k.ax_.patches]
    assert heights[1] == 0.0 and k.ax_.get_ylim()[0] == 0.0
    assert "0" in [a.get_text() for a in k.ax_.texts]
    # all zeros: a linear axis with the zeros on it
    d = TrajectoryErrorDisplay(t, {"e": np.zeros_like(t)}).plot(ax=_ax())
    assert d.ax_.get_yscale() == "linear"


def test_log_axes_where_the_data_span_decades():
    from homflow.report import wants_log

    assert wants_log([1e-3, 1e-2, 1e-1]) and not wants_log([10, 20, 50, 100]) and not wants_log([-1e-3, 1.0])
    arrays = {"scale": np.array([1e-3, 1e-2, 1e-1]), "err": np.array([1e-12, 1e-9, 1e-6]),
              "lin": np.array([1.0, 2.0, 3.0])}
    d = FigureSpecDisplay(Figure("f", "t", "scale", ("err",)), arrays).plot(ax=_ax())
    assert d.ax_.get_xscale() == "log" and d.ax_.get_yscale() == "log"
    d = FigureSpecDisplay(Figure("f", "t", "lin", ("lin",)), arrays).plot(ax=_ax())
    assert d.ax_.get_xscale() == "linear" and d.ax_.get_yscale() == "linear"
    d = FigureSpecDisplay(Figure("f", "t", "scale", ("err",), logx=False, logy=False), arrays).plot(ax=_ax())
    assert d.ax_.get_xscale() == "linear"  # an explicit choice is kept


def test_figures_fit_their_canvas_and_their_slot():
    """Every text of a report figure (tick labels, the twin axis's label, legends) lies inside the PNG, and the page
    shows each image at the width of its slot (no fixed pixel width narrower than the image)."""
    from matplotlib.figure import Figure as MplFigure

    from homflow.report._page import CSS, FIGURE_DPI, FIGURE_SIZE

    t = np.concatenate([[0.0], np.geomspace(1e-3, 1e8, 40)])
    displays = [LossNormDisplay(t, np.exp(-np.log1p(t)) * 20, 1e-3 * (1 + t)),
                KKTResidualDisplay(["stationarity", "feasibility", "complementary slackness"], [0.17, 0.0, 0.011]),
                MarginDisplay(t[1:], 0.007 - 1 / (1e3 + t[1:]), 0.0065 - 1 / (1e3 + t[1:]), target=0.0071)]
    for disp in displays:
        fig = MplFigure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI, layout="constrained")
        disp.plot(ax=fig.add_subplot(1, 1, 1))
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        r = canvas.get_renderer()
        W, H = fig.bbox.width, fig.bbox.height
        for ax in fig.axes:  # the twin axis of LossNormDisplay included
            bb = ax.get_tightbbox(r)  # everything drawn: tick labels, axis labels, title, legend
            assert bb.x0 >= -1 and bb.y0 >= -1 and bb.x1 <= W + 1 and bb.y1 <= H + 1, (type(disp).__name__, bb)
    assert re.search(r"\.figs img \{[^}]*width: 100%", CSS) and "height: auto" in CSS
    assert not re.search(r"figure \{[^}]*width: \d+px", CSS)  # no fixed slot narrower than the image


def test_sweep_report_links_are_relative(tmp_path):
    from homflow.report import relative_link, write_sweep_report

    store = RunStore(tmp_path / "store")
    for scale in (1e-3, 1e-2, 1e-1):
        run = store.create("flow", name=f"s{scale:g}", sweep="sw")
        run.write_text("config.toml", f'experiment = "flow"\n[init]\nscale = {scale!r}\n')
        run.write_json("checks.json", [check("err", scale**2, 1.0).to_dict()])
        run.write_text("report.html", "<html></html>")
        store.finish(run.id, status="completed", checks=[check("err", scale**2, 1.0).to_dict()], duration_s=1.0)
    path = write_sweep_report(store, "sw", {"init.scale": [1e-3, 1e-2, 1e-1]})
    hrefs = re.findall(r'href="([^"]+)"', path.read_text())
    assert len(hrefs) == 3
    for h in hrefs:
        assert not h.startswith(("file:", "/")), h
        assert (path.parent / h).resolve().is_file()  # relative to the sweep report, resolves to the run's report
    assert relative_link(tmp_path / "a b" / "r.html", tmp_path / "c") == "../a%20b/r.html"


def test_sweep_plot_uses_a_log_axis_for_a_grid_over_decades():
    from homflow.report._sweep import plot_check

    grid = {"init.scale": [1e-3, 1e-2, 1e-1], "init.seed": [0, 1]}
    grid_of = {i: {"init.scale": s, "init.seed": k} for i, (s, k) in
               enumerate((s, k) for s in grid["init.scale"] for k in grid["init.seed"])}
    vals = {i: g["init.scale"] ** 2 for i, g in grid_of.items()}
    ax = plot_check(_ax(), "err", vals, grid_of, grid)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log" and len(ax.get_lines()) == 2  # one line per seed
    grid = {"model.width": [10, 20, 30]}
    grid_of = {i: {"model.width": w} for i, w in enumerate(grid["model.width"])}
    ax = plot_check(_ax(), "err", {0: 1.0, 1: 2.0, 2: 3.0}, grid_of, grid)
    assert ax.get_xscale() == "linear" and ax.get_yscale() == "linear"
