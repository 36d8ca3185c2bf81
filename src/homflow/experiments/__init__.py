"""Experiments: the registry of built-in reproductions, configs and the runner (presentation layer)."""

from ._registry import REGISTRY, Check, Context, Experiment, Figure, Outcome, check, get_experiment, register

__all__ = ["REGISTRY", "Check", "Context", "Experiment", "Figure", "Outcome", "check", "get_experiment", "register"]
