"""The user's side of the CLI (issue 13): finding runs (by built-in name, `latest`, full ids when piped, filters,
delete, export), `--json` on a run that raises, `--version`, `-h`, `python -m homflow`, completion, and a `--help`
that does not import JAX."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from homflow.cli import app
from homflow.experiments import Outcome, RunConfig, check, execute, register
from homflow.store import RunStore

runner = CliRunner()


def _invoke(args, store, **kw):
    return runner.invoke(app, [*args, "--store", str(store)], catch_exceptions=False, **kw)


def _ok(params, ctx):
    t = np.linspace(0.0, 1.0, 5)
    return Outcome([check("x small", params["x"] * 1e-3, 1e-2)], arrays={"t": t, "loss": np.exp(-t), "norm": 1 + t,
                                                                        "thetas": np.outer(1 + t, [1.0, 2.0])},
                   summary={"x": params["x"]})


def _raises(params, ctx):
    raise RuntimeError("gradient descent diverged: the loss became inf at step 12")


@pytest.fixture(autouse=True, scope="module")
def _test_experiments():
    """Two throw-away experiments, registered for this module only."""
    from homflow.experiments import REGISTRY, get_experiment

    get_experiment("flow")  # the built-ins first
    register("test-user-ok", description="a tiny experiment for the CLI tests", defaults={"x": 1.0, "tag": "a"})(_ok)
    register("test-user-raises", description="an experiment whose computation raises", defaults={})(_raises)
    yield
    REGISTRY.pop("test-user-ok")
    REGISTRY.pop("test-user-raises")


def _run(store, exp="test-user-ok", **params):
    return execute(RunConfig(exp, {**{"x": 1.0, "tag": "a"}, **params} if exp == "test-user-ok" else params),
                   store, report=False)


@pytest.fixture
def store(tmp_path):
    st = RunStore(tmp_path / "runs")
    first = _run(st)
    second = _run(st, x=100.0)  # fails its check
    return st, first, second


def test_show_finds_runs_by_builtin_name_latest_and_prefix(store):
    st, first, second = store
    # by the built-in's name: its newest run (two exist: `show NAME` used to fail on the ambiguity)
    res = _invoke(["show", "test-user-ok", "--json"], st.root)
    assert json.loads(res.stdout)["run"] == second.run
    res = _invoke(["show", "latest", "--json"], st.root)
    assert json.loads(res.stdout)["run"] == second.run
    res = _invoke(["show", "--json"], st.root)  # RUN defaults to latest
    assert json.loads(res.stdout)["run"] == second.run
    res = _invoke(["show", first.run, "--json"], st.root)
    obj = json.loads(res.stdout)
    assert obj["run"] == first.run and res.exit_code == 0
    assert obj["provenance"]["homflow"] and obj["provenance"]["python"] and obj["provenance"]["command"]
    res = _invoke(["latest"], st.root)
    assert res.stdout.strip() == second.run
    res = _invoke(["show", "no-such-run"], st.root)
    assert res.exit_code == 2 and "no run 'no-such-run'" in res.stderr


def test_list_piped_prints_full_ids_filters_and_params(store):
    st, first, second = store
    res = _invoke(["list"], st.root)  # CliRunner's stdout is not a terminal: the piped form
    lines = res.stdout.splitlines()
    assert lines[0].split("\t")[0] == "run"
    assert [ln.split("\t")[0] for ln in lines[1:]] == [second.run, first.run]  # full ids, newest first
    res = _invoke(["list", "--failed", "--ids"], st.root)
    assert res.stdout.split() == [second.run]
    res = _invoke(["list", "--passed", "-q"], st.root)
    assert res.stdout.split() == [first.run]
    res = _invoke(["list", "-e", "nothing-like-it", "-q"], st.root)
    assert res.stdout.split() == []
    res = _invoke(["list", "--json"], st.root)
    exps = {e["name"]: e for e in json.loads(res.stdout)["experiments"]}
    assert exps["test-user-ok"]["defaults"] == {"x": 1.0, "tag": "a"}  # the built-ins' parameters
    assert "n_save" in exps["demo"]["defaults"]
    res = _invoke(["list", "--json"], st.root.parent / "no-store-yet")  # before the first run: the built-ins
    assert res.exit_code == 0 and json.loads(res.stdout)["runs"] == [] and not (st.root.parent / "no-store-yet").exists()
    res = _invoke(["list", "--status", "bogus"], st.root)
    assert res.exit_code == 2 and "--status" in res.stderr


def test_delete_and_export(store, tmp_path):
    st, first, second = store
    res = _invoke(["export", "--csv", str(tmp_path / "index.csv")], st.root)
    assert res.exit_code == 0, res.stderr
    idx = pd.read_csv(tmp_path / "index.csv")
    assert list(idx["id"]) == [second.run, first.run] and list(idx["passed"]) == [False, True]
    res = _invoke(["export", first.run, "--parquet", str(tmp_path / "checks.parquet")], st.root)
    assert res.exit_code == 0, res.stderr
    ch = pd.read_parquet(tmp_path / "checks.parquet")
    assert ch.loc[0, "name"] == "x small" and ch.loc[0, "value"] == pytest.approx(1e-3)
    res = _invoke(["export", first.run, "--table", "arrays", "--csv", str(tmp_path / "a.csv")], st.root)
    a = pd.read_csv(tmp_path / "a.csv")
    np.testing.assert_allclose(a["loss"], np.exp(-np.linspace(0, 1, 5)))
    assert _invoke(["export", "--csv", "a", "--parquet", "b"], st.root).exit_code == 2
    res = _invoke(["delete", second.run], st.root, input="")  # not a terminal and no --yes: refused
    assert res.exit_code == 2 and "--yes" in res.stderr
    res = _invoke(["delete", second.run, "--yes"], st.root)
    assert res.exit_code == 0
    assert [r.id for r in st.list()] == [first.run] and not (st.root / second.run).exists()


def test_json_on_a_run_that_raises_prints_one_object(tmp_path):
    res = _invoke(["reproduce", "test-user-raises", "--json"], tmp_path / "runs")
    assert res.exit_code == 1
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["status"] == "failed" and obj["passed"] is False and "diverged" in obj["error"]
    rec = RunStore(tmp_path / "runs").get(obj["run"])  # the failed run is named, and stored as failed
    assert rec.status == "failed"


def test_version_short_help_and_completion():
    from homflow import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"homflow {__version__}"
    res = runner.invoke(app, ["-h"])
    assert res.exit_code == 0 and "Commands" in res.stdout
    res = runner.invoke(app, ["show", "-h"])
    assert res.exit_code == 0 and "RUN" in res.stdout
    res = runner.invoke(app, ["--help"])
    assert "--install-completion" in res.stdout and "--show-completion" in res.stdout


def test_python_m_homflow_and_help_without_jax():
    """`python -m homflow` works, and neither it nor `homflow --help` imports JAX (it took 1.5 s)."""
    out = subprocess.run([sys.executable, "-m", "homflow", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("homflow ")
    code = ("import sys; sys.argv = ['homflow', '--help']\nfrom homflow.cli import app\ntry:\n    app()\n"
            "except SystemExit:\n    pass\nprint('JAX', 'jax' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "JAX False False", out.stdout + out.stderr
