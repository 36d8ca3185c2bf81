"""Neuron and channel splitting maps ``T`` (arXiv 2505.12419; docs/math.md §5) as linear maps on models and vectors.

Split hidden neuron ``j`` of layer ``k`` into ``m`` copies with coefficients ``c_1..c_m >= 0``, ``sum c_r^2 = 1``: row
``j`` of ``W_k`` becomes the rows ``c_r W_k[j, :]`` and column ``j`` of ``W_{k+1}`` the columns ``c_r W_{k+1}[:, j]``.
The copies take the places ``j, j+1, ..., j+m-1`` of the wide layer (later neurons move up by ``m - 1``). For a CNN,
output channel ``j`` of convolution ``k`` is split, with the matching input slices of convolution ``k+1`` (or of the
read-out). ``T`` is linear; with a 1-homogeneous activation it is an isometry that preserves outputs and gradients.
"""

from __future__ import annotations

import abc
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..models import CNN, MLP, AbstractHomogeneousModel, TwoLayer, flatten
from ._coeffs import DEFAULT_COEFF_TOL, check_coeffs, split_properties

__all__ = ["AbstractSplit", "NeuronSplit", "ComposedSplit", "split", "split_channel", "split_every", "compose"]


def _signature(model) -> tuple:
    """What makes two models the same architecture: type, static fields and leaf shapes."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    shapes = tuple(x.shape for x in jax.tree_util.tree_leaves(params))
    return type(model), jax.tree_util.tree_structure(static), shapes


def _describe(model) -> str:
    if isinstance(model, TwoLayer):
        return f"TwoLayer(d_in={model.d_in}, width={model.width})"
    if isinstance(model, MLP):
        return f"MLP(d_in={model.d_in}, widths={model.widths})"
    if isinstance(model, CNN):
        return f"CNN(input_shape={model.input_shape}, channels={model.channels})"
    return type(model).__name__


class AbstractSplit(eqx.Module):
    """A linear embedding ``T`` of a narrow architecture into a wider one.

    Concrete splits define :meth:`__call__` (narrow model -> wide model) and :attr:`source` (a narrow model that fixes
    the narrow architecture). Everything else (vectors, trajectories, the matrix, the merge ``T^T``, composition) is
    derived here.
    """

    @property
    @abc.abstractmethod
    def source(self) -> AbstractHomogeneousModel:
        """The narrow model the split was built from (it fixes the narrow architecture)."""

    @abc.abstractmethod
    def _apply(self, model):
        ...

    @property
    @abc.abstractmethod
    def properties(self) -> dict[str, bool]:
        """``preserves_outputs``, ``isometric`` and ``preserves_gradients`` (hence KKT points and trajectories)."""

    def __call__(self, narrow: AbstractHomogeneousModel) -> AbstractHomogeneousModel:
        """``T`` applied to a narrow model: the wide model with split weights.

        Raises:
            ValueError: if ``narrow`` is not of the split's narrow architecture.
        """
        if _signature(narrow) != _signature(self.source):
            raise ValueError(
                f"this split is defined on {_describe(self.source)}; got a model of another architecture: "
                f"{_describe(narrow)}."
            )
        return self._apply(narrow)

    @property
    def wide(self) -> AbstractHomogeneousModel:
        """The split of :attr:`source` (it fixes the wide architecture)."""
        return self._apply(self.source)

    @property
    def preserves_outputs(self) -> bool:
        return self.properties["preserves_outputs"]

    @property
    def isometric(self) -> bool:
        return self.properties["isometric"]

    @property
    def preserves_gradients(self) -> bool:
        return self.properties["preserves_gradients"]

    @property
    def n_narrow(self) -> int:
        """Number of parameters ``P`` of the narrow architecture."""
        return int(flatten(self.source)[0].size)

    @property
    def n_wide(self) -> int:
        """Number of parameters ``P~`` of the wide architecture."""
        return int(flatten(self.wide)[0].size)

    def apply_flat(self, theta):
        """``T theta``: narrow parameter vector (P,) -> wide parameter vector (P~,) (jit/vmap friendly)."""
        theta = jnp.asarray(theta)
        if theta.shape != (self.n_narrow,):
            raise ValueError(f"`theta` must have shape ({self.n_narrow},) (the narrow parameters); got {theta.shape}.")
        return flatten(self._apply(flatten(self.source)[1](theta)))[0]

    def merge_flat(self, theta_wide):
        """``T^T theta~``: the transpose of :meth:`apply_flat` (the merge; a left inverse of ``T`` when isometric)."""
        theta_wide = jnp.asarray(theta_wide)
        if theta_wide.shape != (self.n_wide,):
            raise ValueError(
                f"`theta_wide` must have shape ({self.n_wide},) (the wide parameters); got {theta_wide.shape}."
            )
        return _merge_flat(self, theta_wide)

    def merge(self, wide: AbstractHomogeneousModel) -> AbstractHomogeneousModel:
        """``T^T`` on models: merge the copies of each split neuron back, ``w = sum_r c_r w_r``, ``a = sum_r c_r a_r``.

        For an isometric split ``merge(T(m)) == m``; on a wide model outside the image of ``T`` it is the
        orthogonal projection onto the image, read in narrow coordinates.
        """
        if _signature(wide) != _signature(self.wide):
            raise ValueError(
                f"`wide` must have the split's wide architecture {_describe(self.wide)}; got {_describe(wide)}."
            )
        return flatten(self.source)[1](self.merge_flat(flatten(wide)[0]))

    def matrix(self, *, max_entries: int = 10_000_000) -> np.ndarray:
        """The explicit matrix of ``T``, shape ``(P~, P)`` (columns ``T e_i``).

        Raises:
            ValueError: if ``P~ * P > max_entries`` (use :meth:`apply_flat` / :meth:`merge_flat` instead).
        """
        P, Pw = self.n_narrow, self.n_wide
        if P * Pw > max_entries:
            raise ValueError(
                f"the matrix of this split has {Pw} x {P} = {P * Pw} entries > `max_entries` = {max_entries}; "
                "use apply_flat / merge_flat, or raise max_entries."
            )
        dtype = flatten(self.source)[0].dtype
        return np.asarray(_matrix(self, jnp.eye(P, dtype=dtype)))

    def map_trajectory(self, trajectory) -> np.ndarray:
        """``T theta(t)`` for every saved state of a narrow :class:`~homflow.flow.Trajectory` (or an array (T, P)),
        shape (T, P~)."""
        thetas = getattr(trajectory, "thetas", trajectory)
        thetas = jnp.asarray(thetas)
        if thetas.ndim != 2 or thetas.shape[1] != self.n_narrow:
            raise ValueError(f"`trajectory` must hold narrow states of shape (T, {self.n_narrow}); got {thetas.shape}.")
        return np.asarray(_map_many(self, thetas))

    def __matmul__(self, other: "AbstractSplit") -> "ComposedSplit":
        """``s2 @ s1``: first ``s1``, then ``s2`` (``s2`` must be defined on ``s1``'s wide architecture)."""
        if not isinstance(other, AbstractSplit):
            return NotImplemented
        return compose(other, self)


@eqx.filter_jit
def _merge_flat(split, theta_wide):
    zero = jnp.zeros(split.n_narrow, theta_wide.dtype)
    (out,) = jax.linear_transpose(split.apply_flat, zero)(theta_wide)
    return out


@eqx.filter_jit
def _matrix(split, eye):
    return jax.vmap(split.apply_flat, out_axes=1)(eye)


@eqx.filter_jit
def _map_many(split, thetas):
    return jax.vmap(split.apply_flat)(thetas)


class NeuronSplit(AbstractSplit):
    """Split hidden neuron (or CNN channel) ``index`` of hidden layer ``layer`` into ``m`` copies.

    The copies' in-weights are multiplied by ``alpha_r`` and their out-weights by ``beta_r`` (the classical split:
    ``alpha = beta = c``). Build with :func:`split` or :func:`split_channel`.
    """

    source_model: AbstractHomogeneousModel
    layer: int = eqx.field(static=True)
    index: int = eqx.field(static=True)
    alpha: tuple[float, ...] = eqx.field(static=True)
    beta: tuple[float, ...] = eqx.field(static=True)
    tol: float = eqx.field(static=True, default=DEFAULT_COEFF_TOL)
    every: bool = eqx.field(static=True, default=False)

    @property
    def source(self):
        return self.source_model

    @property
    def copies(self) -> tuple[int, ...]:
        """Indices of the copies in the wide layer (of neuron ``index``; with ``every``, of neuron 0)."""
        return tuple(range(self.index, self.index + len(self.alpha)))

    @property
    def properties(self) -> dict[str, bool]:
        return split_properties(self.alpha, self.beta, self.source_model.activation.degree, self.tol)

    def _slots(self, model) -> tuple[Callable, int, Callable, int]:
        k = self.layer
        if isinstance(model, TwoLayer):
            return (lambda m: m.W), 0, (lambda m: m.a), 0
        if isinstance(model, MLP):
            return (lambda m: m.weights[k]), 0, (lambda m: m.weights[k + 1]), 1
        if len(model.kernels) > k + 1:
            return (lambda m: m.kernels[k]), 0, (lambda m: m.kernels[k + 1]), 1
        return (lambda m: m.kernels[k]), 0, (lambda m: m.readout), 0

    def _expand(self, arr, axis, coeffs):
        n = arr.shape[axis]
        j, m = self.index, len(coeffs)
        if self.every:
            idx, scale = np.repeat(np.arange(n), m), np.tile(np.asarray(coeffs), n)
        else:
            idx = np.concatenate([np.arange(j), np.full(m, j), np.arange(j + 1, n)])
            scale = np.concatenate([np.ones(j), np.asarray(coeffs), np.ones(n - j - 1)])
        shape = [1] * arr.ndim
        shape[axis] = -1
        return jnp.take(arr, idx, axis=axis) * jnp.asarray(scale.reshape(shape), dtype=arr.dtype)

    def _apply(self, model):
        get_in, ax_in, get_out, ax_out = self._slots(model)
        new_in = self._expand(get_in(model), ax_in, self.alpha)
        new_out = self._expand(get_out(model), ax_out, self.beta)
        return eqx.tree_at(lambda m: (get_in(m), get_out(m)), model, (new_in, new_out))

    def __repr__(self) -> str:
        kind = "channel" if isinstance(self.source_model, CNN) else "neuron"
        where = f"every {kind}" if self.every else f"{kind}={self.index}"
        return (f"NeuronSplit({_describe(self.source_model)}, layer={self.layer}, {where}, "
                f"alpha={self.alpha}, beta={self.beta})")


class ComposedSplit(AbstractSplit):
    """Splits applied one after the other (``splits[0]`` first); each is defined on the previous one's wide
    architecture. Build with :func:`compose` or ``s2 @ s1``."""

    splits: tuple[AbstractSplit, ...]

    def __check_init__(self):
        for i in range(1, len(self.splits)):
            prev, nxt = self.splits[i - 1], self.splits[i]
            if _signature(prev.wide) != _signature(nxt.source):
                raise ValueError(
                    f"split {i} is defined on {_describe(nxt.source)} but split {i - 1} produces "
                    f"{_describe(prev.wide)}; each split must act on the wide architecture of the one before."
                )

    @property
    def source(self):
        return self.splits[0].source

    @property
    def properties(self) -> dict[str, bool]:
        props = [s.properties for s in self.splits]
        return {k: all(p[k] for p in props) for k in props[0]}

    def _apply(self, model):
        for s in self.splits:
            model = s._apply(model)
        return model

    def __repr__(self) -> str:
        return "ComposedSplit(" + ", ".join(repr(s) for s in self.splits) + ")"


def compose(*splits: AbstractSplit) -> ComposedSplit:
    """The split doing ``splits[0]``, then ``splits[1]``, ... (``compose(s1, s2) == s2 @ s1``).

    Raises:
        ValueError: if a split is not defined on the previous one's wide architecture, or none is given.
    """
    flat: list[AbstractSplit] = []
    for s in splits:
        if not isinstance(s, AbstractSplit):
            raise ValueError(f"`compose` takes splits (from split / split_channel); got {s!r}.")
        flat.extend(s.splits if isinstance(s, ComposedSplit) else (s,))
    if not flat:
        raise ValueError("`compose` needs at least one split.")
    return ComposedSplit(tuple(flat))


def _check_index(name, value, n, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < n:
        raise ValueError(f"`{name}` must be an integer in 0..{n - 1} ({what}); got {value!r}.")
    return int(value)


def split(model, *, layer: int = 0, neuron: int, coeffs, out_coeffs=None, tol: float = DEFAULT_COEFF_TOL) -> NeuronSplit:
    """Split hidden neuron ``neuron`` of hidden layer ``layer`` of a :class:`TwoLayer` or :class:`MLP` into
    ``len(coeffs)`` copies (arXiv 2505.12419, docs/math.md section 5).

    Arguments:
        model: the narrow network (it fixes the architecture; the split maps any network of that architecture).
        layer: hidden layer, 0-based (layer ``k`` is the output of ``weights[k]``; a TwoLayer has only layer 0).
        neuron: index of the neuron in that layer.
        coeffs: ``c_r >= 0`` with ``sum c_r^2 = 1`` (zeros allowed: such a copy is a zero neuron that stays zero).
        out_coeffs: optional different out-weight coefficients ``beta_r`` (a rescaled split preserving outputs only,
            ``sum beta_r c_r^p = 1``: the only non-trivial output-preserving option for degree ``p != 1``).
        tol: tolerance on the coefficient identities.

    Returns:
        A :class:`NeuronSplit` ``s``: ``s(narrow) -> wide``, ``s.apply_flat``, ``s.merge``, ``s.matrix()``,
        ``s.map_trajectory``, ``s2 @ s``.

    Raises:
        ValueError: a model that is not a TwoLayer/MLP with a hidden layer, a bad layer/neuron index, or invalid
            coefficients (including a split that cannot preserve outputs for degree ``p != 1``).

    >>> import jax
    >>> from homflow.models import TwoLayer
    >>> from homflow.activations import relu
    >>> s = split(TwoLayer(2, 1, relu, key=jax.random.PRNGKey(0)), neuron=0, coeffs=[0.6, 0.8])
    >>> s.wide.width, s.matrix().shape
    (2, (6, 3))
    """
    if isinstance(model, TwoLayer):
        _check_index("layer", layer, 1, "a TwoLayer has one hidden layer")
        width = model.width
    elif isinstance(model, MLP):
        if not model.widths:
            raise ValueError("`model` is a linear MLP (widths=()); it has no hidden neuron to split.")
        layer = _check_index("layer", layer, len(model.widths), f"hidden layers of widths {model.widths}")
        width = model.widths[layer]
    elif isinstance(model, CNN):
        raise ValueError("`model` is a CNN: split one of its channels with `split_channel(cnn, layer=, channel=, ...)`.")
    else:
        raise ValueError(f"`model` must be a TwoLayer or an MLP; got {type(model).__name__}.")
    neuron = _check_index("neuron", neuron, width, f"layer {layer} has width {width}")
    alpha, beta = check_coeffs(coeffs, p=model.activation.degree, out_coeffs=out_coeffs, tol=tol)
    return NeuronSplit(model, int(layer), neuron, alpha, beta, float(tol))


def split_channel(cnn, *, layer: int = 0, channel: int, coeffs, out_coeffs=None,
                  tol: float = DEFAULT_COEFF_TOL) -> NeuronSplit:
    """Split output channel ``channel`` of convolution ``layer`` of a :class:`CNN` into ``len(coeffs)`` channels; the
    matching input slices of the next convolution (or of the read-out, for the last one) are split too.

    Arguments and returns as for :func:`split` (``channel`` in place of ``neuron``). Pooling is linear and acts on
    each channel alone, so the identities hold with pooling as well.

    Raises:
        ValueError: if ``cnn`` is not a CNN, for a bad layer/channel index, or for invalid coefficients.
    """
    if not isinstance(cnn, CNN):
        raise ValueError(f"`cnn` must be a homflow CNN (use `split` for TwoLayer / MLP); got {type(cnn).__name__}.")
    layer = _check_index("layer", layer, len(cnn.kernels), f"convolutions with channels {cnn.channels}")
    channel = _check_index("channel", channel, cnn.channels[layer], f"convolution {layer} has {cnn.channels[layer]}")
    alpha, beta = check_coeffs(coeffs, p=cnn.activation.degree, out_coeffs=out_coeffs, tol=tol)
    return NeuronSplit(cnn, int(layer), channel, alpha, beta, float(tol))


def split_every(model, *, layer: int = 0, coeffs, tol: float = DEFAULT_COEFF_TOL) -> NeuronSplit:
    """Split every neuron (MLP / TwoLayer) or channel (CNN) of hidden layer ``layer`` with the same ``coeffs``: width
    ``h`` becomes ``h * m`` (``m = len(coeffs)``), neuron ``j``'s copies at ``j*m .. j*m + m - 1`` (e.g. 128 -> 256
    neurons with ``coeffs = (1/sqrt 2, 1/sqrt 2)``). Equal to the composition of the ``h`` single splits, in one map.

    Raises:
        ValueError: as :func:`split` / :func:`split_channel`.
    """
    if isinstance(model, CNN):
        s = split_channel(model, layer=layer, channel=0, coeffs=coeffs, tol=tol)
    else:
        s = split(model, layer=layer, neuron=0, coeffs=coeffs, tol=tol)
    return NeuronSplit(s.source_model, s.layer, 0, s.alpha, s.beta, s.tol, every=True)
