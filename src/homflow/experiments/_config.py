"""Experiment configurations: TOML files and the same as frozen Python objects, validated with errors that say what
is allowed.

A run config names a registered experiment and gives its parameters::

    experiment = "flow"          # a built-in (``homflow list`` shows them); default "flow"
    name = "my-first-flow"       # optional label of the run
    seed = 0
    loss = "square"
    [data]   kind = "teacher_student", n = 40, d = 5, ...
    [model]  kind = "two_layer", width = 10, activation = "relu_power", p = 2
    [init]   scale = 1e-2        # delta = ||theta(0)||
    [flow]   t1 = 100.0, rtol = 1e-8, segments = 4
    [[checks]] metric = "balance_drift", tolerance = 1e-6

Every key except ``experiment`` and ``name`` is a parameter of the experiment, checked against its schema: the
frozen dataclasses of ``_flowspec.py`` for the user-described ``flow`` experiment, the registered defaults (their
types) for the other built-ins. Unknown keys are refused with a "did you mean"; wrong types and bad values name the key, the value
and what is allowed. All errors are :class:`ConfigError` (a ``ValueError``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Mapping

__all__ = [
    "ConfigError",
    "RunConfig",
    "load_config",
    "parse_config",
    "config_to_toml",
    "validate_params",
    "set_dotted",
    "RESERVED_KEYS",
    "SIZE_LIMITS",
    "check_data_file",
    "check_memory",
    "estimate_memory",
]

RESERVED_KEYS = ("experiment", "name", "quick")

# keys that, in any experiment's parameters, must be finite and > 0 (the initial scale delta, times, tolerances)
POSITIVE_KEYS = frozenset({"delta", "scale", "t1", "rtol", "lr", "t_escape", "eps", "level", "t_late", "tmax",
                           "t_max", "deltas"})

# sane upper bounds of integer sizes, by the last part of the key (``model.width``, ``data.n`` ...): far above any
# problem a gradient flow in float64 can integrate on one machine, low enough that a typo fails here and not after
# minutes of allocation (or with an abort inside XLA)
SIZE_LIMITS = {"width": 100_000, "widths": 100_000, "teacher_width": 100_000, "n": 10_000_000, "d": 1_000_000,
               "d_in": 1_000_000, "channels": 100_000, "kernel": 10_000, "depth": 1_000, "segments": 10_000,
               "n_save": 100_000, "max_steps": 10**9, "steps": 10**9, "save_every": 10**9, "n_directions": 10**7,
               "restarts": 100_000, "n_deltas": 10_000, "n_points": 1_000_000, "n_times": 1_000_000}
SEED_KEYS = frozenset({"seed", "seeds"})
SEED_MAX = 2**32 - 1  # NumPy and JAX seeds are unsigned 32-bit
# the largest estimated working memory of a run (bytes); ``$HOMFLOW_MAX_MEMORY_GB`` overrides it
MAX_MEMORY_BYTES = 16 * 2**30
# the most saved states of one flow (``segments * n_save``)
MAX_SAVED_STATES = 1_000_000
# the largest data file read at validation time
MAX_DATA_FILE_BYTES = 2 * 2**30


class ConfigError(ValueError):
    """A bad configuration: the message names the key, the value and what is allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        shown = key if key.isprintable() else repr(key)[1:-1]  # a key with a newline or tab stays on one line
        super().__init__(f"config key `{shown}`: {message}" if key else message)


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(v: Any) -> str:
    return f"{v!r} ({type(v).__name__})"


# ---------------------------------------------------------------------------------------------------------------------
# typed coercion of one value
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, str, bool, tuple[...], a spec dataclass, Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(key, f"got {_describe(value)}; allowed: {' or '.join(_tname(a) for a in args)}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false; got {_describe(value)}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer; got {_describe(value)}.")
        _int_bounds(key, value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number; got {_describe(value)}.")
        v = float(value)
        if not math.isfinite(v):
            raise ConfigError(key, f"must be a finite number; got {value!r}.")
        return v
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string; got {_describe(value)}.")
        if _leaf(key) == "path" and value:
            check_data_file(key, value)
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"must be a list; got {_describe(value)}.")
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return spec_from_dict(tp, value, key)
    if tp is Any:
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # pragma: no cover - programming error


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1].split("[")[0]


