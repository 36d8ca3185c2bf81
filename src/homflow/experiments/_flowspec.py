"""The schema of the user-described ``flow`` experiment as frozen dataclasses: data, model, initialisation, flow or
optimiser, checks. Built from TOML tables by :func:`homflow.experiments._config.spec_from_dict` (unknown keys refused
with a "did you mean", types checked); each ``__post_init__`` checks the values and names the key."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from ..flow import SOLVERS as _FLOW_SOLVERS
from ._config import ConfigError, _at_least, _choice, _positive, spec_from_dict

__all__ = ["DataSpec", "ModelSpec", "InitSpec", "FlowSpec", "CheckSpec", "FlowExperimentConfig", "FLOW_DEFAULTS",
           "DATA_KINDS", "MODEL_KINDS", "ACTIVATIONS", "LOSSES", "METHODS", "SOLVERS", "METRICS", "ANALYSES"]


DATA_KINDS = ("teacher_student", "gaussian_toy", "sphere", "digits", "file")
MODEL_KINDS = ("two_layer", "mlp", "diagonal_linear", "cnn")
ACTIVATIONS = ("relu", "leaky_relu", "relu_power", "leaky_relu_power", "linear")
LOSSES = ("square", "logistic", "exponential")
METHODS = ("flow", "gd", "sgd", "adam")
# the one table of solver names (homflow.flow.SOLVERS) and "default": homflow.flow.select_solver's choice (the
# non-smooth Clarke flow for ReLU / leaky-ReLU nets without stop events, else "auto"), the default
SOLVERS = ("default",) + tuple(_FLOW_SOLVERS)
METRICS = ("loss_final", "log_loss_final", "norm_final", "balance_drift", "normalized_margin_final",
           "smoothed_margin_final", "min_margin_final", "alignment_final", "success", "num_steps", "escape_time")
ANALYSES = ("loss_norm", "alignment", "margins", "balance", "neurons")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The data set: ``kind`` one of ``DATA_KINDS`` and its sizes (``file``: a ``.npz``/``.csv`` at ``path``)."""

    kind: str = "teacher_student"
    n: int = 40
    d: int = 5
    teacher_width: int = 3
    p: int = 2
    labels: str = "sign"
    noise: float = 0.0
    separable: bool = True
    classes: tuple[int, ...] = (3, 5)
    path: str = ""
    seed: int = 0
    _path: str = dataclasses.field(default="data", repr=False, compare=False)

    def __post_init__(self):
        P = self._path
        _choice(f"{P}.kind", self.kind, DATA_KINDS)
        _at_least(f"{P}.n", self.n, 2)
        _at_least(f"{P}.d", self.d, 1)
        _at_least(f"{P}.teacher_width", self.teacher_width, 1)
        _at_least(f"{P}.p", self.p, 1)
        _positive(f"{P}.noise", self.noise, allow_zero=True)
        allowed = {"teacher_student": ("sign", "value"), "sphere": ("random", "linear")}.get(self.kind)
        if allowed and self.labels not in allowed:
            _choice(f"{P}.labels", self.labels, allowed)
        if self.kind == "digits":
            if len(self.classes) != 2 or self.classes[0] == self.classes[1] or not all(0 <= c <= 9 for c in
                                                                                      self.classes):
                raise ConfigError(f"{P}.classes", f"must be two different digits in 0..9; got {list(self.classes)}.")
        if self.kind == "file":
            if not self.path:
                raise ConfigError(f"{P}.path", "must name a .npz or .csv file when kind = 'file'.")
            if not self.path.endswith((".npz", ".csv")):
                raise ConfigError(f"{P}.path", f"must end in .npz or .csv; got {self.path!r}.")
            if not os.path.exists(self.path):
                raise ConfigError(f"{P}.path", f"no such file: {self.path!r}.")

    @property
    def dim(self) -> int | None:
        """The input dimension when known without loading (``gaussian_toy``: 2, ``digits``: 64)."""
        return {"gaussian_toy": 2, "digits": 64, "teacher_student": self.d, "sphere": self.d}.get(self.kind)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The network: ``kind`` one of ``MODEL_KINDS``; ``d_in = 0`` means "the data's dimension", ``p = 0`` "the
    activation's own degree" (``activation = "relu"`` is ReLU, ``"relu_power"`` ReLU^2), no ``alpha`` "the leaky
    activation's own slope" (0.01)."""

    kind: str = "two_layer"
    width: int = 10
    widths: tuple[int, ...] = ()
    depth: int = 2
    activation: str = "relu_power"
    p: int = 0  # the activation's degree; 0: its own (1 for relu and leaky_relu, 2 for relu_power, leaky_relu_power)
    alpha: float | None = None  # the leaky activations' slope for z < 0; None: their own (0.01)
    d_in: int = 0
    input_shape: tuple[int, ...] = ()
    channels: tuple[int, ...] = (2,)
    kernel_size: int = 3
    _path: str = dataclasses.field(default="model", repr=False, compare=False)

    def __post_init__(self):
        P = self._path
        _choice(f"{P}.kind", self.kind, MODEL_KINDS)
        _choice(f"{P}.activation", self.activation, ACTIVATIONS)
        _at_least(f"{P}.width", self.width, 1)
        if any(w < 1 for w in self.widths):
            raise ConfigError(f"{P}.widths", f"must be positive integers; got {list(self.widths)}.")
        _at_least(f"{P}.depth", self.depth, 1)
        _at_least(f"{P}.p", self.p, 0, " (the activation's degree; 0: the activation's own)")
        if self.alpha is not None and not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"{P}.alpha", f"must be in [0, 1) (the leaky activations' slope for z < 0); got "
                                            f"{self.alpha!r}.")
        if self.d_in < 0:
            raise ConfigError(f"{P}.d_in", f"must be >= 0 (0: the data's dimension); got {self.d_in!r}.")
        if self.kind == "cnn":
            if len(self.input_shape) not in (1, 2, 3) or any(s < 1 for s in self.input_shape):
                raise ConfigError(f"{P}.input_shape", f"must be 1 to 3 positive sizes for a CNN; got "
                                                      f"{list(self.input_shape)}.")
            if not self.channels or any(c < 1 for c in self.channels):
                raise ConfigError(f"{P}.channels", f"must be positive integers; got {list(self.channels)}.")


