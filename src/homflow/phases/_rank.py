"""Rank-one structure of NCF KKT points of deep feed-forward nets (arXiv 2403.08121; docs/math.md sections 3 and 5).

A KKT point of ``max N(u)`` s.t. ``||u|| = 1`` of a deep (leaky) ReLU or ReLU^p MLP is often *rank one*: every weight
matrix is ``W_k = s_k u_k v_k^T``. When the hidden vectors ``u_k`` (k < K) are entrywise non-negative,
``sigma(c z) = c^p sigma(z)`` (``c >= 0``) makes the network compute the same function as the width-one network

    ``w_1 = s_1 v_1^T``,  ``w_k = s_k <v_k, u_{k-1}^p>`` (k >= 2)   (``u_K = +-1``, folded into ``w_K``),

and, because the gradient of ``N`` with respect to ``W_{k+1}`` has row space ``u_k^p``, a KKT point has
``v_{k+1} = +-u_k^p / ||u_k^p||``. For ``p = 1`` the point is therefore exactly the split (docs/math.md §5) of that
width-one network with coefficients ``u_k`` in every hidden layer: an isometry that maps NCF KKT points to NCF KKT
points, so the width-one network is itself a KKT point (re-certified here by its own residual). For ``p != 1`` a
non-trivial split does not carry KKT points (``homflow.embedding`` refuses it); one-hot hidden vectors (one neuron
alive per layer, what ascent on ReLU^p nets finds) are trivial splits and everything transfers; other non-negative
rank-one points are compared with the output-preserving split (``out_coeffs = c^(2-p)``), which reproduces the point
when ``u_k`` is constant on its support, and their width-one residual is reported without a certificate.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..embedding import compose, output_preserving_out_coeffs, split
from ..kkt import default_residual_rtol, ncf_kkt_residual, ncf_grad, solve_ncf
from ..models import MLP, flatten

__all__ = ["RankCensus", "RankOnePoint", "census_point", "rank_one_census", "rank_one_factors", "split_back",
           "width_one_network"]


def _sv_ratio(W) -> float:
    s = np.linalg.svd(np.asarray(W), compute_uv=False)
    return float(s[1] / s[0]) if s.size > 1 and s[0] > 0 else 0.0


def rank_one_factors(model: MLP, *, rank_rtol: float = 1e-6, sign_tol: float = 1e-8):
    """Factor each weight matrix of a rank-one ``model`` as ``W_k = s_k u_k v_k^T`` with non-negative hidden vectors.

    Arguments:
        model: an :class:`~homflow.models.MLP`.
        rank_rtol: ``W_k`` is rank one when ``s_2 <= rank_rtol * s_1`` (default ``1e-6``).
        sign_tol: entries of ``u_k`` (k < K, after choosing the sign of the pair ``(u_k, v_k)``) above ``-sign_tol``
            count as non-negative; they are clipped at 0 and ``u_k`` is renormalised.

    Returns:
        ``(s, u, v)`` lists (``u[K-1]`` is ``+-1``), or ``None`` when a matrix is not rank one or a hidden vector has an
        entry below ``-sign_tol``.
    """
    s_all, u_all, v_all = [], [], []
    Ws = [np.asarray(w) for w in model.weights]
    for k, W in enumerate(Ws):
        U, S, Vt = np.linalg.svd(W, full_matrices=False)
        if S.size > 1 and S[1] > rank_rtol * S[0]:
            return None
        u, v = U[:, 0], Vt[0]
        if k < len(Ws) - 1:
            if u.sum() < 0:
                u, v = -u, -v
            if np.any(u < -sign_tol):
                return None
            u = np.maximum(u, 0.0)
            u = u / np.linalg.norm(u)
        s_all.append(float(S[0]))
        u_all.append(u)
        v_all.append(v)
    return s_all, u_all, v_all


def width_one_network(model: MLP, *, rank_rtol: float = 1e-6, sign_tol: float = 1e-8) -> MLP | None:
    """The width-one MLP that computes the same function as a rank-one ``model`` with non-negative hidden vectors,
    or ``None`` (see :func:`rank_one_factors` for the tolerances).

    ``w_1 = s_1 v_1^T``, ``w_k = s_k <v_k, u_{k-1}^p>`` for ``k >= 2`` (times ``u_K = +-1`` in the last layer); the
    outputs agree exactly because ``sigma(c z) = c^p sigma(z)`` for ``c >= 0``. For ``p = 1`` this is the network whose
    split (:func:`split_back`) is ``model`` (docs/math.md section 5).
    """
    f = rank_one_factors(model, rank_rtol=rank_rtol, sign_tol=sign_tol)
    if f is None:
        return None
    s, u, v = f
    p = model.activation.degree
    out = []
    for k in range(len(s)):
        w = s[k] * (v[k][None, :] if k == 0 else np.array([[v[k] @ (u[k - 1] ** p)]]))
        if k == len(s) - 1:
            w = w * u[k][0]
        out.append(jnp.asarray(w, dtype=model.weights[0].dtype))
    return MLP.from_weights(tuple(out), model.activation)


def split_back(narrow: MLP, hidden: list, *, p: int):
    """Split every hidden neuron of a width-one ``narrow`` net into ``len(hidden[k])`` copies with coefficients
    ``hidden[k]`` (non-negative, unit norm), layer by layer, with :func:`homflow.embedding.split` and
    :func:`homflow.embedding.compose`.

    For ``p = 1``, and for one-hot coefficients, this is the classical split (an isometry that carries KKT points).
    For ``p != 1`` with a non-trivial coefficient vector the classical split is refused by the embedding package; the
    output-preserving split (``out_coeffs = c^(2-p)``) is used instead.

    Returns:
        ``(T, kind)``: the composed split and ``'isometric'`` or ``'output-preserving'``.
    """
    splits, current, kind = [], narrow, "isometric"
    for k, c in enumerate(hidden):
        c = np.asarray(c, float)
        one_hot = int(np.sum(c > 0)) == 1
        if p == 1 or one_hot:
            c = np.where(c == c.max(), 1.0, 0.0) if one_hot else c
            s = split(current, layer=k, neuron=0, coeffs=c, tol=1e-9)
        else:
            s = split(current, layer=k, neuron=0, coeffs=c, out_coeffs=output_preserving_out_coeffs(c, p), tol=1e-9)
            kind = "output-preserving"
        splits.append(s)
        current = s.wide
    return compose(*splits), kind


@dataclasses.dataclass(frozen=True)
class RankOnePoint:
    """One certified point in a :class:`RankCensus`.

    Attributes:
        point: the :class:`homflow.kkt.NCFPoint`; sv_ratio: largest ``s_2 / s_1`` over the weight matrices.
        rank_one: ``sv_ratio <= rank_rtol``; nonneg: rank one with non-negative hidden vectors.
        width_one: the width-one network (or ``None``); width_one_residual: its relative NCF KKT residual
            ``||grad N(u) - <u, grad N(u)> u|| / ||grad N(u)||`` (``nan`` without one).
        split_kind: ``'isometric'`` / ``'output-preserving'`` (``None`` without one); split_error: max absolute
            difference between the split of the width-one network and the point's parameters; output_error: max
            ``|Phi_1(x_i) - Phi(x_i)|`` on the data.
        certified_width_one: the width-one residual is below the tolerance and the split is isometric.
        support: number of positive entries of each hidden vector ``u_k`` (all 1: a trivial, one-hot split).
    """

    point: object
    sv_ratio: float
    rank_one: bool
    nonneg: bool
    width_one: MLP | None = None
    width_one_residual: float = float("nan")
    split_kind: str | None = None
    split_error: float = float("nan")
    output_error: float = float("nan")
    certified_width_one: bool = False
    support: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class RankCensus:
    """Census of the certified NCF KKT points found by :func:`homflow.kkt.solve_ncf` (``entries``, best value first)
    and the number of polished clusters left uncertified (``n_uncertified``, kept apart, not in the fractions)."""

    n_starts: int
    entries: tuple[RankOnePoint, ...]
    n_uncertified: int
    rank_rtol: float
    recert_rtol: float

    @property
    def points(self):
        return [e.point for e in self.entries]

    @property
    def rank_one(self) -> np.ndarray:
        return np.array([e.rank_one for e in self.entries], bool)

    @property
    def nonneg(self) -> np.ndarray:
        return np.array([e.nonneg for e in self.entries], bool)

    @property
    def rank_one_fraction(self) -> float:
        """Fraction of certified points that are rank one (``nan`` when none is certified)."""
        return float(self.rank_one.mean()) if self.entries else float("nan")

    def _max(self, name, only=None):
        vals = np.array([getattr(e, name) for e in self.entries if only is None or getattr(e, only) is not None
                         and (only != "split_kind" or e.split_kind == "isometric")], float)
        vals = vals[np.isfinite(vals)]
        return float(vals.max()) if vals.size else float("nan")

    @property
    def width_one_residual(self) -> float:
        """Largest relative width-one residual over the isometric splits (``nan`` if none)."""
        return self._max("width_one_residual", "split_kind")

    @property
    def split_error(self) -> float:
        """Largest parameter error of splitting back, over every non-negative rank-one point (``nan`` if none)."""
        return self._max("split_error")

    @property
    def output_error(self) -> float:
        return self._max("output_error")

    def summary(self) -> dict:
        def f(x):
            return None if not np.isfinite(x) else float(x)

        return {"starts": self.n_starts, "certified": len(self.entries), "uncertified": self.n_uncertified,
                "rank_one": int(self.rank_one.sum()), "nonneg_rank_one": int(self.nonneg.sum()),
                "rank_one_fraction": f(self.rank_one_fraction),
                "nontrivial_splits": sum(any(m > 1 for m in e.support) for e in self.entries),
                "isometric_splits": sum(e.split_kind == "isometric" for e in self.entries),
                "width_one_certified": sum(e.certified_width_one for e in self.entries),
                "max_width_one_residual": f(self.width_one_residual), "max_split_error": f(self.split_error),
                "max_output_error": f(self.output_error), "max_sv_ratio": f(max((e.sv_ratio for e in self.entries),
                                                                                 default=float("nan")))}


def _relative_residual(model, data, loss) -> float:
    r, _ = ncf_kkt_residual(model, data, loss=loss)
    g = float(jnp.linalg.norm(ncf_grad(model, data, loss=loss, normalize=True)))
    return float(r) / max(g, float(np.finfo(float).tiny))


def census_point(point, data, *, loss, rank_rtol: float = 1e-6, sign_tol: float = 1e-8,
                 recert_rtol: float | None = None) -> RankOnePoint:
    """Classify one certified :class:`homflow.kkt.NCFPoint` of an MLP (see :func:`rank_one_census`)."""
    model = point.model
    ratio = max((_sv_ratio(w) for w in model.weights), default=0.0)
    if ratio > rank_rtol:
        return RankOnePoint(point, ratio, False, False)
    f = rank_one_factors(model, rank_rtol=rank_rtol, sign_tol=sign_tol)
    if f is None:
        return RankOnePoint(point, ratio, True, False)
    one = width_one_network(model, rank_rtol=rank_rtol, sign_tol=sign_tol)
    p = model.activation.degree
    T, kind = split_back(one, f[1][:-1], p=p)
    back = np.asarray(flatten(T(one))[0])
    split_err = float(np.max(np.abs(back - np.asarray(flatten(model)[0]))))
    X = jnp.asarray(data.X, dtype=model.weights[0].dtype)
    out_err = float(jnp.max(jnp.abs(jax.vmap(one)(X) - jax.vmap(model)(X))))
    res = _relative_residual(one, data, loss)
    rtol = default_residual_rtol() if recert_rtol is None else float(recert_rtol)
    return RankOnePoint(point, ratio, True, True, one, res, kind, split_err, out_err,
                        bool(kind == "isometric" and res <= rtol), tuple(int(np.sum(c > 0)) for c in f[1][:-1]))


def rank_one_census(model: MLP, data, *, loss="square", n_starts: int = 16, seed: int = 0, steps: int = 1000,
                    rank_rtol: float = 1e-6, sign_tol: float = 1e-8, recert_rtol: float | None = None,
                    solution=None, **solve_kwargs) -> RankCensus:
    """Rank-one census of the NCF KKT points of an MLP (arXiv 2403.08121).

    The certified distinct points of :func:`homflow.kkt.solve_ncf` (``n_starts`` random starts, ``steps`` ascent
    steps; or a given ``solution``) are tested for rank one (``s_2 <= rank_rtol s_1`` in every weight matrix) and for
    non-negative hidden vectors. Each such point is rebuilt as a width-one network (:func:`width_one_network`), split
    back with the embedding package (:func:`split_back`) and compared with the point, and the width-one network is
    re-certified by its own relative NCF KKT residual (``<= recert_rtol``, default
    :func:`homflow.kkt.default_residual_rtol`; only for isometric splits, see the module docstring).

    Arguments:
        model: an MLP fixing the architecture; data, loss: the NCF's data and loss.
        n_starts, seed, steps, solve_kwargs: passed to :func:`homflow.kkt.solve_ncf` (``key = PRNGKey(seed)``).
        rank_rtol, sign_tol: see :func:`rank_one_factors`.
        solution: an :class:`homflow.kkt.NCFSolution` to classify instead of solving.

    Returns:
        A :class:`RankCensus`.

    Raises:
        ValueError: if ``model`` is not an MLP with at least one hidden layer, or ``rank_rtol`` is not in (0, 1).
    """
    if not isinstance(model, MLP) or not model.widths:
        raise ValueError(f"`model` must be an MLP with a hidden layer; got {type(model).__name__}"
                         f"{' with widths=()' if isinstance(model, MLP) else ''}.")
    if not 0 < float(rank_rtol) < 1:
        raise ValueError(f"`rank_rtol` must be in (0, 1); got {rank_rtol!r}.")
    if solution is None:
        solution = solve_ncf(model, data, loss=loss, n_starts=n_starts, key=jax.random.PRNGKey(seed), steps=steps,
                             **solve_kwargs)
    entries = tuple(census_point(pt, data, loss=loss, rank_rtol=rank_rtol, sign_tol=sign_tol, recert_rtol=recert_rtol)
                    for pt in solution.points)
    return RankCensus(int(solution.n_starts), entries, len(solution.uncertified), float(rank_rtol),
                      default_residual_rtol() if recert_rtol is None else float(recert_rtol))
