"""Which solver a built-in ran and how many gradient evaluations it cost, gathered from its flows' ``stats``.

Every :class:`homflow.flow.Trajectory` carries ``stats`` (``solver``, ``num_steps``, ``grad_evals``, ...); a built-in
adds each trajectory it computes to a :class:`SolverLog` under the name of its stage, and puts
:meth:`SolverLog.summary` into its outcome's summary (keys ``solvers``, ``grad_evals``, ``grad_evals_by_stage``).
"""

from __future__ import annotations

__all__ = ["SolverLog", "ok_and_reason"]


def ok_and_reason(traj) -> tuple[bool, str]:
    """``(success, reason)`` of a trajectory: its ``success`` and ``reason`` (or, for a result object that carries
    them, ``result.success`` and ``result.reason``)."""
    ok = getattr(traj, "success", None)
    if isinstance(ok, bool):
        return ok, str(getattr(traj, "reason", "") or "")
    r = traj.result
    return bool(r.success), str(getattr(r, "reason", "") or "")


class SolverLog:
    """Solver names and gradient evaluations of the flows of one run, by stage.

    >>> log = SolverLog()
    >>> log.add_stats("early", {"solver": "auto", "grad_evals": 120})
    >>> log.add_stats("early", {"solver": "auto", "grad_evals": 30})
    >>> log.summary()
    {'solvers': ['auto'], 'grad_evals': 150, 'grad_evals_by_stage': {'early': 150}}
    """

    def __init__(self):
        self._solvers: list[str] = []
        self._evals: dict[str, int] = {}
        self._missing: list[str] = []

    def add_stats(self, stage: str, stats: dict | None, *, default_solver: str | None = None) -> None:
        """Record one flow's ``stats`` dict under ``stage`` (``default_solver`` names a method whose stats do not)."""
        stats = dict(stats or {})
        name = stats.get("solver") or default_solver
        if name and name not in self._solvers:
            self._solvers.append(str(name))
        ev = stats.get("grad_evals")
        if ev is None:
            if stage not in self._missing:
                self._missing.append(stage)
            return
        self._evals[stage] = self._evals.get(stage, 0) + int(ev)

    def add(self, stage: str, traj, *, default_solver: str | None = None) -> None:
        """Record a trajectory (anything with a ``stats`` dict) under ``stage``."""
        self.add_stats(stage, getattr(traj, "stats", None), default_solver=default_solver)

    def summary(self) -> dict:
        out = {"solvers": list(self._solvers), "grad_evals": int(sum(self._evals.values())),
               "grad_evals_by_stage": dict(self._evals)}
        if self._missing:
            out["grad_evals_not_reported_by"] = list(self._missing)
        return out
