"""Experiment configs: TOML round trip, frozen objects, and bad input refused with a ConfigError naming the key."""

import dataclasses

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from homflow.experiments import (
    ConfigError,
    FlowExperimentConfig,
    config_to_toml,
    load_config,
    parse_config,
    set_dotted,
)
from homflow.experiments._config import validate_params
from homflow.experiments._flowspec import FLOW_DEFAULTS

GOOD = {
    "experiment": "flow",
    "name": "t",
    "loss": "square",
    "data": {"kind": "teacher_student", "n": 12, "d": 3, "labels": "value"},
    "model": {"kind": "two_layer", "width": 4, "activation": "relu_power", "p": 2},
    "init": {"scale": 1e-2, "seed": 1},
    "flow": {"t1": 5.0, "segments": 2, "n_save": 5},
    "checks": [{"metric": "balance_drift", "tolerance": 1e-6}],
}


def test_roundtrip_toml(tmp_path):
    cfg = parse_config(GOOD)
    p = tmp_path / "c.toml"
    p.write_text(config_to_toml(cfg))
    again = load_config(p)
    assert again.to_dict() == cfg.to_dict()
    spec = FlowExperimentConfig.from_dict(dict(cfg.params))
    assert spec.init.scale == 1e-2 and spec.model.width == 4 and spec.checks[0].metric == "balance_drift"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.init.scale = 2.0  # type: ignore[misc]
    # defaults fill what the file leaves out
    assert cfg.params["flow"]["rtol"] == FLOW_DEFAULTS["flow"]["rtol"]


def _err(d):
    with pytest.raises(ConfigError) as e:
        parse_config(d)
    msg = str(e.value)
    assert "\n" not in msg
    return e.value, msg


def test_unknown_key_did_you_mean():
    e, msg = _err(set_dotted(GOOD, "init.scael", 1e-3))
    assert e.key == "init.scael" and "Did you mean 'scale'" in msg
    e, msg = _err({**GOOD, "modle": {}})
    assert "Did you mean 'model'" in msg
    e, msg = _err({**GOOD, "experiment": "flwo"})
    assert e.key == "experiment" and "Did you mean 'flow'" in msg


def test_wrong_type_names_key_and_allowed():
    e, msg = _err(set_dotted(GOOD, "model.width", "ten"))
    assert e.key == "model.width" and "integer" in msg
    e, msg = _err(set_dotted(GOOD, "model.width", 2.5))
    assert e.key == "model.width"
    e, msg = _err(set_dotted(GOOD, "model.activation", "tanh"))
    assert "model.activation" in msg and "relu" in msg  # the allowed values are listed
    e, msg = _err(set_dotted(GOOD, "loss", "hinge"))
    assert "square" in msg and "logistic" in msg


@pytest.mark.parametrize("key,value", [("init.scale", -1e-3), ("init.scale", 0.0), ("flow.t1", -1.0),
                                       ("flow.rtol", -1e-8), ("flow.segments", 0)])
def test_negative_values_refused(key, value):
    e, msg = _err(set_dotted(GOOD, key, value))
    assert e.key == key and repr(value) in msg


def test_mismatched_sizes():
    e, msg = _err(set_dotted(GOOD, "model.d_in", 7))
    assert e.key == "model.d_in" and "7" in msg and "3" in msg
    bad = set_dotted(set_dotted(GOOD, "model.kind", "cnn"), "model.input_shape", [2, 2])
    e, msg = _err(bad)
    assert e.key == "model.input_shape" and "4" in msg
    e, msg = _err(set_dotted(set_dotted(GOOD, "flow.method", "sgd"), "flow.batch_size", 50))
    assert e.key == "flow.batch_size"


def test_generic_params_of_other_experiments():
    defaults = {"width": 10, "delta": 1e-3, "deltas": [1e-2, 1e-3], "loss": "exponential"}
    assert validate_params({"width": 3}, defaults)["width"] == 3
    assert validate_params({"delta": 1}, defaults)["delta"] == 1.0  # an int where a float is expected is fine
    with pytest.raises(ConfigError, match="delta"):
        validate_params({"delta": -1e-3}, defaults)
    with pytest.raises(ConfigError, match=r"deltas\[1\]"):
        validate_params({"deltas": [1e-2, -1.0]}, defaults)
    with pytest.raises(ConfigError, match="Did you mean 'width'"):
        validate_params({"widht": 3}, defaults)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    p = tmp_path / "bad.toml"
    p.write_text("experiment = = 'flow'")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


