"""Neuron pursuit (arXiv 2509.12154): a network grown one neuron at a time from the saddles of its training loss.

Each new neuron's in- and out-weights are a certified KKT point of the constrained NCF of the residual restricted to
that neuron (docs/math.md section 4); the enlarged network is then trained by gradient descent. See ``docs/pursuit.md``.
"""

from ._algorithm import (
    PursuitOptions,
    PursuitResult,
    PursuitStep,
    best_neuron,
    initial_network,
    neuron_pursuit,
    insertion_errors,
    relative_error,
    train,
)
from ._increment import NeuronIncrement, add_neuron, hidden_layers, increment_ncf_data, lifted_inputs, residual_labels
from ._targets import hypercube, labelled, paper_target, relu_teacher

__all__ = [
    "neuron_pursuit",
    "PursuitOptions",
    "PursuitResult",
    "PursuitStep",
    "initial_network",
    "best_neuron",
    "train",
    "insertion_errors",
    "relative_error",
    "NeuronIncrement",
    "add_neuron",
    "hidden_layers",
    "increment_ncf_data",
    "lifted_inputs",
    "residual_labels",
    "hypercube",
    "paper_target",
    "relu_teacher",
    "labelled",
]
