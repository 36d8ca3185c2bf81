"""A catalogue of models x activations used by identity tests across the suite."""

import jax

from homflow.activations import leaky_relu, leaky_relu_power, linear, relu, relu_power
from homflow.models import CNN, MLP, DiagonalLinear, TwoLayer

ACTIVATIONS = {
    "relu": relu,
    "leaky_relu": leaky_relu(0.1),
    "relu2": relu_power(2),
    "relu3": relu_power(3),
    "leaky_relu2": leaky_relu_power(2, 0.2),
    "leaky_relu3": leaky_relu_power(3, 0.2),
    "linear": linear,
}


def build(kind: str, act, key, d: int = 6):
    """A small model of each kind with input dimension ``d`` (CNN: input (1, d) in 1-D, or (1, 2, d//2) in 2-D)."""
    if kind == "two_layer":
        return TwoLayer(d, 5, act, key=key)
    if kind == "mlp3":
        return MLP(d, (4, 3), act, key=key)
    if kind == "mlp4":
        return MLP(d, (3, 3, 2), act, key=key)
    if kind == "linear":
        return MLP(d, (), None, key=key)
    if kind == "cnn1d":
        return CNN((1, d), (3, 2), act, kernel_size=3, pool=2, key=key)
    if kind == "cnn2d":
        return CNN((1, 2, d // 2), (2,), act, kernel_size=3, key=key)
    if kind == "diag":
        return DiagonalLinear(d, 3, key=key)
    raise ValueError(kind)


KINDS = ("two_layer", "mlp3", "mlp4", "linear", "cnn1d", "cnn2d", "diag")


def expected_degree(kind: str, p: int) -> int:
    return {
        "two_layer": 1 + p,
        "mlp3": 1 + p + p**2,
        "mlp4": 1 + p + p**2 + p**3,
        "linear": 1,
        "cnn1d": 1 + p + p**2,
        "cnn2d": 1 + p,
        "diag": 3,
    }[kind]


def random_key(i: int):
    return jax.random.PRNGKey(i)
