"""A catalogue of bad CLI inputs, each refused before a run exists with the expected exit code and one plain line on
stderr (no traceback), and with ``--json`` one JSON object on stdout naming the error (issue 16, items 5, 6, 8).

Hypothesis adds random bad values for typed keys. ``pytest -s`` prints the counts: inputs tried / refused cleanly /
tracebacks / wrong exit codes."""

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from homflow.cli import app
from homflow.experiments._config import SIZE_LIMITS
from homflow.store import RunStore

runner = CliRunner()

SMALL = """
experiment = "flow"
loss = "square"
[data]
kind = "teacher_student"
n = 12
d = 3
teacher_width = 2
labels = "value"
[model]
kind = "two_layer"
width = 4
[init]
scale = 1e-2
[flow]
t1 = 5.0
segments = 1
n_save = 8
"""

SWEEP_TAIL = '\n[sweep]\n[sweep.grid]\n"init.seed" = [0, 1]\n'
COUNTS = {"tried": 0, "refused cleanly": 0, "tracebacks": 0, "wrong exit codes": 0}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("catalogue")
    f = {"dir": d, "cfg": d / "ok.toml", "store": d / "store"}
    f["cfg"].write_text(SMALL)
    (d / "empty.toml").write_text("")
    (d / "bad.toml").write_text("experiment = \n[[[")
    (d / "binary.toml").write_bytes(b"\xff\xfe\x00garbage")
    (d / "sweep.toml").write_text(SMALL + SWEEP_TAIL)
    (d / "zero.npz").write_bytes(b"")
    (d / "garbage.npz").write_bytes(b"PK\x03\x04garbage")
    np.savez(d / "cplx.npz", X=np.ones((5, 3)) + 2j, y=np.ones(5))
    np.savez(d / "noy.npz", X=np.ones((5, 3)))
    np.savez(d / "nan.npz", X=np.full((5, 3), np.nan), y=np.ones(5))
    np.savez(d / "shape.npz", X=np.ones((5, 3)), y=np.ones(4))
    np.savez(d / "obj.npz", X=np.array([object()] * 3, dtype=object), y=np.ones(3))
    os.mkfifo(d / "fifo.npz")
    os.mkfifo(d / "fifo.toml")
    (d / "adir.npz").mkdir()
    (d / "afile").write_text("x")
    for name, grid in (("big_grid", {"init.seed": list(range(101)), "model.width": list(range(1, 101))}),
                       ("empty_grid", {})):
        (d / f"{name}.toml").write_text(SMALL + "\n[sweep]\n[sweep.grid]\n"
                                        + "".join(f'"{k}" = {v}\n' for k, v in grid.items()))
    (d / "workers0.toml").write_text(SMALL + '\n[sweep]\nworkers = 0\n[sweep.grid]\n"init.seed" = [0]\n')
    (d / "notlist.toml").write_text(SMALL + '\n[sweep]\n[sweep.grid]\n"init.seed" = 3\n')
    return f


def _data(path):
    return ["--set", "data.kind='file'", "--set", f"data.path='{path}'"]