def _int_bounds(key: str, v: int) -> None:
    """Seeds in ``[0, 2**32)``; sizes (``SIZE_LIMITS``, by the key's last part) at most their limit."""
    leaf = _leaf(key)
    if leaf in SEED_KEYS and not 0 <= v <= SEED_MAX:
        raise ConfigError(key, f"must be a seed in [0, {SEED_MAX}]; got {v!r}.")
    limit = SIZE_LIMITS.get(leaf)
    if limit is not None and v > limit:
        raise ConfigError(key, f"must be at most {limit:,} (the size limit of `{leaf}`); got {v!r}.")


def check_data_file(key: str, path: str) -> None:
    """A data file named in a config must be a regular, non-empty file of at most ``MAX_DATA_FILE_BYTES`` that
    :func:`homflow.data.load` reads (real, finite arrays): checked before a run exists.

    Raises:
        ConfigError: naming the key, the path and what is wrong (a FIFO or directory is never opened).
    """
    import stat

    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(key, f"no such file: {path!r} ({e.strerror}).") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(key, f"must be a regular file; {path!r} is a "
                               f"{'directory' if stat.S_ISDIR(st.st_mode) else 'FIFO, socket or device'}.")
    if st.st_size == 0:
        raise ConfigError(key, f"{path!r} is empty (0 bytes).")
    if st.st_size > MAX_DATA_FILE_BYTES:
        raise ConfigError(key, f"{path!r} has {st.st_size:,} bytes; at most {MAX_DATA_FILE_BYTES:,} are read.")
    if not os.access(path, os.R_OK):
        raise ConfigError(key, f"{path!r} is not readable.")
    if path.endswith((".npz", ".csv")):
        from ..data import load

        try:
            load(path)
        except (ValueError, OSError, IndexError) as e:
            raise ConfigError(key, str(e)) from None


def _tname(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _positive(key: str, v: float, *, allow_zero: bool = False) -> None:
    if not (v > 0 or (allow_zero and v == 0)):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}; got {v!r}.")


def _at_least(key: str, v: int, minimum: int, note: str = "") -> None:
    if v < minimum:
        raise ConfigError(key, f"must be an integer >= {minimum}{note}; got {v!r}.")


def _choice(key: str, v: str, options) -> None:
    if v not in options:
        raise ConfigError(key, f"must be one of {tuple(options)}; got {v!r}.{_did_you_mean(v, options)}")


