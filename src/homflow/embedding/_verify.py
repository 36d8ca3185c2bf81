"""Numerical verification of the embedding principle for one split (arXiv 2505.12419; docs/math.md section 5).

:func:`verify` measures every claim the paper makes for a split ``T``: isometry, outputs, gradients, KKT points of the
max-margin problem and of the constrained NCF (same multipliers), and whole trajectories of gradient flow, gradient
descent and SGD with identical batches, together with the two negative controls (SGD with different batch orders, and
Adam) that must break the correspondence.
"""

from __future__ import annotations

import dataclasses

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..flow import adam, gradient_descent, gradient_flow, log_times, sgd, sgd_batches
from ..kkt import make_margin_problem, max_margin_kkt, ncf, ncf_kkt_residual, polish_ncf, solve_max_margin
from ..losses import get_loss
from ..models import flatten
from ._joint import ERROR_NORMS, joint_flow
from ._split import AbstractSplit

__all__ = ["EmbeddingReport", "verify", "trajectory_error", "TRAJECTORY_METHODS", "DEFAULT_TRAJECTORIES",
           "NEGATIVE_CONTROLS"]

TRAJECTORY_METHODS = ("flow", "flow_separate", "gd", "sgd", "sgd_shuffled", "adam")
DEFAULT_TRAJECTORIES = ("flow", "gd", "sgd", "sgd_shuffled", "adam")
NEGATIVE_CONTROLS = ("sgd_shuffled", "adam")


def _f(x):
    return None if x is None else float(x)