# (arguments with {d} for the catalogue directory, expected exit code, a word of the message)
CATALOGUE = [
    (["run", "{d}/missing.toml"], 2, "not found"),
    (["run", "{d}"], 2, "regular file"),
    (["run", "{d}/fifo.toml"], 2, "regular file"),
    (["run", "{d}/empty.toml"], 2, "empty"),
    (["run", "{d}/bad.toml"], 2, "TOML"),
    (["run", "{d}/binary.toml"], 2, "TOML"),
    (["run", "{d}/sweep.toml"], 2, "homflow sweep"),
    (["run", "{d}/ok.toml", "--set", "model.width"], 2, "KEY=VALUE"),
    (["run", "{d}/ok.toml", "--set", "init.scale=1e-3\nflow.t1=1e9"], 2, "one line"),
    (["run", "{d}/ok.toml", "--set", "init.scale=1e-3\x00"], 2, "one line"),
    (["run", "{d}/ok.toml", "--set", "[/x]=1"], 2, "[/x]"),
    (["run", "{d}/ok.toml", "--set", "init.scael=1e-3"], 2, "Did you mean"),
    (["run", "{d}/ok.toml", "--set", "a..b=1"], 2, "dotted"),
    (["run", "{d}/ok.toml", "--set", "model.width=0"], 2, "model.width"),
    (["run", "{d}/ok.toml", "--set", "model.width=-1"], 2, "model.width"),
    (["run", "{d}/ok.toml", "--set", "model.width=9223372036854775807"], 2, "at most"),
    (["run", "{d}/ok.toml", "--set", "model.width=1000000000"], 2, "at most"),
    (["run", "{d}/ok.toml", "--set", "model.width='four'"], 2, "integer"),
    (["run", "{d}/ok.toml", "--set", "model.width=4.5"], 2, "integer"),
    (["run", "{d}/ok.toml", "--set", "data.n=0"], 2, "data.n"),
    (["run", "{d}/ok.toml", "--set", "data.n=1000000000000"], 2, "at most"),
    (["run", "{d}/ok.toml", "--set", "data.n=5000000", "--set", "data.d=1000"], 2, "GiB"),
    (["run", "{d}/ok.toml", "--set", "data.seed=-1"], 2, "data.seed"),
    (["run", "{d}/ok.toml", "--set", "init.seed=4294967296"], 2, "init.seed"),
    (["run", "{d}/ok.toml", "--set", "init.scale=0"], 2, "init.scale"),
    (["run", "{d}/ok.toml", "--set", "init.scale=-1e-3"], 2, "init.scale"),
    (["run", "{d}/ok.toml", "--set", "init.scale=nan"], 2, "finite"),
    (["run", "{d}/ok.toml", "--set", "flow.t1=inf"], 2, "finite"),
    (["run", "{d}/ok.toml", "--set", "flow.t1=0"], 2, "flow.t1"),
    (["run", "{d}/ok.toml", "--set", "flow.segments=0"], 2, "flow.segments"),
    (["run", "{d}/ok.toml", "--set", "flow.segments=1000000000"], 2, "at most"),
    (["run", "{d}/ok.toml", "--set", "flow.n_save=1"], 2, "flow.n_save"),
    (["run", "{d}/ok.toml", "--set", "flow.segments=10000", "--set", "flow.n_save=1000"], 2, "saved states"),
    (["run", "{d}/ok.toml", "--set", "loss='nope'"], 2, "loss"),
    (["run", "{d}/ok.toml", "--set", "model.kind='nope'"], 2, "model.kind"),
    (["run", "{d}/ok.toml", "--set", "experiment='nope'"], 2, "experiment"),
    (["run", "{d}/ok.toml", "--set", "experiment=3"], 2, "experiment"),
    (["run", "{d}/ok.toml", "--set", "quick='yes'"], 2, "quick"),
    (["run", "{d}/ok.toml", "--set", "data.kind='file'"], 2, "data.path"),
    (["run", "{d}/ok.toml", *_data("{d}/missing.npz")], 2, "data.path"),
    (["run", "{d}/ok.toml", *_data("{d}/zero.npz")], 2, "empty"),
    (["run", "{d}/ok.toml", *_data("{d}/garbage.npz")], 2, "data.path"),
    (["run", "{d}/ok.toml", *_data("{d}/cplx.npz")], 2, "complex"),
    (["run", "{d}/ok.toml", *_data("{d}/noy.npz")], 2, "'y'"),
    (["run", "{d}/ok.toml", *_data("{d}/nan.npz")], 2, "finite"),
    (["run", "{d}/ok.toml", *_data("{d}/shape.npz")], 2, "data.path"),
    (["run", "{d}/ok.toml", *_data("{d}/obj.npz")], 2, "data.path"),
    (["run", "{d}/ok.toml", *_data("{d}/fifo.npz")], 2, "FIFO"),
    (["run", "{d}/ok.toml", *_data("{d}/adir.npz")], 2, "directory"),
    (["run", "{d}/ok.toml", "--name", "a\nb"], 2, "name"),
    (["run", "{d}/ok.toml", "--store", "{d}/afile/store"], 2, "is a file"),
    (["run", "{d}/ok.toml", "--nope"], 2, "--nope"),
    (["reproduce", "max-margn"], 2, "Did you mean"),
    (["reproduce", "flow", "--set", "model.width=-3"], 2, "model.width"),
    (["demo", "--set", "delta=-1"], 2, "delta"),
    (["show", "no-such-run"], 2, "no run"),
    (["show", "_"], 2, "no run"),
    (["show", "%"], 2, "no run"),
    (["show", ""], 2, "run"),
    (["report", "%"], 2, "no run"),
    (["resume", "_"], 2, "no run"),
    (["list", "--limit", "abc"], 2, "--limit"),
    (["sweep"], 2, "--resume"),
    (["sweep", "{d}/sweep.toml", "--resume", "x"], 2, "not both"),
    (["sweep", "{d}/sweep.toml", "--workers", "0"], 2, "--workers"),
    (["sweep", "{d}/sweep.toml", "--backend", "nope"], 2, "--backend"),
    (["sweep", "{d}/sweep.toml", "--retries", "-1"], 2, "--retries"),
    (["sweep", "--resume", "no-such-sweep"], 2, "no sweep"),
    (["sweep", "{d}/ok.toml"], 2, "sweep"),
    (["sweep", "{d}/big_grid.toml"], 2, "at most"),
    (["sweep", "{d}/empty_grid.toml"], 2, "sweep.grid"),
    (["sweep", "{d}/workers0.toml"], 2, "sweep.workers"),
    (["sweep", "{d}/notlist.toml"], 2, "sweep.grid"),
    (["store", "check", "--store", "{d}/afile"], 2, "is a file"),
    (["nope"], 2, "nope"),
]


