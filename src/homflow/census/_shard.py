"""A census's flows split into shards of members, each integrated by :func:`run_members` wherever a shard runner puts
it (in-process, a process pool, Ray tasks: :func:`homflow.shards.run_shards`); shards return arrays, the caller merges
them and does the analysis. A shard's payload is plain data (the model, the data arrays, the loss name, the members'
initial states and settings), so it pickles for any backend.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ._driver import DriverOptions, DriverResult, precompile, run_members

__all__ = ["run_members_sharded", "census_shard"]


def census_shard(payload: dict) -> dict:
    """Run one shard (module level, so that process pools and Ray can pickle it): ``payload`` holds ``model``,
    ``X``, ``y``, ``loss``, ``thetas0`` and the keyword arguments of :func:`run_members`; returns the
    :class:`DriverResult` as a dict of plain values."""
    from .. import enable_x64
    from ..data import Dataset
    from ..flow import make_objective

    enable_x64()
    objective, _ = make_objective(payload["model"], Dataset(payload["X"], payload["y"]), payload["loss"])
    th = np.asarray(payload["thetas0"])
    # every batch size this shard may use, compiled (or loaded from the shared persistent cache) up front
    precompile(objective, th.shape[0], th.shape[1], payload["kwargs"].get("options", DriverOptions()))
    res = run_members(objective, th, **payload["kwargs"])
    return dataclasses.asdict(res)


def run_members_sharded(model, data, loss, thetas0, *, n_shards: int, runner: Callable, **kwargs) -> DriverResult:
    """:func:`run_members` on ``n_shards`` contiguous shards of the rows of ``thetas0`` through ``runner``.

    Arguments:
        model, data, loss: the problem (rebuilt in each shard).
        n_shards: how many shards (each gets ``~N / n_shards`` members).
        runner: ``runner(fn, payloads, on_result=..., on_failure=...)``, e.g.
            ``functools.partial(homflow.shards.run_shards, backend='ray', workers=2)``.
        kwargs: per-member arrays (``levels``, ``horizons``, ``ends``, ``atol``) are split with the members; the rest
            (``t_after``, ``rtol``, ``groups``, ``save_dt``, ``options``) go to every shard.

    Returns:
        The merged :class:`DriverResult` (members in their original order; costs summed over shards).

    Raises:
        RuntimeError: if a shard failed (its reason).
    """
    th = np.asarray(thetas0, float)
    N = th.shape[0]
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise ValueError(f"`n_shards` must be a positive integer; got {n_shards!r}.")
    bounds = np.linspace(0, N, min(n_shards, N) + 1).astype(int)
    per_member = {k for k in ("levels", "horizons", "ends", "atol") if kwargs.get(k) is not None}
    payloads = {}
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        kw = {k: (np.broadcast_to(np.asarray(v, float), (N,))[a:b] if k in per_member else v)
              for k, v in kwargs.items()}
        payloads[s] = {"model": model, "X": np.asarray(data.X), "y": np.asarray(data.y), "loss": loss,
                       "thetas0": th[a:b], "kwargs": kw}
    results: dict[int, dict] = {}
    failures: dict[int, str] = {}
    runner(census_shard, payloads, on_result=lambda k, v: results.__setitem__(k, v),
           on_failure=lambda k, r: failures.__setitem__(k, r))
    if failures:
        raise RuntimeError(f"census shards failed: {failures}")
    parts = [results[s] for s in sorted(results)]
    cat = lambda name: np.concatenate([np.asarray(p[name]) for p in parts])  # noqa: E731
    lst = lambda name: [x for p in parts for x in p[name]]  # noqa: E731
    return DriverResult(cat("t_escape"), cat("theta_escape"), cat("t_end"), cat("theta_end"), lst("outcome"),
                        lst("reason"), lst("curve_t"), lst("curve_loss"), lst("curve_groups"), cat("grad_evals"),
                        cat("steps"), sum(p["batched_evals"] for p in parts), sum(p["slot_evals"] for p in parts),
                        sum(p["calls"] for p in parts), tuple(b for p in parts for b in p["batch_sizes"]),
                        sum(p["idle_evals"] for p in parts))