def spec_from_dict(cls, d: Any, path: str = ""):
    """Build the frozen dataclass ``cls`` from a mapping, refusing unknown keys (with a "did you mean") and wrong
    types; ``__post_init__`` of ``cls`` checks the values."""
    if not isinstance(d, Mapping):
        raise ConfigError(path, f"must be a table of keys {tuple(f.name for f in dataclasses.fields(cls))}; "
                                f"got {_describe(d)}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in d.items():
        if k not in fields:
            raise ConfigError(_join(path, str(k)), f"unknown key; allowed keys here: {tuple(fields)}."
                                                   f"{_did_you_mean(k, fields)}")
        out[k] = _coerce(v, hints[k], _join(path, k))
    try:
        return cls(**out, _path=path) if "_path" in {f.name for f in dataclasses.fields(cls)} else cls(**out)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - defensive
        raise ConfigError(path, str(e)) from None


# ---------------------------------------------------------------------------------------------------------------------
# generic validation against registered defaults
def validate_params(params: Mapping, defaults: Mapping, path: str = "") -> dict:
    """Check ``params`` against the types of ``defaults`` (recursively); return the merged dict.

    Unknown keys are refused with a "did you mean"; a number where a number is expected (an int where a float is
    expected is accepted), a string where a string is, lists by their elements' type; keys in ``POSITIVE_KEYS``
    (``delta``, ``t1``, ``rtol`` ...) must be > 0.
    """
    if not isinstance(params, Mapping):
        raise ConfigError(path, f"must be a table; got {_describe(params)}.")
    out = dict(defaults)
    for k, v in params.items():
        key = _join(path, str(k))
        if k not in defaults:
            raise ConfigError(key, f"unknown key; allowed keys here: {tuple(defaults)}.{_did_you_mean(k, defaults)}")
        out[k] = _check_like(v, defaults[k], key)
    return out


def _check_like(v: Any, default: Any, key: str) -> Any:
    leaf = key.rsplit(".", 1)[-1].split("[")[0]
    if isinstance(default, Mapping):
        return validate_params(v, default, key)
    if default is None:
        return v
    if isinstance(default, bool):
        return _coerce(v, bool, key)
    if isinstance(default, int):
        v = _coerce(v, int, key)
    elif isinstance(default, float):
        v = _coerce(v, float, key)
    elif isinstance(default, str):
        v = _coerce(v, str, key)
    elif isinstance(default, (list, tuple)):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(key, f"must be a list; got {_describe(v)}.")
        if default:
            v = [_check_like(x, default[0], f"{key}[{i}]") for i, x in enumerate(v)]
        return type(default)(v) if isinstance(default, tuple) else list(v)
    if leaf in POSITIVE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool):
        _positive(key, v)
    if isinstance(v, int) and not isinstance(v, bool):
        _int_bounds(key, v)
    if leaf == "path" and isinstance(v, str) and v:
        check_data_file(key, v)
    return v


def set_dotted(d: dict, dotted: str, value: Any) -> dict:
    """Return a copy of ``d`` with the nested key ``a.b.c`` set to ``value`` (intermediate tables created)."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(dotted, "is not a valid dotted key (e.g. 'init.scale').")
    out = dict(d)
    cur = out
    for p in parts[:-1]:
        nxt = cur.get(p)
        nxt = dict(nxt) if isinstance(nxt, Mapping) else {}
        cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value
    return out


# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What to run: a registered ``experiment``, its validated ``params`` (merged with the defaults, and with the
    quick overrides when ``quick``), and an optional ``name``."""

    experiment: str
    params: Mapping[str, Any]
    name: str | None = None
    quick: bool = False

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"experiment": self.experiment}
        if self.name:
            out["name"] = self.name
        if self.quick:
            out["quick"] = True
        out.update(_plain(self.params))
        return out

    def with_params(self, **updates) -> "RunConfig":
        return parse_config({**self.to_dict(), **updates})


def _plain(obj):
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


def parse_config(d: Mapping, *, quick: bool | None = None) -> RunConfig:
    """Validate a config mapping (as read from TOML) into a :class:`RunConfig`.

    Raises:
        ConfigError: unknown experiment or key (with a "did you mean"), wrong type, bad value, mismatched sizes.
    """
    from ._registry import get_experiment

    if not isinstance(d, Mapping):
        raise ConfigError("", f"a config must be a table of keys; got {_describe(d)}.")
    exp_name = d.get("experiment", "flow")
    if not isinstance(exp_name, str):
        raise ConfigError("experiment", f"must be the name of a built-in experiment (a string); got "
                                        f"{_describe(exp_name)}.")
    try:
        exp = get_experiment(exp_name)
    except ValueError as e:
        raise ConfigError("experiment", str(e)) from None
    name = d.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError("name", f"must be a string; got {_describe(name)}.")
    q = d.get("quick", False) if quick is None else quick
    if not isinstance(q, bool):
        raise ConfigError("quick", f"must be true or false; got {_describe(q)}.")
    if name is not None and (len(name) > 200 or any(not (c.isprintable() or c == " ") for c in name)):
        raise ConfigError("name", f"must be one line of at most 200 printable characters; got {name!r}.")
    raw = {k: v for k, v in d.items() if k not in RESERVED_KEYS}
    base = exp.params(None, quick=q)
    params = validate_params(raw, base)
    check_memory(params)
    if exp.validate is not None:
        try:
            exp.validate(params)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError("", str(e)) from None
    return RunConfig(exp_name, types.MappingProxyType(params), name, q)