def _invoke(args, store):
    has_store = "--store" in args
    return runner.invoke(app, [*args, *([] if has_store else ["--store", str(store)])], catch_exceptions=True)


def _judge(res, code, needle):
    """Count and check one refusal: exit code, one line on stderr, no traceback, the needle in the message."""
    COUNTS["tried"] += 1
    err = (res.stderr or "").strip()
    if res.exception is not None and not isinstance(res.exception, SystemExit) or "Traceback" in err:
        COUNTS["tracebacks"] += 1
        raise AssertionError(f"traceback: {res.exception!r} {err}")
    if res.exit_code != code:
        COUNTS["wrong exit codes"] += 1
        raise AssertionError(f"exit {res.exit_code}, expected {code}: {err}")
    assert len(err.splitlines()) == 1 and needle.lower() in err.lower(), err
    COUNTS["refused cleanly"] += 1
    return err


@pytest.mark.parametrize("args,code,needle", CATALOGUE, ids=[" ".join(a[:3])[:60] for a, _, _ in CATALOGUE])
def test_bad_input_refused(files, args, code, needle):
    d = str(files["dir"])
    args = [a.replace("{d}", d) for a in args]
    _judge(_invoke(args, files["store"]), code, needle)
    if args[0] != "store" and "--json" not in args:
        res = _invoke([*args, "--json"], files["store"])
        lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
        assert res.exit_code == code and len(lines) == 1, res.stdout
        obj = json.loads(lines[0])
        assert obj["exit_code"] == code and obj["error"] and {"run", "path", "checks"} <= set(obj)
    # nothing ran: no run row, no run directory
    if files["store"].exists():
        assert RunStore(files["store"]).list() == [] and RunStore(files["store"]).run_dirs() == []


NOT_INT = st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: x != int(x) if x == x and
                                                                          abs(x) != float("inf") else True),
                    st.text(max_size=12))


def _bad_int(key):
    """Sizes the config refuses for ``key``: <= 0, above the key's own bound, or not integers. (A value between two
    keys' bounds, e.g. data.n = 100,001, is a valid size and would run a real, long flow.)"""
    limit = SIZE_LIMITS[key.rsplit(".", 1)[-1]]
    return st.one_of(st.integers(max_value=0), st.integers(min_value=limit + 1, max_value=max(2**70, limit + 1)),
                     NOT_INT)
BAD_POSITIVE = st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(float("inf")),
                         st.text(max_size=12), st.booleans())


def _toml(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, str):
        return json.dumps(v)
    return str(v)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["model.width", "data.n", "flow.segments", "data.teacher_width"]), data=st.data())
def test_random_bad_sizes(files, key, data):
    value = data.draw(_bad_int(key), label="value")
    _judge(_invoke(["run", str(files["cfg"]), "--set", f"{key}={_toml(value)}"], files["store"]), 2, key.split(".")[0])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["init.scale", "flow.t1"]), value=BAD_POSITIVE)
def test_random_bad_positive_numbers(files, key, value):
    _judge(_invoke(["run", str(files["cfg"]), "--set", f"{key}={_toml(value)}"], files["store"]), 2, key.split(".")[0])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=30))
@example(text="-0")
@example(text="--help")
@example(text="-")
@example(text="[/x]")
def test_random_run_names_are_plain_text(files, text):
    """Any text as a run id is refused as bad input, printed literally (markup and escapes never interpreted). A
    name that starts with '-' reads as an option unless it follows '--' (as in every POSIX command line)."""
    res = _invoke(["show", "--store", str(files["store"]), *(["--"] if text.startswith("-") else []), text], None)
    err = _judge(res, 2, "run")
    assert "\x1b" not in err


def test_catalogue_counts(capsys):
    """Printed with -s: the counts over this module (runs last in the module)."""
    with capsys.disabled():
        print("\ncatalogue of bad inputs:", COUNTS)
    assert COUNTS["tracebacks"] == 0 and COUNTS["wrong exit codes"] == 0
