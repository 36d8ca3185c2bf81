"""A new hidden neuron at a saddle: its network increment, the residual's NCF restricted to it, and its insertion.

docs/math.md section 4 (arXiv 2509.12154, building on 2502.15952). Let ``H(w; x)`` be a bias-free MLP
``W_K sigma(... sigma(W_1 x))`` at a point ``w`` (a saddle reached by training) and add one neuron to hidden layer
``l`` (``1 <= l < K``): a new row ``a`` of ``W_l`` (in-weights, length ``h_{l-1}``) and a new column ``b`` of
``W_{l+1}`` (out-weights, length ``h_{l+1}``; ``h_K = 1``). The pre-activations of layer ``l + 1`` move by
``b sigma(a . f_{l-1}(x))`` (``f_{l-1}``: the post-activations feeding layer ``l``, ``f_0 = x``), and the output by, to
first order in ``b`` (a one-sided directional derivative where a unit of layer ``l + 1`` sits exactly on its kink),

    ``dH(x) = sigma(a . f_{l-1}(x)) (b . g_{l+1}(x) + relu(b) . h_{l+1}(x))``,

with ``g_{l+1}(x) = dH/dz_{l+1}`` (autodiff; slope 0 at a ReLU kink) and ``h_{l+1,k}(x) = dH/d(post-activation of
unit k)`` on the units whose pre-activation is exactly 0 (else 0). The kink term is exact for ReLU (``relu(c t) =
relu(c) t`` for ``t = sigma(.) >= 0``); it matters at a saddle of a narrow network, where whole layers are off on
many samples (a width-one layer: on every sample its neuron does not fire). For ``p >= 2`` the kink term vanishes;
for leaky ReLU (``alpha != 0``) it is not separable and is left out (the autodiff slope ``alpha`` is used): an
approximation, documented in ``docs/pursuit.md``. Near ``(w, 0)`` the small weights ``z = (a, b)`` follow
``dz/dt ~ grad_z N_r(z)`` with the *residual NCF*

    ``N_r(a, b) = sum_i r_i dH(x_i)``,   ``r_i = -dl/dPhi(H(w; x_i), y_i)``   (``r = y - H`` for the square loss),

positively homogeneous of order ``p + 1`` in ``z``; so they converge in direction to a KKT point of ``max N_r(z)``
s.t. ``||z|| = 1``. Neuron pursuit adds the neuron along such a point.

``N_r`` is the NCF (``sum_i ytilde_i Phi(z; x~_i)``) of the model :class:`NeuronIncrement` on the *lifted inputs*
``x~_i = (f_{l-1}(x_i), g_{l+1}(x_i), h_{l+1}(x_i))`` with labels ``ytilde = r``, so the kkt package's NCF machinery
(residuals, Hessians, ascent) applies unchanged.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ..activations import Activation
from ..data import Dataset
from ..losses import get_loss
from ..models import MLP, AbstractHomogeneousModel

__all__ = ["NeuronIncrement", "lifted_inputs", "residual_labels", "increment_ncf_data", "add_neuron", "hidden_layers"]


def hidden_layers(model: MLP) -> tuple[int, ...]:
    """The hidden layers ``l = 1 .. K-1`` of an MLP with ``K`` weight matrices (where a neuron can be added)."""
    return tuple(range(1, len(model.weights)))


def _check_mlp(model, name="model") -> MLP:
    if not isinstance(model, MLP):
        raise ValueError(f"`{name}` must be a homflow.models.MLP; got {type(model).__name__}.")
    if len(model.weights) < 2:
        raise ValueError(f"`{name}` has no hidden layer (widths={model.widths}); neuron pursuit adds hidden neurons.")
    return model


def _check_layer(model: MLP, layer) -> int:
    ok = hidden_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or int(layer) not in ok:
        raise ValueError(f"`layer` must be a hidden layer of the model, one of {ok}; got {layer!r}.")
    return int(layer)


class NeuronIncrement(AbstractHomogeneousModel):
    """``Phi(z; x~) = sigma(a . f) (b . g + relu(b) . h)`` with ``x~ = (f, g, h)`` of lengths ``(m, k, k)``: a new
    neuron's first-order change of the output on lifted inputs (see the module docstring). Order ``p + 1`` in
    ``z = (a, b)``.

    Fields: ``a`` (m,), ``b`` (k,), ``activation`` (static).

    >>> import jax.numpy as jnp
    >>> from homflow.activations import relu
    >>> inc = NeuronIncrement(jnp.array([1.0, -1.0]), jnp.array([2.0]), relu)
    >>> float(inc(jnp.array([3.0, 1.0, 0.5, 0.0])))  # relu(3 - 1) * (2 * 0.5 + relu(2) * 0)
    2.0
    """

    a: Float[Array, " m"]
    b: Float[Array, " k"]
    activation: Activation = eqx.field(static=True)

    @property
    def degree(self) -> int:
        return int(self.activation.degree) + 1

    @property
    def d_in(self) -> int:
        return self.a.shape[0] + 2 * self.b.shape[0]

    def __call__(self, x):
        m, k = self.a.shape[0], self.b.shape[0]
        out = jnp.dot(self.b, x[m : m + k]) + jnp.dot(jnp.where(self.b > 0, self.b, 0.0), x[m + k :])
        return self.activation(jnp.dot(self.a, x[:m])) * out


def _forward_with_shift(model: MLP, x, layer: int, e, post=None):
    """Output of ``model`` at ``x`` with ``e`` added to the pre-activations of layer ``layer + 1`` (1-based) and
    ``post`` (if given) to its post-activations."""
    h = x
    K = len(model.weights)
    for k, W in enumerate(model.weights, start=1):
        z = W @ h
        if k == layer + 1:
            z = z + e
        h = model.activation(z) if k < K else z
        if k == layer + 1 and post is not None and k < K:
            h = h + post
    return h[0]


def lifted_inputs(model: MLP, X: Float[Array, "n d"], layer: int) -> Float[Array, "n m+2k"]:
    """Rows ``x~_i = (f_{l-1}(x_i), g_{l+1}(x_i), h_{l+1}(x_i))`` for a new neuron in hidden layer ``layer``.

    ``f_{l-1}``: post-activations entering layer ``l`` (``f_0 = x``); ``g_{l+1} = dH/dz_{l+1}`` (reverse-mode
    autodiff, ``g_K = 1``); ``h_{l+1}``: ``dH/d(post-activation)`` on the units of layer ``l + 1`` whose pre-activation
    is exactly 0 (ReLU only; zero elsewhere and for other activations). See the module docstring.

    Raises:
        ValueError: if ``model`` is not an MLP with a hidden layer ``layer``.
    """
    model = _check_mlp(model)
    layer = _check_layer(model, layer)
    X = jnp.asarray(X, dtype=model.weights[0].dtype)
    K = len(model.weights)
    act = model.activation
    kinked = layer + 1 < K and act.degree == 1 and float(act.alpha) == 0.0

    def feats(x):
        h = x
        for W in model.weights[: layer - 1]:
            h = act(W @ h)
        k = model.weights[layer].shape[0]
        e0 = jnp.zeros((k,), x.dtype)
        g = jax.grad(lambda e: _forward_with_shift(model, x, layer, e))(e0)
        if kinked:
            hk = jax.grad(lambda q: _forward_with_shift(model, x, layer, e0, q))(e0)
            z = model.weights[layer] @ act(model.weights[layer - 1] @ h)
            hk = jnp.where(z == 0, hk, 0.0)
        else:
            hk = jnp.zeros_like(g)
        return jnp.concatenate([h, g, hk])

    return jax.vmap(feats)(X)


def residual_labels(model: AbstractHomogeneousModel, data: Dataset, loss="square") -> Float[Array, " n"]:
    """``r_i = -dl/dPhi`` at the current outputs (square loss: ``y_i - H(x_i)``; the NCF labels at ``Phi = 0``
    generalise to this at any point). docs/math.md section 4."""
    loss = get_loss(loss)
    out = jax.vmap(model)(jnp.asarray(data.X))
    y = jnp.asarray(data.y, dtype=out.dtype)
    return -jax.grad(lambda o: loss.value(o, y))(out)


def increment_ncf_data(model: MLP, data: Dataset, layer: int, loss="square") -> tuple[NeuronIncrement, Dataset]:
    """The pair ``(template, lifted)`` whose NCF (square-loss labels, ``ytilde = y``) is the residual NCF ``N_r`` of a
    new neuron in hidden layer ``layer``: pass them to :func:`homflow.kkt.solve_ncf` with ``loss='square'``.

    ``template`` is a :class:`NeuronIncrement` of the right sizes (zero weights: only its architecture is used);
    ``lifted`` holds the inputs of :func:`lifted_inputs` and the labels ``r`` of :func:`residual_labels`.
    """
    model = _check_mlp(model)
    layer = _check_layer(model, layer)
    data.check_model(model)
    Xl = lifted_inputs(model, data.X, layer)
    r = residual_labels(model, data, loss)
    dt = model.weights[0].dtype
    m, k = model.weights[layer - 1].shape[1], model.weights[layer].shape[0]
    template = NeuronIncrement(jnp.zeros((m,), dt), jnp.zeros((k,), dt), model.activation)
    return template, Dataset(Xl, r, dtype=dt)


def add_neuron(model: MLP, layer: int, a, b) -> MLP:
    """``model`` with one more neuron in hidden layer ``layer``: row ``a`` appended to ``W_l``, column ``b`` to
    ``W_{l+1}`` (every other weight unchanged). With ``b = 0`` the function is unchanged exactly.

    Raises:
        ValueError: for a layer that is not hidden or weights of the wrong length / not finite.
    """
    model = _check_mlp(model)
    layer = _check_layer(model, layer)
    Ws = list(model.weights)
    dt = Ws[0].dtype
    a = jnp.asarray(a, dtype=dt).ravel()
    b = jnp.asarray(b, dtype=dt).ravel()
    m, k = Ws[layer - 1].shape[1], Ws[layer].shape[0]
    if a.shape != (m,):
        raise ValueError(f"`a` (in-weights of the new neuron of layer {layer}) must have length {m}; got {a.shape}.")
    if b.shape != (k,):
        raise ValueError(f"`b` (out-weights of the new neuron of layer {layer}) must have length {k}; got {b.shape}.")
    if not (bool(jnp.all(jnp.isfinite(a))) and bool(jnp.all(jnp.isfinite(b)))):
        raise ValueError("`a` and `b` must be finite.")
    Ws[layer - 1] = jnp.concatenate([Ws[layer - 1], a[None, :]], axis=0)
    Ws[layer] = jnp.concatenate([Ws[layer], b[:, None]], axis=1)
    return MLP.from_weights(tuple(Ws), model.activation)
