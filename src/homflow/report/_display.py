"""Display objects (scikit-learn style): compute once at construction, then ``.plot(ax=...)`` draws and returns self.

The caller owns the figure: pass ``ax`` to draw into an existing axes; without it a new pyplot figure is made.
After ``plot``, ``.ax_`` and ``.figure_`` hold what was drawn on. This is the only place homflow imports matplotlib.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

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
]


def _new_axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(6.4, 4.0))
    return ax


def _positive_x(t, *ys, logx=True):
    """Drop points with ``t <= 0`` on a log x-axis (the flow starts at t = 0)."""
    t = np.asarray(t, float)
    keep = t > 0 if logx else np.ones_like(t, bool)
    return (t[keep],) + tuple(np.asarray(y)[keep] for y in ys)


LOG_SPAN = 30.0
"""Ratio ``max / min`` of the positive values at or above which an automatic axis is logarithmic (1.5 decades: a grid
1e-3, 1e-2, 1e-1 is drawn on a log axis, widths 10 .. 100 on a linear one)."""


def wants_log(values, *, span: float = LOG_SPAN) -> bool:
    """Whether an axis over ``values`` should be logarithmic: no negative value, not an evenly spaced grid, and the
    positive values span at least ``span`` (max / min). Non-finite values are ignored; exact zeros are allowed (they
    are drawn as zeros, see :func:`set_log_scale`).

    >>> wants_log([1e-3, 1e-2, 1e-1]), wants_log([10, 20, 50, 100]), wants_log([0.0, 1e-9, 1e-3])
    (True, False, True)
    >>> wants_log([0.0, 50.0, 100.0, 150.0])  # evenly spaced times
    False
    """
    v = np.asarray(values, float).ravel()
    v = v[np.isfinite(v)]
    pos = v[v > 0]
    if pos.size < 2 or np.any(v < 0):
        return False
    if v.size >= 3:  # an evenly spaced grid (0, 2, 4, ... 150) is meant to be read on a linear axis
        d = np.diff(np.sort(v))
        if np.all(d > 0) and d.max() <= 1.05 * d.min():
            return False
    return bool(pos.max() / pos.min() >= span)


def set_log_scale(ax, values, axis: str = "y", *, linscale: float = 1.0) -> str:
    """Put a log scale on ``axis`` ('x' or 'y') of ``ax`` for ``values`` that may hold exact zeros; returns the scale.

    Without zeros: 'log'. With exact zeros: 'symlog' whose linear part ends at the smallest positive value, so a zero
    is drawn at 0 with a '0' tick (never at a floor such as 1e-300, which stretches the axis over 300 decades) and a
    bar of height 0 has no height. Only zeros (no positive value): 'linear'.
    """
    v = np.asarray(values, float).ravel()
    v = np.abs(v[np.isfinite(v)])
    pos = v[v > 0]
    setter = ax.set_xscale if axis == "x" else ax.set_yscale
    if pos.size == 0:
        setter("linear")
        return "linear"
    if np.any(v == 0):
        setter("symlog", linthresh=float(pos.min()), linscale=linscale)
        (ax.set_xlim if axis == "x" else ax.set_ylim)(0.0, None)  # the margins would reach below 0
        return "symlog"
    setter("log")
    return "log"


def _resolve(flag, values) -> bool:
    """An axis flag of a figure spec: ``None`` means automatic (:func:`wants_log`)."""
    return wants_log(values) if flag is None else bool(flag)


class _Display:
    ax_ = None
    figure_ = None

    def _start(self, ax):
        ax = _new_axes(ax)
        self.ax_, self.figure_ = ax, ax.figure
        return ax


class LossNormDisplay(_Display):
    """Loss and parameter norm along a trajectory, both on log axes against log time (norm on a twin axis).

    Arguments:
        t, loss, norm: arrays of the same length (``t`` may start at 0: it is dropped on the log axis).
        log_loss: optional ``log L`` used where ``L`` underflowed to 0.
    """

    def __init__(self, t, loss, norm, *, log_loss=None, title: str = "loss and norm"):
        self.t = np.asarray(t, float)
        loss = np.asarray(loss, float)
        if log_loss is not None:
            loss = np.where(loss > 0, loss, np.exp(np.maximum(np.asarray(log_loss), -700)))
        self.loss, self.norm, self.title = loss, np.asarray(norm, float), title
        if not (self.t.shape == self.loss.shape == self.norm.shape):
            raise ValueError(f"`t`, `loss`, `norm` must have the same shape; got {self.t.shape}, {self.loss.shape}, "
                             f"{self.norm.shape}.")

    @classmethod
    def from_trajectory(cls, traj, **kw) -> "LossNormDisplay":
        return cls(traj.ts, traj.loss, traj.norm, log_loss=traj.log_loss, **kw)

    def plot(self, ax=None) -> "LossNormDisplay":
        ax = self._start(ax)
        t, loss, norm = _positive_x(self.t, self.loss, self.norm)
        pos = loss > 0
        ax.loglog(t[pos], loss[pos], color="C0", label="loss")
        ax.set_xlabel("t")
        ax.set_ylabel("loss", color="C0")
        ax2 = ax.twinx()
        ax2.loglog(t, norm, color="C1", label="||theta||")
        ax2.set_ylabel("||theta||", color="C1")
        ax.set_title(self.title)
        self.ax_norm_ = ax2
        return self


class AlignmentDisplay(_Display):
    """Direction alignment: cosines ``cos(theta(t), reference)`` against log time, in [-1, 1], with 1 marked."""

    def __init__(self, t, cosines: Mapping[str, Sequence[float]], *, title: str = "direction alignment",
                 logx: bool | None = True):
        self.t = np.asarray(t, float)
        self.cosines = {k: np.asarray(v, float) for k, v in cosines.items()}
        self.title, self.logx = title, _resolve(logx, self.t)

    @classmethod
    def from_trajectory(cls, traj, reference=None, **kw) -> "AlignmentDisplay":
        th = np.asarray(traj.thetas)
        d = th / np.maximum(np.linalg.norm(th, axis=1, keepdims=True), 1e-300)
        ref = d[-1] if reference is None else np.asarray(reference) / np.linalg.norm(reference)
        return cls(traj.ts, {"cos(theta(t), reference)": d @ ref}, **kw)

    def plot(self, ax=None) -> "AlignmentDisplay":
        ax = self._start(ax)
        for label, c in self.cosines.items():
            t, c = _positive_x(self.t, c, logx=self.logx)
            ax.plot(t, c, label=label)
        if self.logx:
            ax.set_xscale("log")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_ylim(min(-0.05, min((float(np.min(c)) for c in self.cosines.values()), default=0) - 0.05), 1.05)
        ax.set_xlabel("t")
        ax.set_ylabel("cosine")
        ax.set_title(self.title)
        ax.legend(fontsize=8)
        return self


class MarginDisplay(_Display):
    """Normalized margin ``q_min / ||theta||^L`` and smoothed margin ``log(1/L) / ||theta||^L`` (Lyu & Li,
    arXiv 1906.05890) against log time; optional horizontal line at the max-margin KKT value."""

    def __init__(self, t, normalized, smoothed=None, *, target: float | None = None, title: str = "margins"):
        self.t = np.asarray(t, float)
        self.normalized = np.asarray(normalized, float)
        self.smoothed = None if smoothed is None else np.asarray(smoothed, float)
        self.target, self.title = target, title

    def plot(self, ax=None) -> "MarginDisplay":
        ax = self._start(ax)
        t, q = _positive_x(self.t, self.normalized)
        ax.semilogx(t, q, label="normalized margin")
        if self.smoothed is not None:
            t, s = _positive_x(self.t, self.smoothed)
            ax.semilogx(t, s, label="smoothed margin")
        if self.target is not None:
            ax.axhline(self.target, color="k", ls="--", lw=0.8, label="KKT point")
        ax.set_xlabel("t")
        ax.set_ylabel("margin")
        ax.set_title(self.title)
        ax.legend(fontsize=8)
        return self


class TrajectoryErrorDisplay(_Display):
    """Errors along trajectories (e.g. ``||eta(t) - T theta(t)||``, drift of a conserved quantity), log scale, with
    an optional tolerance line."""

    def __init__(self, t, errors: Mapping[str, Sequence[float]], *, tolerance: float | None = None,
                 title: str = "trajectory errors", logx: bool | None = True, xlabel: str = "t",
                 ylabel: str = "error"):
        self.t = np.asarray(t, float)
        self.errors = {k: np.asarray(v, float) for k, v in errors.items()}
        self.tolerance, self.title, self.xlabel, self.ylabel = tolerance, title, xlabel, ylabel
        self.logx = _resolve(logx, self.t)

    def plot(self, ax=None) -> "TrajectoryErrorDisplay":
        """Draw ``|error|`` on a log axis; exact zeros (e.g. before the first step) are drawn at 0 (symlog axis)."""
        ax = self._start(ax)
        drawn = []
        for label, e in self.errors.items():
            t, e = _positive_x(self.t, e, logx=self.logx)
            cols = np.abs(e.reshape(e.shape[0], -1))
            drawn.append(cols)
            for k in range(cols.shape[1]):
                ax.plot(t, cols[:, k], label=label if cols.shape[1] == 1 else f"{label} {k}")
        if self.logx:
            ax.set_xscale("log")
        if self.tolerance is not None:
            ax.axhline(self.tolerance, color="r", ls="--", lw=0.8, label="tolerance")
        set_log_scale(ax, np.concatenate([c.ravel() for c in drawn] + [np.ravel(self.tolerance or [])]))
        ax.set_xlabel(self.xlabel)
        ax.set_ylabel(self.ylabel)
        ax.set_title(self.title)
        ax.legend(fontsize=8)
        return self


class SaddleDisplay(_Display):
    """The loss along the flow with the saddle plateau ``[t_enter, t_leave]`` shaded and the escape time marked."""

    def __init__(self, t, loss, *, saddle: tuple[float, float] | None = None, escape: float | None = None,
                 title: str = "escape and first saddle"):
        self.t, self.loss = np.asarray(t, float), np.asarray(loss, float)
        self.saddle, self.escape, self.title = saddle, escape, title

    def plot(self, ax=None) -> "SaddleDisplay":
        ax = self._start(ax)
        t, loss = _positive_x(self.t, self.loss)
        ax.plot(t, loss, label="loss")
        ax.set_xscale("log")
        set_log_scale(ax, loss)
        if self.saddle is not None:
            ax.axvspan(self.saddle[0], self.saddle[1], color="C2", alpha=0.2, label="saddle plateau")
        if self.escape is not None:
            ax.axvline(self.escape, color="C3", ls="--", lw=0.8, label="escape")
        ax.set_xlabel("t")
        ax.set_ylabel("loss")
        ax.set_title(self.title)
        ax.legend(fontsize=8)
        return self


class SparsityDisplay(_Display):
    """Per-neuron norms (bars, log scale) with the threshold below which a neuron counts as zero."""

    def __init__(self, norms, *, threshold: float | None = None, title: str = "neuron norms (sparsity)"):
        self.norms = np.asarray(norms, float)
        self.threshold, self.title = threshold, title

    @property
    def n_active(self) -> int | None:
        return None if self.threshold is None else int(np.sum(self.norms > self.threshold))

    def plot(self, ax=None) -> "SparsityDisplay":
        ax = self._start(ax)
        ax.bar(np.arange(self.norms.size), self.norms, color="C0")
        set_log_scale(ax, np.append(self.norms, self.threshold if self.threshold is not None else []))
        if self.threshold is not None:
            ax.axhline(self.threshold, color="r", ls="--", lw=0.8, label=f"threshold ({self.n_active} active)")
            ax.legend(fontsize=8)
        ax.set_xlabel("neuron")
        ax.set_ylabel("norm")
        ax.set_title(self.title)
        return self


class KKTResidualDisplay(_Display):
    """KKT residuals (stationarity, feasibility, complementary slackness, ...) as log-scale bars with tolerances."""

    def __init__(self, names: Sequence[str], values: Sequence[float], tolerances: Sequence[float] | None = None,
                 *, title: str = "KKT residuals"):
        self.names = [str(n) for n in names]
        self.values = np.asarray(values, float)
        self.tolerances = None if tolerances is None else np.asarray(tolerances, float)
        if len(self.names) != self.values.size:
            raise ValueError(f"`names` and `values` must have the same length; got {len(self.names)} and "
                             f"{self.values.size}.")
        self.title = title

    def plot(self, ax=None) -> "KKTResidualDisplay":
        ax = self._start(ax)
        x = np.arange(self.values.size)
        ok = None if self.tolerances is None else self.values <= self.tolerances
        colors = ["C0" if ok is None else ("C2" if o else "C3") for o in (ok if ok is not None else [None] * x.size)]
        vals = np.abs(self.values)
        ax.bar(x, vals, color=colors)  # an exact zero is a bar of height 0 at 0 (symlog axis), labelled "0"
        for xi, v in zip(x, self.values):
            ax.annotate("0" if v == 0 else f"{v:.2g}", (xi, abs(v)), ha="center", va="bottom", fontsize=8)
        if self.tolerances is not None:
            ax.scatter(x, self.tolerances, marker="_", s=400, color="k", label="tolerance", zorder=3)
            ax.legend(fontsize=8)
        scale = set_log_scale(ax, np.concatenate([vals, np.ravel(self.tolerances if self.tolerances is not None
                                                                  else [])]))
        if scale != "linear":  # room above the tallest bar for its label
            top = float(np.nanmax(np.concatenate([vals, np.ravel(self.tolerances if self.tolerances is not None
                                                                  else [])])))
            ax.set_ylim(top=top * 10)
        ax.set_xticks(x)
        ax.set_xticklabels(self.names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("residual")
        ax.set_title(self.title)
        return self


class FigureSpecDisplay(_Display):
    """The generic renderer of an experiment's :class:`homflow.experiments.Figure` spec over its arrays."""

    def __init__(self, spec, arrays: Mapping[str, np.ndarray]):
        self.spec = spec
        missing = [k for k in (spec.x, *spec.ys) if k not in arrays]
        if missing:
            raise ValueError(f"figure {spec.name!r} names arrays {missing} that are not stored.")
        self.x = np.asarray(arrays[spec.x], float)
        self.ys = []
        for k in spec.ys:
            y = np.asarray(arrays[k], float)
            if y.shape[0] != self.x.shape[0]:
                raise ValueError(f"figure {spec.name!r}: array {k!r} has {y.shape[0]} rows but x {spec.x!r} has "
                                 f"{self.x.shape[0]}.")
            self.ys.append(y)

    @property
    def logx(self) -> bool:
        """The x axis is logarithmic: the spec's ``logx``, or, when it is ``None``, :func:`wants_log` of the x data
        (except for bars, whose x are positions)."""
        s = self.spec
        return bool(s.logx) if s.logx is not None or s.kind == "bar" else wants_log(self.x)

    @property
    def logy(self) -> bool:
        """The y axis is logarithmic: the spec's ``logy``, or, when it is ``None``, :func:`wants_log` of the y data."""
        s = self.spec
        return bool(s.logy) if s.logy is not None else wants_log(np.concatenate([y.ravel() for y in self.ys]))

    def plot(self, ax=None) -> "FigureSpecDisplay":
        """Draw the spec; on a log y axis exact zeros are drawn at 0 (symlog) and negative values are left out."""
        ax = self._start(ax)
        s = self.spec
        logx, logy = self.logx, self.logy
        labels = list(s.labels) + [None] * (len(s.ys) + 8)
        li = 0
        width = 0.8 / max(len(self.ys), 1)
        drawn = []
        for j, y in enumerate(self.ys):
            cols = y.reshape(y.shape[0], -1).T
            for c in cols:
                x = self.x
                if logx:
                    keep = x > 0
                    x, c = x[keep], c[keep]
                if logy:
                    c = np.where(c >= 0, c, np.nan)
                drawn.append(c)
                lab = labels[li] if li < len(s.labels) else (s.ys[j] if len(cols) == 1 else None)
                li += 1
                if s.kind == "scatter":
                    ax.scatter(x, c, s=12, label=lab)
                elif s.kind == "bar":
                    ax.bar(x + j * width, c, width=width, label=lab)
                else:
                    ax.plot(x, c, label=lab)
        for h in s.hlines:
            ax.axhline(h, color="gray", ls="--", lw=0.8)
        if logx:
            ax.set_xscale("log")
        if logy:
            set_log_scale(ax, np.concatenate([c.ravel() for c in drawn] + [np.asarray(s.hlines, float)]))
        ax.set_xlabel(s.xlabel or s.x)
        ax.set_ylabel(s.ylabel)
        ax.set_title(s.title)
        if any(lab for lab in labels[:li]) or len(self.ys) > 1:
            ax.legend(fontsize=8)
        return self


