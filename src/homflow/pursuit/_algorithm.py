"""Neuron pursuit (arXiv 2509.12154): grow a bias-free MLP one neuron at a time from the saddles of its training loss.

The algorithm (docs/math.md section 4):

0. Start from the network with one neuron per hidden layer, at ``init_scale * u_0`` where ``u_0`` is the best KKT point
   of the constrained NCF ``max N(u) = sum_i ytilde_i H(u; x_i)`` s.t. ``||u|| = 1`` of that width-one network (the
   direction gradient flow from a tiny initialisation aligns with; arXiv 2403.08121), and minimise the training loss by
   gradient descent: the flow escapes the origin along ``u_0`` and stops at a saddle.
1. At the current point ``w`` compute the residual ``r_i = -dl/dPhi(H(w; x_i), y_i)`` (``y - H`` for the square loss).
   For every hidden layer ``l`` (or the one given) find the KKT points of the residual NCF of a new neuron of layer
   ``l`` (:mod:`homflow.pursuit._increment`), ``max N_r(a, b)`` s.t. ``||(a, b)|| = 1``, with
   :func:`homflow.kkt.solve_ncf` (many starts, polish, certificate); keep the point of largest ``N_r`` over the
   layers.
2. Add the neuron with weights ``add_scale * (a*, b*)``: the loss drops by ``add_scale^(p+1) N_r(a*, b*)`` to leading
   order, and gradient flow from there leaves the saddle along the new neuron (arXiv 2509.12154, Thm 7).
3. Minimise the training loss of the enlarged network by gradient descent; repeat 1-3 until the training loss is
   below ``loss_tol``, no positive KKT point remains (``N_r <= 0``: no neuron can decrease the loss at first order),
   or ``max_neurons`` neurons were added.

What the sources available here state, and what is a documented choice, is listed in ``docs/pursuit.md``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..activations import get_activation
from ..data import Dataset
from ..flow import gradient_descent
from ..kkt import NCFPoint
from ..losses import get_loss
from ..models import MLP, predict, with_norm
from ._increment import add_neuron, hidden_layers, increment_ncf_data
from ._kkt import increment_kkt, width_one_kkt

__all__ = ["PursuitOptions", "PursuitStep", "PursuitResult", "neuron_pursuit", "initial_network", "best_neuron",
           "train", "relative_error"]


@dataclasses.dataclass(frozen=True)
class PursuitOptions:
    """Settings of :func:`neuron_pursuit` (defaults: the worked example of arXiv 2509.12154 on this CPU).

    Attributes:
        depth: number of weight layers ``K`` (hidden layers ``K - 1``); the paper's example: 3.
        activation: a homogeneous activation (name or object), default ``'relu'``.
        loss: ``'square'`` (regression, as in the paper's example), ``'logistic'`` or ``'exponential'``.
        max_neurons: at most this many neurons are added after the initial network.
        init_scale: ``||theta||`` of the initial width-one network (a multiple of its NCF KKT direction).
        add_scale: ``||(a, b)||`` of each added neuron. Small, so that training starts near the saddle as the theory
            assumes, large enough that the escape does not eat the step budget (it costs ``~ log(1/add_scale)``).
        lr: gradient-descent step on the *mean* loss (homflow's losses are sums: the sum is run with ``lr / n``).
        steps: gradient-descent steps after each addition (and for the initial network).
        layer: ``'best'`` (the hidden layer whose best KKT point has the largest ``N_r``) or a fixed hidden layer.
        n_starts, ascent_steps: random starts and Riemannian ascent iterations (:func:`homflow.kkt.sphere_ascent`).
        polish_keep: the best ``polish_keep`` ascent end points are polished into exact KKT points.
        kkt_rtol: certificate tolerance of the KKT points (``None``: the kkt package's default, ``1000 eps``).
        loss_tol: stop when the mean training loss is ``<= loss_tol``.
        ncf_rtol: stop when the best ``N_r <= ncf_rtol * sum_i |r_i| * max_i ||x~_i||^(p+1)`` (no positive KKT point).
        seed: PRNG seed of the NCF starts.
    """

    depth: int = 3
    activation: object = "relu"
    loss: str = "square"
    max_neurons: int = 8
    init_scale: float = 0.1
    add_scale: float = 0.01
    lr: float = 0.05
    steps: int = 4000
    layer: object = "best"
    n_starts: int = 16
    ascent_steps: int = 300
    polish_keep: int = 4
    kkt_rtol: float | None = None
    loss_tol: float = 1e-6
    ncf_rtol: float = 1e-9
    seed: int = 0

    def __post_init__(self):
        for k in ("depth", "max_neurons", "steps", "n_starts", "ascent_steps", "polish_keep"):
            v = getattr(self, k)
            lo = 2 if k == "depth" else (0 if k == "max_neurons" else 1)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"`{k}` must be an integer >= {lo}; got {v!r}.")
        for k in ("init_scale", "add_scale", "lr", "loss_tol", "ncf_rtol"):
            v = getattr(self, k)
            if not (isinstance(v, (int, float, np.floating)) and math.isfinite(float(v)) and v > 0):
                raise ValueError(f"`{k}` must be a finite number > 0; got {v!r}.")
        if self.kkt_rtol is not None and not self.kkt_rtol > 0:
            raise ValueError(f"`kkt_rtol` must be > 0 or None; got {self.kkt_rtol!r}.")
        if not (self.layer == "best" or (isinstance(self.layer, (int, np.integer)) and not isinstance(self.layer, bool)
                                         and 1 <= self.layer < self.depth)):
            raise ValueError(f"`layer` must be 'best' or a hidden layer 1 .. {self.depth - 1}; got {self.layer!r}.")
        get_loss(self.loss)
        get_activation(self.activation)


@dataclasses.dataclass(frozen=True)
class PursuitStep:
    """One iteration: the neuron chosen, its certificate, and the loss before and after.

    Attributes:
        iteration: 0 for the initial width-one network, then 1, 2, ...
        layer: hidden layer the neuron went to (``None`` for iteration 0).
        widths: hidden widths after this iteration.
        point: the KKT point used (iteration 0: of the width-one network's NCF; later: of the residual NCF of the new
            neuron, parameters ``(a, b)``), an :class:`homflow.kkt.NCFPoint` with ``value``, ``residual``,
            ``relative_residual`` and ``certified`` (the residual is the smallest over the Clarke subdifferential
            where samples sit on a ReLU kink).
        certificate: ``autodiff_residual`` (slope ``alpha`` at kinks), ``clarke_residual``, ``ties`` (samples on a
            kink) and ``second_order`` (class of the Riemannian Hessian).
        layer_values: best ``N_r`` found in each candidate layer.
        loss_before: mean training loss at the saddle, before the addition (iteration 0: at the origin).
        loss_inserted: mean training loss right after inserting the neuron at ``add_scale``.
        loss_after: mean training loss after gradient descent.
        loss_curve: mean training loss along gradient descent (saved points), ``curve_steps`` their step indices.
        grad_evals: loss-gradient evaluations of the descent; ncf_evals: NCF-gradient evaluations of the ascent.
        model: the network after this iteration.
        seconds: wall time of the KKT search and of the descent.
    """

    iteration: int
    layer: int | None
    widths: tuple[int, ...]
    point: NCFPoint
    certificate: dict
    layer_values: dict
    loss_before: float
    loss_inserted: float
    loss_after: float
    loss_curve: np.ndarray
    curve_steps: np.ndarray
    grad_evals: int
    ncf_evals: int
    model: MLP
    seconds: dict


@dataclasses.dataclass(frozen=True)
class PursuitResult:
    """The iterations of :func:`neuron_pursuit` and why it stopped."""

    steps: tuple[PursuitStep, ...]
    stop_reason: str
    options: PursuitOptions

    @property
    def model(self) -> MLP:
        """The final network."""
        return self.steps[-1].model

    @property
    def widths(self) -> tuple[int, ...]:
        return self.steps[-1].widths

    @property
    def losses(self) -> np.ndarray:
        """Mean training loss after each iteration."""
        return np.array([s.loss_after for s in self.steps])

    @property
    def grad_evals(self) -> int:
        return int(sum(s.grad_evals for s in self.steps))

    @property
    def ncf_evals(self) -> int:
        return int(sum(s.ncf_evals for s in self.steps))


def _mean_loss(loss, model, data) -> float:
    out = predict(model, data.X)
    return float(loss.value(out, jnp.asarray(data.y, out.dtype))) / data.n


def insertion_errors(result: PursuitResult, data: Dataset, factors=(1.0, 0.5)) -> np.ndarray:
    """Relative errors of the leading-order loss drop of each insertion, at scales ``d = add_scale * factor``.

    Inserting neuron ``k`` (KKT point ``z`` of the residual NCF ``N_r``) at scale ``d`` into the network at its saddle
    changes the mean loss by ``-(d^2 / n) N_r(z)`` plus a remainder: ``O(d^4)`` when no downstream unit sits on a kink
    (the new neuron's output is 2-homogeneous in ``d``, the loss smooth in it), ``O(d^3)`` otherwise. So the relative
    error ``|n (L(w) - L(w + d z)) - d^2 N_r(z)| / (d^2 N_r(z))`` is ``O(d^2)`` (``O(d)`` at kinks): halving ``d`` divides
    it by 4 (2). Returns an (iterations - 1, len(factors)) array.
    """
    loss = get_loss(result.options.loss)
    out = np.zeros((max(len(result.steps) - 1, 0), len(factors)))
    for k, step in enumerate(result.steps[1:]):
        base = result.steps[k].model
        m = base.weights[step.layer - 1].shape[1]
        u = np.asarray(step.point.theta)
        before = _mean_loss(loss, base, data)
        for j, f in enumerate(factors):
            d = result.options.add_scale * float(f)
            grown = add_neuron(base, step.layer, d * u[:m], d * u[m:])
            pred = d ** 2 * float(step.point.value)
            out[k, j] = abs(data.n * (before - _mean_loss(loss, grown, data)) - pred) / max(pred, np.finfo(float).tiny)
    return out


def relative_error(model, target: Callable, X) -> float:
    """``sum_i (model(x_i) - target(x_i))^2 / sum_i target(x_i)^2`` on the inputs ``X`` (e.g. fresh test points)."""
    X = jnp.asarray(X)
    f = np.asarray(predict(target, X)) if hasattr(target, "d_in") else np.asarray(target(X))
    g = np.asarray(predict(model, X))
    return float(np.sum((g - f) ** 2) / max(np.sum(f**2), np.finfo(f.dtype).tiny))


def train(model: MLP, data: Dataset, *, loss="square", lr: float, steps: int, save_every: int | None = None):
    """Gradient descent on the mean loss with step ``lr`` (run as the sum loss with step ``lr / n``); returns
    ``(model, mean-loss curve, step indices, gradient evaluations)``."""
    tr = gradient_descent(model, data, loss=loss, lr=lr / data.n, steps=int(steps), save_every=save_every)
    ok = tr.success if hasattr(tr, "success") else tr.result.success  # RESULTS-era and earlier trajectories
    if not ok:
        reason = getattr(tr, "reason", "") or getattr(tr.result, "reason", "")
        raise RuntimeError(f"gradient descent failed ({reason}); lower `lr`.")
    return tr.final, np.asarray(tr.loss) / data.n, np.asarray(tr.steps), int(tr.stats["grad_evals"])


def initial_network(data: Dataset, opts: PursuitOptions, key):
    """Step 0: the width-one network at ``init_scale`` times the best KKT point of its constrained NCF of ``y``.
    Returns ``(model, point, certificate, NCF evaluations)``."""
    act = get_activation(opts.activation)
    template = MLP(data.d, (1,) * (opts.depth - 1), act, key=jax.random.PRNGKey(0), dtype=data.X.dtype)
    pt, cert = width_one_kkt(template, data, opts.loss, key=key, n_starts=opts.n_starts, ascent_steps=opts.ascent_steps,
                       rtol=opts.kkt_rtol)
    if not pt.value > 0:
        raise RuntimeError("the width-one network's NCF has no positive KKT point: the labels are uncorrelated with "
                           "every width-one network, so gradient flow from a small initialisation does not escape.")
    return with_norm(pt.model, opts.init_scale), pt, cert, opts.n_starts * opts.ascent_steps


def best_neuron(model: MLP, data: Dataset, opts: PursuitOptions, key):
    """Step 1: the new neuron. Returns ``(layer, point, certificate, values by layer, NCF evaluations, threshold)``,
    where
    ``point`` holds ``(a, b)`` concatenated and ``threshold`` is the ``N_r`` below which no neuron helps."""
    layers = hidden_layers(model) if opts.layer == "best" else (int(opts.layer),)
    best, values, evals, thr = None, {}, 0, 0.0
    for layer in layers:
        key, sub = jax.random.split(key)
        template, lifted = increment_ncf_data(model, data, layer, opts.loss)
        (pt, cert), _ = increment_kkt(template, lifted, key=sub, n_starts=opts.n_starts, ascent_steps=opts.ascent_steps,
                                      rtol=opts.kkt_rtol, keep=opts.polish_keep)
        evals += opts.n_starts * opts.ascent_steps
        scale = float(jnp.sum(jnp.abs(lifted.y)) * jnp.max(jnp.linalg.norm(lifted.X, axis=1)) ** template.degree)
        thr = max(thr, opts.ncf_rtol * scale)
        values[layer] = pt.value
        if best is None or pt.value > best[1].value:
            best = (layer, pt, cert)
    return best[0], best[1], best[2], values, evals, thr


def neuron_pursuit(data: Dataset, options: PursuitOptions | None = None, *, progress=None,
                   **overrides) -> PursuitResult:
    """Learn a bias-free MLP by neuron pursuit (arXiv 2509.12154; docs/math.md section 4).

    Arguments:
        data: the training set; options: a :class:`PursuitOptions` (``overrides`` replace single fields).
        progress: optional ``progress(fraction, message)`` callback.

    Returns:
        A :class:`PursuitResult`: every iteration's KKT point with its certificate, the layer chosen, the losses
        before and after, the networks, and the reason it stopped.

    Raises:
        ValueError: for bad options; RuntimeError: if the descent diverges (lower ``lr``) or the width-one NCF has no
        positive KKT point.

    >>> import homflow; homflow.enable_x64()
    >>> from homflow.pursuit import hypercube, relu_teacher, labelled
    >>> data = labelled(relu_teacher(5, 1, seed=1), hypercube(200, 5, seed=0))
    >>> res = neuron_pursuit(data, depth=2, max_neurons=1, steps=1500, n_starts=8, ascent_steps=200)
    >>> res.widths, res.stop_reason.startswith("training loss")
    ((1,), True)
    """
    opts = options or PursuitOptions()
    if overrides:
        opts = dataclasses.replace(opts, **overrides)
    loss = get_loss(opts.loss)
    data.check_for(loss)
    prog = progress or (lambda f, m: None)
    key = jax.random.PRNGKey(opts.seed)
    total = opts.max_neurons + 1

    prog(0.0, "iteration 0: KKT point of the width-one network's NCF")
    key, sub = jax.random.split(key)
    t0 = time.perf_counter()
    model, pt, cert, nev = initial_network(data, opts, sub)
    t1 = time.perf_counter()
    l0 = float(loss.value(jnp.zeros(data.n, data.X.dtype), jnp.asarray(data.y))) / data.n
    lin = _mean_loss(loss, model, data)
    model, curve, cs, gev = train(model, data, loss=loss, lr=opts.lr, steps=opts.steps)
    steps = [PursuitStep(0, None, model.widths, pt, cert, {}, l0, lin, float(curve[-1]), curve, cs, gev, nev, model,
                         {"kkt": t1 - t0, "descent": time.perf_counter() - t1})]
    reason = f"added max_neurons = {opts.max_neurons} neurons"
    for it in range(1, total + 1):
        if steps[-1].loss_after <= opts.loss_tol:
            reason = f"training loss {steps[-1].loss_after:.3g} <= loss_tol = {opts.loss_tol:g}"
            break
        if it == total:
            break
        prog(it / total, f"iteration {it}: KKT points of the residual NCF of a new neuron")
        key, sub = jax.random.split(key)
        t0 = time.perf_counter()
        layer, pt, cert, values, nev, thr = best_neuron(model, data, opts, sub)
        t1 = time.perf_counter()
        if not pt.value > thr:
            reason = (f"no positive KKT point of the residual NCF (best N_r = "
                      f"{max(values.values()) if values else float('nan'):.3g} <= {thr:.3g}): a saddle-free point")
            break
        m = model.weights[layer - 1].shape[1]
        u = np.asarray(pt.theta)
        before = steps[-1].loss_after
        model = add_neuron(model, layer, opts.add_scale * u[:m], opts.add_scale * u[m:])
        lin = _mean_loss(loss, model, data)
        model, curve, cs, gev = train(model, data, loss=loss, lr=opts.lr, steps=opts.steps)
        steps.append(PursuitStep(it, layer, model.widths, pt, cert, values, before, lin, float(curve[-1]), curve, cs,
                                 gev, nev, model, {"kkt": t1 - t0, "descent": time.perf_counter() - t1}))
    prog(1.0, f"neuron pursuit stopped: {reason}")
    return PursuitResult(tuple(steps), reason, opts)
