"""Imports every module that registers built-in experiments (each issue adds its own module here)."""

import importlib

_MODULES = ("flow", "embedding", "phases", "maxmargin", "demo", "census", "pursuit")

for _m in _MODULES:
    try:
        importlib.import_module(f"{__package__}.{_m}")
    except ModuleNotFoundError as e:  # a module not written yet
        if e.name != f"{__package__}.{_m}":
            raise