def display_for(spec, arrays: Mapping[str, np.ndarray]):
    """The Display for a figure spec: its dedicated one when ``spec.display`` names one, the generic one otherwise."""
    a = {k: np.asarray(v) for k, v in arrays.items()}
    generic = FigureSpecDisplay(spec, a)  # validates names and lengths
    kind = getattr(spec, "display", "") or ""
    x, ys = a[spec.x], [a[k] for k in spec.ys]
    labels = list(spec.labels) + list(spec.ys[len(spec.labels):])
    if kind == "loss_norm" and len(ys) >= 2:
        return LossNormDisplay(x, ys[0], ys[1], title=spec.title)
    if kind == "alignment":
        return AlignmentDisplay(x, dict(zip(labels, ys)), title=spec.title, logx=generic.logx)
    if kind == "margins":
        return MarginDisplay(x, ys[0], ys[1] if len(ys) > 1 else None,
                             target=spec.hlines[0] if spec.hlines else None, title=spec.title)
    if kind == "errors":
        return TrajectoryErrorDisplay(x, dict(zip(labels, ys)), tolerance=spec.hlines[0] if spec.hlines else None,
                                      title=spec.title, logx=generic.logx, xlabel=spec.xlabel or "t",
                                      ylabel=spec.ylabel or "error")
    if kind == "saddle":
        sad = (spec.hlines[0], spec.hlines[1]) if len(spec.hlines) >= 2 else None
        return SaddleDisplay(x, ys[0], saddle=sad, title=spec.title)
    if kind == "sparsity":
        return SparsityDisplay(ys[0], threshold=spec.hlines[0] if spec.hlines else None, title=spec.title)
    if kind == "kkt":  # ys[0]: residuals, ys[1] (optional): tolerances; labels: one name per residual
        vals = np.ravel(ys[0])
        names = list(spec.labels) if len(spec.labels) == vals.size else [f"{v:g}" for v in np.ravel(x)]
        return KKTResidualDisplay(names, vals, np.ravel(ys[1]) if len(ys) > 1 else None, title=spec.title)
    return generic