@dataclasses.dataclass(frozen=True)
class EmbeddingReport:
    """What :func:`verify` measured for a split ``T`` and a narrow network ``theta``.

    Attributes:
        properties: which identities the coefficients imply (``preserves_outputs``, ``isometric``,
            ``preserves_gradients``).
        isometry_error: ``||T^T T - I||_max`` (explicit matrix) or ``max_v ||T^T T v - v|| / ||v||`` (random ``v``).
        norm_error: ``| ||T theta|| - ||theta|| |``.
        merge_error: ``||T^T T theta - theta||`` (the merge undoes the split).
        output_error: ``max_i |Phi~(T theta; x_i) - Phi(theta; x_i)|``.
        gradient_error: ``max_i ||grad Phi~_i(T theta) - T grad Phi_i(theta)||``.
        loss_gradient_error: ``||grad L~(T theta) - T grad L(theta)||``.
        kkt: max-margin KKT transfer (the narrow certificate from :func:`homflow.kkt.solve_max_margin`, the wide
            point's residuals with the *same* multipliers, the wide point re-certified by
            :func:`homflow.kkt.max_margin_kkt`, the largest multiplier difference) or ``None``.
        ncf: NCF KKT transfer (residual and ``lambda`` narrow vs wide at a :func:`homflow.kkt.polish_ncf` point) or
            ``None``.
        trajectory_errors: ``max_t ||eta(t) - T theta(t)||`` per method (``flow``: one joint ODE in
            ``(theta, eta)``, see :func:`joint_flow`; ``flow_separate``: two independent solves, if asked for;
            ``gd``, ``sgd`` with identical batches; negative controls ``sgd_shuffled`` and ``adam``).
        settings: the parameters used.
    """

    properties: dict
    isometry_error: float
    norm_error: float
    merge_error: float
    output_error: float
    gradient_error: float
    loss_gradient_error: float
    kkt: dict | None = None
    ncf: dict | None = None
    trajectory_errors: dict = dataclasses.field(default_factory=dict)
    trajectory_curves: dict = dataclasses.field(default_factory=dict, repr=False)
    settings: dict = dataclasses.field(default_factory=dict)

    def identities_hold(self, tol: float = 1e-10) -> bool:
        """Isometry, output and gradient errors all ``<= tol``."""
        return max(self.isometry_error, self.output_error, self.gradient_error, self.merge_error) <= tol

    def checks(self, *, tol: float = 1e-11, control: float = 1e-3, flow_tol: float | None = None) -> dict[str, bool]:
        """Verdicts: every exact trajectory error ``<= tol`` (the joint ``flow`` included: it shares every step, so it
        agrees to rounding), ``flow_separate`` ``<= flow_tol`` (default ``1e5 * rtol``: two adaptive solves take
        different steps and agree only to the global integration error), every negative control ``>= control``."""
        out = {}
        ft = flow_tol if flow_tol is not None else 1e5 * self.settings.get("rtol", 1e-10)
        for k, v in self.trajectory_errors.items():
            if k in NEGATIVE_CONTROLS:
                out[k] = v >= control
            else:
                out[k] = v <= (ft if k == "flow_separate" else tol)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON ready; curves left out)."""
        return {
            "properties": dict(self.properties),
            "isometry_error": self.isometry_error,
            "norm_error": self.norm_error,
            "merge_error": self.merge_error,
            "output_error": self.output_error,
            "gradient_error": self.gradient_error,
            "loss_gradient_error": self.loss_gradient_error,
            "kkt": self.kkt,
            "ncf": self.ncf,
            "trajectory_errors": dict(self.trajectory_errors),
            "settings": dict(self.settings),
        }


def trajectory_error(split: AbstractSplit, narrow_traj, wide_traj) -> np.ndarray:
    """``||eta(t_k) - T theta(t_k)||`` at the saved states of two runs saved at the same times/steps, shape (T,).

    Raises:
        ValueError: if the runs were not saved at the same times.
    """
    a, b = np.asarray(narrow_traj.ts), np.asarray(wide_traj.ts)
    if a.shape != b.shape or not np.allclose(a, b, rtol=1e-12, atol=0):
        raise ValueError("the narrow and wide trajectories must be saved at the same times to be compared.")
    mapped = split.map_trajectory(narrow_traj)
    return np.linalg.norm(np.asarray(wide_traj.thetas) - mapped, axis=1)


def _isometry(split, theta, n_random, max_entries, key):
    if split.n_narrow * split.n_wide <= max_entries:
        T = split.matrix(max_entries=max_entries)
        return float(np.max(np.abs(T.T @ T - np.eye(T.shape[1]))))
    V = jax.random.normal(key, (n_random, split.n_narrow), theta.dtype)
    back = jax.vmap(lambda v: split.merge_flat(split.apply_flat(v)))(V)
    return float(jnp.max(jnp.linalg.norm(back - V, axis=1) / jnp.linalg.norm(V, axis=1)))


@eqx.filter_jit
def _per_sample_grads(model, X):
    theta, unflatten = flatten(model)
    phi = lambda th, x: unflatten(th)(x)  # noqa: E731
    X = jnp.asarray(X, theta.dtype)
    return (jax.vmap(phi, in_axes=(None, 0))(theta, X), jax.vmap(jax.grad(phi), in_axes=(None, 0))(theta, X))


_margins_jac = eqx.filter_jit(lambda prob, theta: (prob.margins(theta), prob.jacobian(theta)))


def _margin_dict(r) -> dict:
    return {"eps": r.eps, "stationarity": r.stationarity, "feasibility": r.feasibility, "delta": r.delta,
            "slackness": r.slackness, "norm": float(np.linalg.norm(r.theta)),
            "multipliers_sum": float(r.multipliers.sum()),
            "support": [int(i) for i in r.support], "active_tol": r.active_tol}


def _kkt_transfer(split, start, data, *, given, tol, active_tol, ridge):
    """Narrow certificate, the wide point ``T theta*`` with the narrow multipliers, and its own re-certificate."""
    if given:
        n = max_margin_kkt(start, data, active_tol=1e-6 if active_tol is None else active_tol, ridge=ridge)
        converged = None
        engine = "given point, certified by homflow.kkt.max_margin_kkt"
    else:
        n = solve_max_margin(start, data, tol=tol, ridge=ridge)
        converged = n.converged
        if active_tol is not None:
            n = max_margin_kkt(n.model, data, active_tol=active_tol, ridge=ridge)
        engine = "homflow.kkt.solve_max_margin, re-certified on the wide net by homflow.kkt.max_margin_kkt"
    lam = n.multipliers
    wide_point = split(n.model)
    prob, th_w = make_margin_problem(wide_point, data)
    q_w, G_w = (np.asarray(a) for a in _margins_jac(prob, th_w))
    th_w = np.asarray(th_w)
    eps_same = float(np.linalg.norm(th_w - G_w.T @ lam))
    nrm_w = float(np.linalg.norm(th_w))
    delta_same = float(lam @ (q_w - 1.0))
    same = {"eps": eps_same, "stationarity": eps_same / nrm_w, "feasibility": float(max(0.0, np.max(1.0 - q_w))),
            "delta": delta_same, "slackness": delta_same / float(lam.sum()) if lam.sum() > 0 else 0.0, "norm": nrm_w}
    w = max_margin_kkt(wide_point, data, active_tol=n.active_tol, ridge=ridge)
    L = n.model.degree
    nrm2 = float(n.theta @ n.theta)
    return {
        "engine": engine,
        "narrow_converged": converged,
        "narrow": _margin_dict(n),
        "wide_same_multipliers": same,
        "wide_refit": _margin_dict(w),
        "multiplier_difference": float(np.max(np.abs(lam - w.multipliers))),
        "wide_point_error": float(np.linalg.norm(w.theta - np.asarray(split.apply_flat(jnp.asarray(n.theta))))),
        "norm_identity_error": float(abs(nrm2 - L * np.sum(lam)) / max(nrm2, 1e-300)),
        "stationarity_transfer_error": float(abs(eps_same - n.eps)),
    }


def _ncf_transfer(split, narrow, data, loss, ncf_point):
    if ncf_point is None:
        point = polish_ncf(narrow, data, loss=loss, second_order=False)
        model, certified = point.model, point.certified
    else:
        model, certified = ncf_point, None
    r_n, lam_n = (float(v) for v in ncf_kkt_residual(model, data, loss=loss))
    wide = split(model)
    r_w, lam_w = (float(v) for v in ncf_kkt_residual(wide, data, loss=loss))
    v_n = float(ncf(model, data, loss=loss, normalize=True))
    v_w = float(ncf(wide, data, loss=loss, normalize=True))
    return {"engine": "homflow.kkt.polish_ncf" if ncf_point is None else "given point", "narrow_certified": certified,
            "narrow_residual": r_n, "wide_residual": r_w, "narrow_lambda": lam_n, "wide_lambda": lam_w,
            "narrow_value": v_n, "wide_value": v_w, "lambda_difference": abs(lam_n - lam_w),
            "residual_difference": abs(r_n - r_w)}


def verify(
    split: AbstractSplit,
    narrow,
    data,
    *,
    loss="exponential",
    trajectories=DEFAULT_TRAJECTORIES,
    steps: int = 1000,
    lr: float = 0.1,
    batch_size: int = 16,
    t1: float = 10.0,
    rtol: float = 1e-10,
    error_norm: str = "narrow",
    solver=None,
    seed: int = 0,
    kkt: bool = True,
    kkt_point=None,
    kkt_tol: float = 1e-8,
    ncf: bool = True,
    ncf_point=None,
    active_tol: float | None = None,
    ridge: float = 1e-13,
    n_random: int = 8,
    max_entries: int = 4_000_000,
    save_every: int | None = None,
) -> EmbeddingReport:
    """Measure every identity of the embedding principle for ``split`` at the narrow network ``narrow`` on ``data``.

    Arguments:
        split: a split from :func:`split`, :func:`split_channel` or :func:`compose`; narrow: a network of its narrow
            architecture (``theta``); data: a ``Dataset``; loss: the training loss of the trajectories.
        trajectories: which runs to compare, a subset of ``TRAJECTORY_METHODS``: ``flow`` (gradient flow to ``t1``,
            narrow and wide integrated as ONE ODE in ``(theta, eta)`` by :func:`joint_flow` at ``rtol`` with the
            controller's ``error_norm`` (``'narrow'`` or ``'full'``): both share every step, so the error is at
            rounding level), ``flow_separate`` (two independent solves, :func:`homflow.flow.gradient_flow`: they choose
            their own steps and agree to the integration error, ~``1e5 rtol``; not run by default), ``gd`` (``steps``
            steps of size ``lr``), ``sgd`` (identical batches of ``batch_size``, replayed from the narrow run), and the
            negative controls ``sgd_shuffled`` (different batch orders) and ``adam``.
        solver: the solver of ``flow`` and ``flow_separate`` (default ``None``: :func:`homflow.flow.select_solver`'s
            choice, the non-smooth flow for ReLU-type networks, which takes ``error_norm='narrow'`` only).
        kkt: check the max-margin KKT transfer: the narrow KKT point is ``kkt_point`` (certified as given by
            :func:`homflow.kkt.max_margin_kkt`) or :func:`homflow.kkt.solve_max_margin` (to relative stationarity
            ``kkt_tol``) started from the last narrow GD / flow state that separates the data; it is mapped by ``T``
            and re-certified on the wide network by :func:`homflow.kkt.max_margin_kkt` with the narrow certificate's
            near-active tolerance, and the multipliers are compared.
        ncf: check the NCF KKT transfer at ``ncf_point`` (default: :func:`homflow.kkt.polish_ncf` from ``narrow``).
        active_tol: near-active threshold of the multipliers (default: that of the narrow certificate, 1e-6 for a
            given ``kkt_point``); ridge: see :func:`homflow.kkt.max_margin_kkt`.
        n_random, max_entries: the isometry is computed from the explicit matrix when it has at most ``max_entries``
            entries, from ``n_random`` vectors otherwise.

    Returns:
        An :class:`EmbeddingReport`.

    Raises:
        ValueError: an unknown trajectory method or error norm, or a narrow network / data that do not fit the split.
    """
    unknown = set(trajectories) - set(TRAJECTORY_METHODS)
    if unknown:
        raise ValueError(f"`trajectories` must be drawn from {TRAJECTORY_METHODS}; got unknown {sorted(unknown)}.")
    if error_norm not in ERROR_NORMS:
        raise ValueError(f"`error_norm` must be one of {ERROR_NORMS}; got {error_norm!r}.")
    loss = get_loss(loss)
    wide = split(narrow)
    theta = flatten(narrow)[0]
    Ttheta = split.apply_flat(theta)
    key = jax.random.PRNGKey(seed)
    iso = _isometry(split, theta, n_random, max_entries, key)
    norm_err = float(abs(jnp.linalg.norm(Ttheta) - jnp.linalg.norm(theta)))
    merge_err = float(jnp.linalg.norm(split.merge_flat(Ttheta) - theta))
    out_n, g_n = _per_sample_grads(narrow, data.X)
    out_w, g_w = _per_sample_grads(wide, data.X)
    Tg = jax.vmap(split.apply_flat)(g_n)
    out_err = float(jnp.max(jnp.abs(out_w - out_n)))
    grad_err = float(jnp.max(jnp.linalg.norm(g_w - Tg, axis=1)))
    y = jnp.asarray(data.y, theta.dtype)
    lossg = lambda o: jax.grad(lambda z: loss.value(z, y))(o)  # noqa: E731
    loss_grad_err = float(jnp.linalg.norm(lossg(out_w) @ g_w - split.apply_flat(lossg(out_n) @ g_n)))

    errors, curves, finals = {}, {}, [narrow]
    for method in trajectories:
        a, b = _runs(method, split, narrow, wide, data, loss, steps=steps, lr=lr, batch_size=batch_size, t1=t1,
                     rtol=rtol, error_norm=error_norm, solver=solver, seed=seed, save_every=save_every)
        e = trajectory_error(split, a, b)
        errors[method] = float(np.max(e))
        curves[method] = (np.asarray(a.steps if a.steps is not None else a.ts), e, a.loss, b.loss)
        if method in ("gd", "flow", "flow_separate"):
            finals.append(a.final)

    kkt_res = None
    if kkt:
        start = kkt_point
        if start is None:
            y = jnp.asarray(data.y, theta.dtype)
            sep = [m for m in finals if float(jnp.min(y * jax.vmap(m)(jnp.asarray(data.X, theta.dtype)))) > 0]
            start = sep[-1] if sep else None
        kkt_res = (_kkt_transfer(split, start, data, given=kkt_point is not None, tol=kkt_tol, active_tol=active_tol,
                                 ridge=ridge) if start is not None
                   else {"skipped": "no narrow network at hand separates the data (pass `kkt_point`, or train longer)"})
    ncf_res = _ncf_transfer(split, narrow, data, loss, ncf_point) if ncf else None
    settings = {"loss": loss.name, "steps": steps, "lr": lr, "batch_size": batch_size, "t1": t1, "rtol": rtol,
                "error_norm": error_norm, "seed": seed, "n_narrow": split.n_narrow, "n_wide": split.n_wide,
                "dtype": str(theta.dtype)}
    return EmbeddingReport(split.properties, iso, norm_err, merge_err, out_err, grad_err, loss_grad_err, kkt_res,
                           ncf_res, errors, curves, settings)


def _runs(method, split, narrow, wide, data, loss, *, steps, lr, batch_size, t1, rtol, error_norm, seed, save_every,
          solver=None):
    """The narrow and the wide run of one method, saved at the same steps/times."""
    ts = log_times(t1, 50)
    if method == "flow":
        return joint_flow(split, narrow, data, loss=loss, t1=t1, ts=ts, rtol=rtol, error_norm=error_norm,
                          solver=solver)
    if method == "flow_separate":
        kw = dict(loss=loss, t1=t1, rtol=rtol, ts=ts, time="linear", solver=solver)
        return gradient_flow(narrow, data, **kw), gradient_flow(wide, data, **kw)
    if method == "gd":
        kw = dict(loss=loss, lr=lr, steps=steps, save_every=save_every)
        return gradient_descent(narrow, data, **kw), gradient_descent(wide, data, **kw)
    if method in ("sgd", "sgd_shuffled"):
        bs = min(batch_size, data.n)
        b1 = sgd_batches(data.n, bs, steps, seed=seed)
        b2 = b1 if method == "sgd" else sgd_batches(data.n, bs, steps, seed=seed + 1)
        kw = dict(loss=loss, lr=lr, steps=steps, save_every=save_every)
        a = sgd(narrow, data, batches=b1, **kw)
        return a, sgd(wide, data, batches=a.extras["batches"] if method == "sgd" else b2, **kw)
    kw = dict(loss=loss, lr=lr, steps=steps, save_every=save_every)
    return adam(narrow, data, **kw), adam(wide, data, **kw)
