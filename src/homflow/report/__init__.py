"""Reports: Display objects for figures (compute, then ``.plot(ax=...)``) and self-contained HTML reports.

The only part of homflow that imports matplotlib (lazily, inside the functions that draw). It imports the records
(``homflow._records``) and the store, never the experiments, the runner or the sweeps.
"""

from ._display import (
    LOG_SPAN,
    AlignmentDisplay,
    FigureSpecDisplay,
    KKTResidualDisplay,
    LossNormDisplay,
    MarginDisplay,
    SaddleDisplay,
    SparsityDisplay,
    TrajectoryErrorDisplay,
    display_for,
    set_log_scale,
    wants_log,
)
from ._html import render_figures, run_displays, write_run_report
from ._page import checks_table, figure_png, residual
from ._sweep import grid_values, relative_link, write_sweep_report

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
    "wants_log",
    "set_log_scale",
    "LOG_SPAN",
    "figure_png",
    "render_figures",
    "run_displays",
    "write_run_report",
    "write_sweep_report",
    "grid_values",
    "relative_link",
    "checks_table",
    "residual",
]