@dataclasses.dataclass(frozen=True)
class InitSpec:
    """The initialisation ``theta(0) = scale * theta_hat`` (``||theta_hat|| = 1``, Gaussian direction from ``seed``)."""

    scale: float = 1e-2
    seed: int = 0
    _path: str = dataclasses.field(default="init", repr=False, compare=False)

    def __post_init__(self):
        _positive(f"{self._path}.scale", self.scale)


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    """How to train: the exact flow (``method = 'flow'``, integrated in ``segments`` equal segments with a checkpoint
    after each, by ``solver``: ``'default'``, the solver :func:`homflow.flow.gradient_flow` picks (the non-smooth
    :class:`homflow.flow.Clarke` for ReLU / leaky-ReLU networks without stop events, else ``'auto'``, homflow's
    stiff-aware engine), or a name of :data:`homflow.flow.SOLVERS` to force it) or a discrete method (``gd``,
    ``sgd``, ``adam`` with ``lr`` and ``steps``)."""

    method: str = "flow"
    t1: float = 100.0
    rtol: float = 1e-8
    atol: float = 0.0
    solver: str = "default"
    time: str = "auto"
    segments: int = 4
    n_save: int = 25
    max_steps: int = 1_000_000
    stop_loss: float = 0.0
    stop_norm: float = 0.0
    lr: float = 0.01
    steps: int = 1000
    save_every: int = 10
    batch_size: int = 0
    _path: str = dataclasses.field(default="flow", repr=False, compare=False)

    def __post_init__(self):
        P = self._path
        _choice(f"{P}.method", self.method, METHODS)
        _choice(f"{P}.solver", self.solver, SOLVERS)
        _choice(f"{P}.time", self.time, ("auto", "linear", "log"))
        _positive(f"{P}.t1", self.t1)
        _positive(f"{P}.rtol", self.rtol)
        if self.rtol < 1e-14:
            raise ConfigError(f"{P}.rtol", f"must be >= 1e-14 (float64 delivers no more); got {self.rtol!r}.")
        _positive(f"{P}.atol", self.atol, allow_zero=True)
        _positive(f"{P}.lr", self.lr)
        _positive(f"{P}.stop_loss", self.stop_loss, allow_zero=True)
        _positive(f"{P}.stop_norm", self.stop_norm, allow_zero=True)
        for k in ("segments", "n_save", "max_steps", "steps", "save_every"):
            _at_least(f"{P}.{k}", getattr(self, k), 1)
        if self.n_save < 2:
            raise ConfigError(f"{P}.n_save", f"must be >= 2 (saved states per segment); got {self.n_save!r}.")
        if self.batch_size < 0:
            raise ConfigError(f"{P}.batch_size", f"must be >= 0 (0: full batch); got {self.batch_size!r}.")