def _get(d: Mapping, dotted: str, default=None):
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _num(v, default: int = 0) -> int:
    """``int(v)`` for a finite number, else ``default`` (the memory estimate runs before validation names bad values)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return default
    return int(v)


def estimate_memory(params: Mapping) -> int:
    """A rough working-memory estimate (bytes, float64) of a run with ``params``: the data ``n * d``, the hidden
    activations ``n * sum(widths)`` (a few copies for the gradient), the parameters ``P ~ sum(width * fan-in)`` and the
    saved states ``segments * n_save * P``. Keys that an experiment does not have count as 0 (or 1)."""
    n = _num(_get(params, "data.n"), 0)
    d = _num(_get(params, "data.d"), 0) or _num(_get(params, "model.d_in"), 0)
    widths = _get(params, "model.widths") or ()
    ws = [_num(w, 0) for w in widths] if isinstance(widths, (list, tuple)) and widths else \
        [_num(_get(params, "model.width"), 0)]
    fan = [max(d, 1)] + ws
    p = sum(w * f for w, f in zip(ws, fan)) + (ws[-1] if ws else 0)
    saved = max(_num(_get(params, "flow.segments"), 1), 1) * max(_num(_get(params, "flow.n_save"), 1), 1)
    return 8 * (n * max(d, 1) + 4 * n * sum(ws) + 8 * p + saved * p)


def check_memory(params: Mapping) -> None:
    """Refuse a run whose :func:`estimate_memory` exceeds ``MAX_MEMORY_BYTES`` (``$HOMFLOW_MAX_MEMORY_GB``) or whose
    saved states exceed ``MAX_SAVED_STATES``, naming the limit.

    Raises:
        ConfigError: the estimate, the limit, and how to raise it.
    """
    saved = max(_num(_get(params, "flow.segments"), 1), 1) * max(_num(_get(params, "flow.n_save"), 1), 1)
    if saved > MAX_SAVED_STATES:
        raise ConfigError("flow.n_save", f"segments * n_save = {saved:,} saved states; at most "
                                         f"{MAX_SAVED_STATES:,} are allowed.")
    env = os.environ.get("HOMFLOW_MAX_MEMORY_GB")
    try:
        limit = int(float(env) * 2**30) if env else MAX_MEMORY_BYTES
    except ValueError:
        limit = MAX_MEMORY_BYTES
    need = estimate_memory(params)
    if need > limit:
        raise ConfigError("", f"the run would need about {need / 2**30:.3g} GiB of memory (data n x d, widths, saved "
                              f"states); the limit is {limit / 2**30:.3g} GiB (set $HOMFLOW_MAX_MEMORY_GB to change "
                              f"it).")


def load_config(path: os.PathLike | str, *, quick: bool | None = None) -> RunConfig:
    """Read and validate a TOML config file.

    Raises:
        ConfigError: if the file is missing, not valid TOML, or the config is bad.
    """
    return parse_config(read_toml(path, "config"), quick=quick)


def read_toml(path: os.PathLike | str, what: str = "config") -> dict:
    """The table of a TOML file; a :class:`ConfigError` (not a traceback) if it is missing or not valid TOML."""
    import tomllib

    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise ConfigError("", f"the {what} file {path!r} is not a regular file (a directory, FIFO or device).")
    if not os.path.isfile(path):
        raise ConfigError("", f"{what} file not found: {path!r}.")
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("", f"{path!r} is not valid TOML: {e}.") from None
    except OSError as e:
        raise ConfigError("", f"cannot read the {what} file {path!r}: {e.strerror or e}.") from None
    if not d:
        raise ConfigError("", f"the {what} file {path!r} is empty; a config names at least its experiment "
                              f"(experiment = \"flow\", see examples/).")
    return d


def config_to_toml(cfg: RunConfig) -> str:
    """The TOML text of ``cfg`` (read back by :func:`load_config` to the same config)."""
    import tomli_w

    return tomli_w.dumps(_drop_none(cfg.to_dict()))


def _drop_none(obj):
    if isinstance(obj, Mapping):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj
