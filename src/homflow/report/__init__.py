"""Reports: Display objects for figures (compute, then ``.plot(ax=...)``) and self-contained HTML reports.

The only part of homflow that imports matplotlib (lazily, inside the functions that draw).
"""

from ._display import (
    AlignmentDisplay,
    FigureSpecDisplay,
    KKTResidualDisplay,
    LossNormDisplay,
    MarginDisplay,
    SaddleDisplay,
    SparsityDisplay,
    TrajectoryErrorDisplay,
    display_for,
)
from ._html import checks_table, figure_png, render_figures, write_run_report, write_sweep_report

__all__ = [
    "LossNormDisplay",
    "AlignmentDisplay",
    "MarginDisplay",
    "TrajectoryErrorDisplay",
    "SaddleDisplay",
    "SparsityDisplay",
    "KKTResidualDisplay",
    "FigureSpecDisplay",
    "display_for",
    "figure_png",
    "render_figures",
    "write_run_report",
    "write_sweep_report",
    "checks_table",
]
