"""Sliding factors of one-hidden-layer nets kept on the host and updated by Schur complements.

A sliding mode of a net with one hidden layer needs the pseudo-inverse ``Q`` of the Gram matrix ``G = N N^T`` of its
kink normals (:class:`~homflow.flow._clarke.SlidingFactor`); the normals do not move with ``theta``. Event-dense
flows try several sliding sets per event (the host's mode decision evaluates each candidate mode), and consecutive sets
differ by a unit or two. Forming ``G`` and ``Q`` from scratch costs ``O(K^2 P + K^3)`` at the padded capacity ``K``
(2.4 ms at ``K = 256``, ``P = 270``: most of an evaluation); bordering a known inverse by one unit, or removing one,
costs ``O(k^2)`` at the set's true size ``k`` (the block-inverse / Schur-complement identities):

- remove unit ``i``: ``Q' = Q_rr - Q_ri Q_ir / Q_ii`` (exactly the inverse of ``G_rr``);
- add a unit with normal ``n``: ``b = N n``, ``q = Q b``, ``s = n.n - b.q`` (the Schur complement);
  ``Q' = [[Q + q q^T / s, -q / s], [-q^T / s, 1 / s]]``.

Safeguards: an update is made only from a factor formed by Cholesky (not the eigendecomposition of dependent normals),
an addition whose Schur complement is below ``1e3 k eps n.n`` (the new normal nearly in the span of the others: the
from-scratch path then decides between Cholesky and the eigendecomposition), a removal with ``Q_ii G_ii`` above
``1 / (1e3 k eps)``, and any factor more than ``refresh`` updates away from one formed from scratch, are formed from
scratch instead. :meth:`SlidingFactor.solve` applies ``Q`` with one step of iterative refinement against the exact
``G``, so an update's rounding (relative ``delta``) reaches the solve as ``delta^2``. Tested against the from-scratch
factor in tests/test_nonsmooth_flow.py.
"""

from __future__ import annotations

from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np

from ._clarke import SlidingFactor, _padded, capacity, jit


@jit
def _normals(problem, theta, idx, valid):
    return problem.normals(theta, idx) * valid[:, None].astype(theta.dtype)


@jit
def _build(problem, theta, idx, valid):
    """The from-scratch factor and whether Cholesky formed it."""
    return SlidingFactor.build_checked(problem.normals(theta, idx) * valid[:, None].astype(theta.dtype), valid)


@jit
def _sliding_factor(problem, theta, idx, valid):
    return problem.sliding_factor(theta, idx, valid)


