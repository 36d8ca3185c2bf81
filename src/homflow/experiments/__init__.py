"""Experiments: the registry of built-in reproductions, configs and the runner (presentation layer)."""

from ._config import ConfigError, RunConfig, config_to_toml, load_config, parse_config, set_dotted
from ._flowspec import CheckSpec, DataSpec, FlowExperimentConfig, FlowSpec, InitSpec, ModelSpec
from ._registry import REGISTRY, Check, Context, Experiment, Figure, Outcome, check, get_experiment, register
from ._runner import RunResult, execute, result_of, resume
from ._segments import segmented_flow

__all__ = [
    "REGISTRY",
    "Check",
    "Context",
    "Experiment",
    "Figure",
    "Outcome",
    "check",
    "get_experiment",
    "register",
    "ConfigError",
    "RunConfig",
    "DataSpec",
    "ModelSpec",
    "InitSpec",
    "FlowSpec",
    "CheckSpec",
    "FlowExperimentConfig",
    "load_config",
    "parse_config",
    "config_to_toml",
    "set_dotted",
    "RunResult",
    "execute",
    "resume",
    "result_of",
    "segmented_flow",
]
