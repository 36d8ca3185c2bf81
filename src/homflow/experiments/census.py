"""``homflow reproduce census``: a census of gradient flows from many small random initialisations (arXiv 2403.08121,
2502.15952): escape times against the ``delta^-(L-2)`` law, the certified NCF KKT point each flow aligns with, the
first saddle's level and the sparsity kept until it, and where each flow ends. One row per member in ``census.csv``
in the run's directory (``pandas.read_csv`` loads it).

The problem is the canonical one (``problem = "canonical"``), a small one (``"small"``, the quick form), or any
network and data set described like the ``flow`` experiment's (``problem = "config"`` with ``[data]`` and ``[model]``
tables; ``examples/census.toml``).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ..activations import relu_power
from ..data import Dataset
from ..models import TwoLayer
from ._flowspec import DataSpec, ModelSpec
from ._registry import Figure, Outcome, check, register

_DATA = {f.name: f.default for f in dataclasses.fields(DataSpec) if not f.name.startswith("_")}
_MODEL = {f.name: f.default for f in dataclasses.fields(ModelSpec) if not f.name.startswith("_")}
_PROBLEMS = ("canonical", "small", "config")


def _specs(params):
    from ._config import spec_from_dict

    return spec_from_dict(DataSpec, params["data"], "data"), spec_from_dict(ModelSpec, params["model"], "model")


def _options(params):
    from ..census import CensusOptions, DriverOptions

    drv = DriverOptions(batch_size=params["batch_size"] or None, refill=params["refill"],
                        chunk_steps=params["chunk_steps"])
    return CensusOptions(
        n_directions=params["n_directions"], deltas=tuple(params["deltas"]), escape_factor=params["escape_factor"],
        t1=params["t_stop"], t_after=None if params["t_stop"] else params["t_after"], rtol=params["rtol"],
        seed=params["seed"], n_save=params["n_save"], cluster_cos=params["cluster_cos"],
        align_cos=params["align_cos"], slope_tol=params["slope_tol"], sparse_factor=params["sparse_factor"],
        law_rtol=params["law_rtol"], law_atol=params["law_atol"], driver=drv)


def _validate(params):
    if params["problem"] not in _PROBLEMS:
        raise ValueError(f"config key `problem`: must be one of {_PROBLEMS}; got {params['problem']!r}.")
    if params["problem"] == "config":
        _specs(params)
    if any((not isinstance(w, int)) or w < 1 for w in params["widths"]):
        raise ValueError(f"config key `widths`: must be positive integers; got {params['widths']!r}.")
    if params["batch_size"] < 0:
        raise ValueError(f"config key `batch_size`: must be >= 0 (0: chosen for the device); got "
                         f"{params['batch_size']!r}.")
    _options(params)


def _problems(params):
    """``[(width label, model, data)]`` for the census."""
    if params["problem"] == "canonical":
        from .phases import _canonical

        data, _ = _canonical()
        d, width, act = 10, 50, relu_power(2)
        make = lambda w: TwoLayer(d, w, act, key=jax.random.PRNGKey(0))  # noqa: E731
    elif params["problem"] == "small":
        rng = np.random.default_rng(0)
        X = rng.standard_normal((20, 4))
        data = Dataset(X, np.sign(X[:, 0] * X[:, 1] + 0.3))
        width = 8
        make = lambda w: TwoLayer(4, w, relu_power(2), key=jax.random.PRNGKey(1))  # noqa: E731
    else:
        from .flow import build_data, build_model

        dspec, mspec = _specs(params)
        data = build_data(dspec)
        width = mspec.width
        make = lambda w: build_model(dataclasses.replace(mspec, width=w), data.X.shape[1], scale=1.0,  # noqa: E731
                                     seed=0)
    widths = params["widths"] or [width]
    return [(w, make(w), data) for w in widths]


def _hist(values, bins):
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return np.zeros(1), np.zeros(1)
    counts, edges = np.histogram(v, bins=bins)
    return 0.5 * (edges[1:] + edges[:-1]), counts.astype(float)


@register("census", description="Census of gradient flows from many small random initialisations: escape times vs "
          "the delta^-(L-2) law, the certified NCF KKT point each aligns with (clustered, certified once, matched by "
          "cosine), first-saddle level and sparsity kept, final loss/margin; one row per member in census.csv.",
          defaults={"problem": "canonical", "data": _DATA, "model": _MODEL, "loss": "square", "widths": [0],
                    "n_directions": 64, "deltas": [1e-3, 1e-4], "escape_factor": 100.0, "t_after": 60.0, "t_stop": 0.0,
                    "rtol": 1e-8, "seed": 0, "n_save": 200, "cluster_cos": 0.99, "align_cos": 0.99,
                    "slope_tol": 1e-3, "sparse_factor": 50.0, "ncf_tol": 1e-3, "law_rtol": 0.05, "law_atol": 0.1,
                    "batch_size": 0,
                    "refill": True, "chunk_steps": 400},
          quick={"problem": "small", "n_directions": 8, "t_after": 300.0, "batch_size": 16, "chunk_steps": 200},
          validate=lambda p: _validate(_fix(p)))
def census_experiment(params, ctx):
    from ..census import CensusTable, census, random_directions
    from ..models import flatten

    params = _fix(params)
    opts = _options(params)
    tables, checks, summary, parts = [], [], {}, _problems(params)
    for k, (w, model, data) in enumerate(parts):
        tag = f"width {w}: " if len(parts) > 1 else ""
        prog = (lambda f, m, k=k: ctx.progress((k + f) / len(parts), f"{tag}{m}"))
        U = random_directions(opts.n_directions, int(flatten(model)[0].size), opts.seed)
        c = census(model, data, opts, loss=params["loss"], progress=prog, directions=U)
        dist = ncf_agreement(c, model, data, params["loss"], U)
        t = c.table
        t.columns["ncf_distance"] = dist
        t.columns = {"width": np.full(len(t), w), **t.columns}
        tables.append(t)
        summary[f"width_{w}"] = c.summary()
        checks += _checks(c, opts, tag, dist, params["ncf_tol"])
    table = CensusTable({k: np.concatenate([t[k] for t in tables]) for k in tables[0].names})
    ctx.write_text("census.csv", table.to_csv())
    arrays, figures = _figures(table, parts[0][1].degree)
    summary["table"] = "census.csv"
    summary["columns"] = table.names
    return Outcome(checks, arrays, figures, summary)


def _fix(params):
    """Parameters with the TOML-friendly sentinels turned into None (``t_stop = 0``: no absolute end time, use
    ``t_after``; ``widths = [0]``:
    the problem's width)."""
    p = dict(params)
    p["t_stop"] = p["t_stop"] or None
    p["widths"] = [int(w) for w in p["widths"] if w]
    return p


def ncf_agreement(c, model, data, loss: str, directions: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Per member, ``||theta_hat(t_esc) - u_hat||``: the distance between the flow's direction at its escape and the
    NCF flow's direction (``du/ds = grad N(u)`` from the member's initial direction, :func:`homflow.phases.ncf_flow`)
    at the same norm ratio ``||theta(t_esc)|| / delta``; ``nan`` for members that did not escape.

    This is what 2403.08121 controls at a finite ``delta`` (it vanishes as ``delta -> 0``); whether the NCF flow has
    reached a KKT point by that norm is a separate question (the NCF flow may approach it slowly)."""
    from ..models import unflatten_like
    from ..phases import ncf_flow

    t = c.table
    out = np.full(len(t), np.nan)
    cache: dict = {}
    for m in np.flatnonzero(t["escaped"]):
        th = np.asarray(c.driver.theta_escape[m])
        ratio = float(np.linalg.norm(th) / t["delta"][m])
        key = (int(t["direction"][m]), round(ratio, 9))
        if key not in cache:
            u0 = unflatten_like(model, jax.numpy.asarray(directions[key[0]]))
            cache[key] = np.asarray(ncf_flow(u0, data, loss=loss, level=ratio, rtol=rtol, n_save=2).direction)
        out[m] = float(np.linalg.norm(th / np.linalg.norm(th) - cache[key]))
    return out


def _checks(c, opts, tag, ncf_dist=None, ncf_tol: float = 1e-3):
    from .phases import info

    t = c.table
    esc = t["escaped"]
    out = [check(f"{tag}members that escaped (fraction)", float(esc.mean()), 0.5, ">=", "the level is reached by "
                 "t_escape_max; flows that shrink to 0 never escape (2403.08121)")]
    smallest = t["delta"] == np.min(t["delta"])
    if esc.any() and ncf_dist is not None:
        # O(||theta(t_esc)||) = O(escape_factor delta): a statement as delta -> 0, checked at the smallest delta
        first = esc & smallest
        out.append(check(f"{tag}every escape direction on the NCF flow's direction at the same norm (max distance, "
                         f"delta = {np.min(t['delta']):.3g})", float(np.nanmax(ncf_dist[first])) if first.any()
                         else 0.0, ncf_tol, "<=",
                         "2403.08121: the direction of the flow from delta u0 follows the NCF flow from u0 up to "
                         "O(||theta||) corrections (distance of unit vectors at the escape; vanishes as delta -> 0)"))
        if (esc & ~smallest).any():
            out.append(info(f"{tag}the same at the larger deltas (max)", float(np.nanmax(ncf_dist[esc & ~smallest])),
                            ncf_tol, "the corrections grow with the escape norm escape_factor * delta"))
        out.append(info(f"{tag}escape directions within the stated cosine of a certified KKT point (min cos)",
                        float(np.nanmin(t["cos"][esc])), opts.align_cos,
                        "the NCF flow converges to a KKT point only as ||u|| -> inf, slowly near other critical "
                        "directions: at a finite escape norm alignment is a measurement, not a theorem"))
    elif esc.any():
        out.append(check(f"{tag}every escape direction within the stated cosine of a certified KKT point (min cos)",
                         float(np.nanmin(t["cos"][esc])), opts.align_cos, ">="))
    if esc.any():
        out.append(check(f"{tag}KKT points certified (largest relative residual)",
                         max(p.relative_residual for p in c.points.points), 1e-10, "<=",
                         "||grad N - lambda u|| / ||grad N|| of each polished cluster point (polish_ncf_theta; "
                         "rounding level in float64 is ~1e-15, 1e-10 leaves room for the polish's stopping rule)"))
    # 2502.15952: the sparsity formed before the escape is kept until the saddle, O(delta) as delta -> 0. Its premise is
    # a direction that has reached the sparse KKT point u* by the escape; a member that has not (cos < align_cos) has
    # not formed u*'s sparsity yet, so it is counted, not checked. The constant is a statement about small delta: it is
    # checked at the smallest delta of the census, reported at the others (where a second neuron's own escape can come
    # before the saddle), and the O(delta) scaling is checked across deltas.
    aligned = esc & (np.nan_to_num(t["cos"]) >= opts.align_cos)
    sp = np.where(aligned, t["sparse_max_over_delta"], np.nan)
    if (esc & ~aligned).any():
        out.append(info(f"{tag}members not aligned with their KKT point at the escape (fraction; sparsity not "
                        "checked for them)", float((esc & ~aligned).mean() / max(esc.mean(), 1e-300)), 0.0,
                        f"cos(theta(t_esc), u*) < align_cos = {opts.align_cos:g}: u*'s zero neurons have not formed"))
    if np.isfinite(sp[smallest]).any():
        out.append(check(f"{tag}sparsity kept until the saddle: zero neurons of u* / delta (max over aligned "
                         f"members, delta = {np.min(t['delta']):.3g})", float(np.nanmax(sp[smallest])),
                         opts.sparse_factor, "<=",
                         "2502.15952: neurons zero at u* stay O(delta) from the escape to the first saddle"))
    if np.isfinite(sp[~smallest]).any():
        out.append(info(f"{tag}the same at the larger deltas (max)", float(np.nanmax(sp[~smallest])),
                        opts.sparse_factor, "O(delta) is a statement as delta -> 0; its scaling is checked below"))
    if c.law is not None and c.law.law == "power":
        out.append(check(f"{tag}t_escape delta^(L-2) constant across deltas (max relative spread)",
                         c.law.rescaled_spread, opts.law_rtol, "<=",
                         "2403.08121: t_escape ~ s* delta^-(L-2) for L > 2 (law_rtol)"))
        out.append(check(f"{tag}escape-time exponent vs L - 2 = {c.degree - 2}", c.law.deviation, opts.law_atol, "<=",
                         "the exponent fitted within directions across deltas (law_atol)"))
    elif c.law is not None:
        out.append(check(f"{tag}log law: slope d t / d log(1/delta) vs 1 / lambda (relative)", c.law.deviation,
                         opts.law_atol, "<=", "2403.08121 for L = 2: t_escape ~ log(1/delta) / lambda (law_atol)"))
    if len(opts.deltas) >= 2 and np.isfinite(sp).any():
        from ..census import within_slope

        ok = np.isfinite(sp) & (sp > 0)
        s, _, n = within_slope(t["direction"][ok], np.log(t["delta"][ok]), np.log(sp[ok] * t["delta"][ok]))
        if n:
            out.append(check(f"{tag}zero neurons of u* stay O(delta): 1 - slope of log max norm on log delta "
                             "(one-sided: shrinking faster than delta is O(delta) too)", 1.0 - s,
                             opts.sparse_slope_atol, "<=", f"within-direction slope {s:.3g} over {n} directions"))
    return out


def _figures(table, L):
    esc = table["escaped"]
    pts = table["kkt_point"]
    K = int(pts.max(initial=-1)) + 1
    share = np.bincount(pts[pts >= 0], minlength=K) / max(int((pts >= 0).sum()), 1)
    lev = table["saddle_loss"]
    levels = np.unique(np.round(lev[np.isfinite(lev)], 4))
    lev_share = np.array([np.mean(np.round(lev[np.isfinite(lev)], 4) == v) for v in levels]) if levels.size else \
        np.zeros(1)
    d = table["delta"][esc]
    t = table["t_escape"][esc]
    r = table["t_escape_rescaled"][esc]
    law = np.median(r) * d ** -(L - 2) if r.size and L > 2 else np.full(d.shape, np.nan)
    cos = table["cos"][esc]
    ab, ac = _hist(np.log10(np.maximum(1 - cos, 1e-16)), 20)
    rb, rc = _hist(r, 20)
    arrays = {"point_index": np.arange(max(K, 1), dtype=float), "point_share": share if K else np.zeros(1),
              "saddle_index": np.arange(max(levels.size, 1), dtype=float), "saddle_share": lev_share,
              "saddle_levels": levels if levels.size else np.zeros(1),
              "delta_members": d, "t_escape_members": t, "t_law_members": law,
              "align_bins": ab, "align_counts": ac, "rescaled_bins": rb, "rescaled_counts": rc}
    for k in table.names:
        v = table[k]
        if v.dtype != object:
            arrays[f"table_{k}"] = v
    lv = ", ".join(f"{v:.4g}" for v in levels[:8])
    figures = [
        Figure("kkt_share", "Share of members per certified KKT point", "point_index", ("point_share",), ("share",),
               "KKT point", "share", kind="bar"),
        Figure("saddle_share", f"Share of members per first-saddle loss level ({lv})", "saddle_index",
               ("saddle_share",), ("share",), "saddle level (index)", "share", kind="bar"),
        Figure("escape_law", f"Escape time against delta and the delta^-(L-2) law (L = {L})", "delta_members",
               ("t_escape_members", "t_law_members"), ("members", "median t delta^(L-2) / delta^(L-2)"), "delta",
               "t_escape", logx=True, logy=True, kind="scatter"),
        Figure("escape_hist", "Distribution of t_escape delta^(L-2)", "rescaled_bins", ("rescaled_counts",),
               ("members",), "t_escape delta^(L-2)", "count", kind="bar"),
        Figure("alignment", "Alignment with the matched certified KKT point", "align_bins", ("align_counts",),
               ("members",), "log10(1 - cos)", "count", kind="bar"),
    ]
    return arrays, figures