# ---------------------------------------------------------------------------------------------------------------------
_scalar = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.booleans(), st.none())
_value = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
_paths = st.sampled_from(["loss", "seed", "analyses", "checks", "data", "data.kind", "data.n", "data.d",
                          "data.classes", "model", "model.kind", "model.width", "model.widths", "model.p",
                          "model.d_in", "model.input_shape", "init.scale", "init.seed", "flow.t1", "flow.rtol",
                          "flow.method", "flow.segments", "flow.batch_size", "checks", "name", "experiment",
                          "quick", "zzz", "model.zzz", "init"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_paths, _value), min_size=1, max_size=3))
@example([("model.widths", [float("inf")])])  # once an OverflowError in the memory estimate, before validation
@example([("data.n", float("nan")), ("flow.segments", float("-inf"))])
@example([("init", {"\n": None})])  # once a message over two lines: a key holding a newline, shown escaped now
def test_random_malformed_configs_only_raise_config_error(mutations):
    d = dict(GOOD)
    for path, value in mutations:
        try:
            d = set_dotted(d, path, value)
        except ConfigError:
            return
    try:
        cfg = parse_config(d)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
    else:  # accepted: then it is a valid, round-trippable config
        FlowExperimentConfig.from_dict(dict(cfg.params))


@settings(max_examples=60, deadline=None)
@given(_value)
def test_random_top_level_objects(obj):
    try:
        parse_config(obj)
    except ConfigError:
        pass


def test_sweep_configs_validated_before_running():
    from homflow.sweep import parse_sweep

    sw = parse_sweep({**GOOD, "sweep": {"grid": {"init.scale": [1e-2, 1e-3], "init.seed": [0, 1, 2]}}})
    assert len(sw.configs) == 6 and len(sw.points) == 6
    scales = sorted({c.params["init"]["scale"] for c in sw.configs})
    assert scales == [1e-3, 1e-2]
    with pytest.raises(ConfigError, match="sweep"):
        parse_sweep(GOOD)  # no [sweep] table
    with pytest.raises(ConfigError, match="non-empty list"):
        parse_sweep({**GOOD, "sweep": {"grid": {"init.scale": 1e-3}}})
    with pytest.raises(ConfigError, match=r"init.scale.*grid point init.scale=-1"):
        parse_sweep({**GOOD, "sweep": {"grid": {"init.scale": [1e-2, -1]}}})
    with pytest.raises(ConfigError, match="Did you mean 'grid'"):
        parse_sweep({**GOOD, "sweep": {"gird": {}}})


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_random_toml_text_at_the_loader(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("toml") / "c.toml"
    p.write_text(text)
    try:
        load_config(p)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)


def test_every_builtin_config_roundtrips(tmp_path):
    from homflow.experiments import REGISTRY, get_experiment

    get_experiment("flow")  # fills the registry
    assert {"flow", "max-margin", "demo"} <= set(REGISTRY)
    for name in REGISTRY:
        for quick in (False, True):
            cfg = parse_config({"experiment": name}, quick=quick)
            p = tmp_path / f"{name}-{quick}.toml"
            p.write_text(config_to_toml(cfg))
            assert load_config(p).to_dict() == cfg.to_dict(), name


def test_examples_load():
    import tomllib
    from pathlib import Path

    from homflow.sweep import load_sweep

    files = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))
    assert files
    for f in files:
        if "sweep" in tomllib.loads(f.read_text()):
            assert load_sweep(f).configs, f
        else:
            assert load_config(f).experiment, f


@pytest.mark.parametrize("activation,p,degree,alpha", [
    ("relu", None, 1, 0.0), ("leaky_relu", None, 1, 0.01), ("relu_power", None, 2, 0.0),
    ("leaky_relu_power", None, 2, 0.01), ("relu", 3, 3, 0.0), ("leaky_relu", 1, 1, 0.01)])
def test_the_activation_named_is_the_activation_built(activation, p, degree, alpha):
    """`activation = "relu"` without `p` is ReLU (degree 1, the non-smooth flow's), not ReLU^2; a given `p` wins."""
    from homflow.experiments.flow import build_model
    from homflow.flow._clarke import is_kinked

    model_cfg = {"kind": "mlp", "depth": 3, "width": 4, "activation": activation}
    if p is not None:
        model_cfg["p"] = p
    cfg = parse_config({**GOOD, "model": model_cfg})
    model = build_model(FlowExperimentConfig.from_dict(dict(cfg.params)).model, 3, scale=1.0, seed=0)
    assert model.activation.degree == degree and float(model.activation.alpha) == alpha
    assert model.degree == degree ** 2 + degree + 1  # three weight layers
    assert is_kinked(model) == (degree == 1)  # the flow then takes the non-smooth solver
    assert _err(set_dotted(GOOD, "model.p", -1))[0].key == "model.p"
    e, msg = _err(set_dotted(GOOD, "model.alpha", 1.5))
    assert e.key == "model.alpha" and "[0, 1)" in msg and "1.5" in msg