@dataclasses.dataclass(frozen=True)
class CheckSpec:
    """A check on a measured ``metric`` (one of ``METRICS``): passed when ``value relation tolerance``.

    Metrics, at the last saved state unless said otherwise: ``loss_final``, ``log_loss_final``, ``norm_final``;
    ``balance_drift`` (two-layer nets: ``max_t max_j |b_j(t) - b_j(0)| / max_t ||theta(t)||^2`` with the conserved
    ``b_j = p a_j^2 - ||w_j||^2``); ``normalized_margin_final`` (``q_min / ||theta||^L``), ``smoothed_margin_final``
    (Lyu & Li, arXiv 1906.05890), ``min_margin_final`` (NaN under the square loss); ``alignment_final`` (cosine of
    the last two saved directions); ``success`` (1 if the flow reached ``t1`` or its stop event); ``num_steps``;
    ``escape_time`` (first saved time with ``||theta|| >= 10 ||theta(0)||``, NaN if none). A NaN value fails.
    """

    metric: str = "loss_final"
    tolerance: float = 0.0
    relation: str = "<="
    name: str = ""
    _path: str = dataclasses.field(default="checks", repr=False, compare=False)

    def __post_init__(self):
        _choice(f"{self._path}.metric", self.metric, METRICS)
        _choice(f"{self._path}.relation", self.relation, ("<=", ">="))

    @property
    def label(self) -> str:
        return self.name or f"{self.metric} {self.relation} {self.tolerance:g}"


@dataclasses.dataclass(frozen=True)
class FlowExperimentConfig:
    """The user-described flow: data, model, initialisation, loss, flow or optimiser, analyses, checks."""

    seed: int = 0
    loss: str = "square"
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    init: InitSpec = InitSpec()
    flow: FlowSpec = FlowSpec()
    analyses: tuple[str, ...] = ("loss_norm", "alignment", "balance")
    checks: tuple[CheckSpec, ...] = ()

    def __post_init__(self):
        _choice("loss", self.loss, LOSSES)
        for i, a in enumerate(self.analyses):
            _choice(f"analyses[{i}]", a, ANALYSES)
        dim = self.data.dim
        if self.model.d_in and dim is not None and self.model.d_in != dim:
            raise ConfigError("model.d_in", f"is {self.model.d_in} but the data ({self.data.kind}) have dimension "
                                            f"{dim}; the sizes must match (or set d_in = 0 to take the data's).")
        if self.model.kind == "cnn" and dim is not None:
            prod = math.prod(self.model.input_shape)
            if prod != dim:
                raise ConfigError("model.input_shape", f"{list(self.model.input_shape)} holds {prod} values but the "
                                                       f"data have dimension {dim}; the sizes must match.")
        if self.loss != "square" and self.data.kind in ("teacher_student",) and self.data.labels == "value":
            raise ConfigError("data.labels", f"'value' gives real targets; the {self.loss} loss needs labels +-1: "
                                             "use labels = 'sign' or loss = 'square'.")
        if self.flow.method == "sgd" and self.flow.batch_size > self.data.n:
            raise ConfigError("flow.batch_size", f"is {self.flow.batch_size} but the data hold n = {self.data.n} "
                                                 "samples; the sizes must match (batch_size <= n).")

    @classmethod
    def from_dict(cls, d: Mapping) -> "FlowExperimentConfig":
        return spec_from_dict(cls, d, "")

    def to_dict(self) -> dict:
        return _spec_to_dict(self)


def _spec_to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _spec_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.name.startswith("_")}
    if isinstance(obj, tuple):
        return [_spec_to_dict(v) for v in obj]
    return obj


FLOW_DEFAULTS = FlowExperimentConfig().to_dict()