class FactorCache:
    """The :class:`SlidingFactor` of each sliding set (a sorted tuple of flat unit indices) of a one-hidden-layer
    problem, the last ``keep`` kept, new ones bordered from the nearest kept one (at most ``max_diff`` units
    different) or formed from scratch. ``border=False``: every factor from scratch by ``problem.sliding_factor`` (a
    joint problem's pair of factors; ``ClarkeFlow(factor_updates=False)``), ``None`` for the empty set. ``stats``:
    ``built`` (from scratch), ``updated`` (by Schur complements)."""

    def __init__(self, problem, theta0, keep: int = 32, refresh: int = 64, max_diff: int = 4, border: bool = True):
        self.problem, self.theta0, self.border = problem, theta0, border
        self.dtype = np.dtype(theta0.dtype)
        self.keep, self.refresh, self.max_diff = keep, refresh, max_diff
        self._normals = {}  # unit -> its kink normal (P,)
        self._sets = OrderedDict()  # key -> dict(N, G, Q: host arrays at the true size, exact, age, fac)
        self.stats = dict(built=0, updated=0)
        self._empty = None

    def get(self, key):
        if not key:  # no sliding set: an all-invalid factor, so that the first capacity compiles once, not twice
            if not self.border:
                return None
            if self._empty is None:
                P = self.theta0.shape[0]
                self._empty = self._device(np.zeros((0, P), self.dtype), np.zeros((0, 0), self.dtype),
                                           np.zeros((0, 0), self.dtype))
            return self._empty
        ent = self._sets.pop(key, None)
        if ent is None:
            ent = (self.border and self._bordered(key)) or self._scratch(key)
            if len(self._sets) >= self.keep:
                self._sets.popitem(last=False)
        self._sets[key] = ent  # most recently used last
        return ent["fac"]

    # ---------------------------------------------------------------------------------------------------------------
    def _scratch(self, key):
        idx, valid = _padded(np.asarray(key, np.int64))
        self.stats["built"] += 1
        if not self.border:  # the problem's own factor (a joint problem: one per half), kept as it is
            return dict(fac=_sliding_factor(self.problem, self.theta0, idx, valid), exact=False, age=0)
        fac, ok = _build(self.problem, self.theta0, idx, valid)
        k = len(key)
        ent = dict(fac=fac, exact=bool(ok), age=0)
        if ent["exact"]:
            N, G, Q = jax.device_get((fac.N, fac.G, fac.Q))
            ent.update(N=np.array(N[:k]), G=np.array(G[:k, :k]), Q=np.array(Q[:k, :k]))
            for i, e in enumerate(key):
                self._normals.setdefault(e, ent["N"][i])
        return ent

    def _normal_rows(self, units):
        miss = [e for e in units if e not in self._normals]
        if miss:
            idx, valid = _padded(np.asarray(miss, np.int64))
            Nm = np.asarray(jax.device_get(_normals(self.problem, self.theta0, idx, valid)))
            for i, e in enumerate(miss):
                self._normals[e] = Nm[i]
        return [self._normals[e] for e in units]

    def _bordered(self, key):
        target = set(key)
        best, best_d = None, self.max_diff + 1
        for k0, ent in reversed(self._sets.items()):
            if not ent["exact"] or ent["age"] >= self.refresh:
                continue
            d = len(target.symmetric_difference(k0))
            if d < best_d:
                best, best_d = k0, d
                if d <= 1:
                    break
        if best is None or best_d == 0:
            return None
        ent = self._sets[best]
        units = list(best)
        N, G, Q = ent["N"], ent["G"], ent["Q"]
        eps = np.finfo(self.dtype).eps
        for e in sorted(set(best) - target):  # removals
            i = units.index(e)
            k = len(units)
            if Q[i, i] * G[i, i] > 1.0 / (1e3 * k * eps):
                return None
            r = np.r_[0:i, i + 1:k]
            Q = Q[np.ix_(r, r)] - np.outer(Q[r, i], Q[i, r]) / Q[i, i]
            G, N = G[np.ix_(r, r)], N[r]
            units.pop(i)
        adds = sorted(target - set(best))
        for e, n in zip(adds, self._normal_rows(adds)):  # additions, at the end, then sorted below
            k = len(units)
            b = N @ n
            c = float(n @ n)
            q = Q @ b
            s = c - float(b @ q)
            if not s > 1e3 * (k + 1) * eps * c:
                return None
            Qn = np.empty((k + 1, k + 1), self.dtype)
            Qn[:k, :k] = Q + np.outer(q, q) / s
            Qn[:k, k] = Qn[k, :k] = -q / s
            Qn[k, k] = 1.0 / s
            Gn = np.empty_like(Qn)
            Gn[:k, :k], Gn[:k, k], Gn[k, :k], Gn[k, k] = G, b, b, c
            Q, G, N = Qn, Gn, np.vstack([N, n[None]])
            units.append(e)
        order = np.argsort(units)
        Q, G, N = Q[np.ix_(order, order)], G[np.ix_(order, order)], N[order]
        Q = 0.5 * (Q + Q.T)
        self.stats["updated"] += 1
        return dict(fac=self._device(N, G, Q), exact=True, age=ent["age"] + best_d, N=N, G=G, Q=Q)

    def _device(self, N, G, Q):
        k = N.shape[0]
        cap = capacity(max(k, 1))
        Np = np.zeros((cap, N.shape[1]), self.dtype)
        Np[:k] = N
        Gp = np.eye(cap, dtype=self.dtype)
        Gp[:k, :k] = G
        Qp = np.eye(cap, dtype=self.dtype)
        Qp[:k, :k] = Q
        valid = np.zeros(cap, bool)
        valid[:k] = True
        return SlidingFactor(jnp.asarray(Np), jnp.asarray(Gp), jnp.asarray(Qp), jnp.asarray(valid))
