"""Every CLI command run for real (typer's CliRunner, in-process), ``--json`` parsed back, exit codes 0 / 1 / 2."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from homflow.cli import app
from homflow.experiments import execute, load_config
from homflow.store import RunStore

SMALL = """
experiment = "flow"
name = "small"
loss = "square"
analyses = ["loss_norm", "alignment", "balance", "neurons"]
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
t1 = 30.0
segments = 3
n_save = 8
[[checks]]
metric = "balance_drift"
tolerance = 1e-6
"""

runner = CliRunner()


def _invoke(args, store):
    return runner.invoke(app, [*args, "--store", str(store)], catch_exceptions=False)


def _json(res):
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stdout  # exactly one object on stdout
    obj = json.loads(lines[0])
    assert {"run", "path", "checks"} <= set(obj)
    for c in obj["checks"]:
        assert {"name", "value", "tolerance", "passed"} <= set(c)
    return obj


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg = d / "small.toml"
    cfg.write_text(SMALL)
    store = d / "store"
    res = _invoke(["run", str(cfg), "--json"], store)
    assert res.exit_code == 0, res.stdout + res.stderr
    return {"dir": d, "cfg": cfg, "store": store, "run": _json(res)}


def test_run_json_and_files(env):
    obj = env["run"]
    path = Path(obj["path"])
    assert obj["passed"] and obj["checks"][0]["name"].startswith("balance_drift")
    for f in ("config.toml", "arrays.npz", "checks.json", "summary.json", "report.html"):
        assert (path / f).is_file(), f
    assert list((path / "figures").glob("*.png")) and (path / "checkpoints" / "flow.npz").is_file()
    arrays = np.load(path / "arrays.npz")
    assert arrays["t"][-1] == pytest.approx(30.0) and np.all(np.diff(arrays["t"]) > 0)


def test_list_show_report(env):
    store = env["store"]
    res = _invoke(["list", "--json"], store)
    assert res.exit_code == 0
    obj = json.loads(res.stdout)
    names = {e["name"] for e in obj["experiments"]}
    assert {"flow", "max-margin", "demo"} <= names
    assert env["run"]["run"] in {r["id"] for r in obj["runs"]}
    res = _invoke(["list"], store)
    assert res.exit_code == 0 and "flow" in res.stdout

    rid = env["run"]["run"]
    res = _invoke(["show", rid, "--json"], store)
    assert res.exit_code == 0
    shown = _json(res)
    assert shown["run"] == rid and shown["checks"] == env["run"]["checks"]
    assert shown["record"]["status"] == "completed"
    res = _invoke(["show", rid[:15]], store)  # a unique prefix works, readable output
    assert res.exit_code == 0 and "completed" in res.stdout

    report = Path(env["run"]["path"]) / "report.html"
    report.unlink()
    res = _invoke(["report", rid, "--json"], store)
    assert res.exit_code == 0 and _json(res)["report"] == str(report) and report.is_file()


def test_failing_check_exits_1(env):
    res = _invoke(["run", str(env["cfg"]), "--json", "--set", "checks=[{metric='loss_final', tolerance=1e-30}]"],
                  env["store"])
    assert res.exit_code == 1
    obj = _json(res)
    assert obj["passed"] is False and obj["checks"][0]["passed"] is False


def test_resume_interrupted_run_matches(env):
    store = RunStore(env["store"])
    calls = []

    def interrupt_after_first_segment(f, m):
        calls.append(m)
        if "segment 2/3" in m:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute(load_config(env["cfg"]), store, progress=interrupt_after_first_segment)
    rec = store.list()[0]
    assert rec.status == "interrupted"
    res = _invoke(["resume", rec.id, "--json"], env["store"])
    assert res.exit_code == 0, res.stderr
    obj = _json(res)
    assert obj["run"] == rec.id and obj["summary"]["stats"]["resumed_from"] == 1
    a, b = np.load(Path(obj["path"]) / "arrays.npz"), np.load(Path(env["run"]["path"]) / "arrays.npz")
    for k in b.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    res = _invoke(["resume", rec.id], env["store"])  # a completed run cannot be resumed: bad input
    assert res.exit_code == 2 and "already completed" in res.stderr


def test_sweep(env):
    sw = env["dir"] / "sweep.toml"
    sw.write_text(SMALL.replace('name = "small"\n', "") + '\n[sweep]\nname = "seeds"\n[sweep.grid]\n"init.seed" = [0, 1]\n'
                  '"flow.t1" = [10.0]\n')
    res = _invoke(["sweep", str(sw), "--json"], env["store"])
    assert res.exit_code == 0, res.stderr
    obj = _json(res)
    assert len(obj["runs"]) == 2 and all(r["status"] == "completed" for r in obj["runs"])
    page = Path(obj["report"]).read_text()
    assert page.count('class="pass"') >= 2 and "init.seed" in page
    recs = RunStore(env["store"]).list(sweep=obj["sweep"])
    assert len(recs) == 2
    res = _invoke(["run", str(sw)], env["store"])  # a sweep file given to `run`
    assert res.exit_code == 2 and "homflow sweep" in res.stderr
    res = _invoke(["sweep", str(sw), "--backend", "nope"], env["store"])
    assert res.exit_code == 2
    try:
        import ray  # noqa: F401
    except ImportError:
        res = _invoke(["sweep", str(sw), "--backend", "ray"], env["store"])
        assert res.exit_code == 2 and "ray" in res.stderr


def test_reproduce(env):
    sets = ["flow.t1=5.0", "flow.segments=1", "flow.n_save=8", "data.n=12", "data.d=3", "data.teacher_width=2",
            "data.labels='value'", "model.width=4"]  # the shapes of SMALL: the compiled segment solve is reused
    res = _invoke(["reproduce", "flow", "--json", *[a for s in sets for a in ("--set", s)]], env["store"])
    assert res.exit_code == 0, res.stderr
    assert _json(res)["checks"]
    res = _invoke(["reproduce", "max-margn"], env["store"])
    assert res.exit_code == 2 and "Did you mean 'max-margin'" in res.stderr


@pytest.mark.parametrize("patch,needle", [
    ('[init]\nscale = 1e-2', "init.scael"),                  # unknown key
    ('width = 4', "model.width"),                             # wrong type
    ('scale = 1e-2', "init.scale"),                           # negative delta
    ('d = 3', "model.d_in"),                                  # mismatched sizes
])
def test_bad_configs_exit_2_one_line(env, patch, needle):
    text = {
        "init.scael": SMALL.replace("[init]\nscale = 1e-2", "[init]\nscael = 1e-2"),
        "model.width": SMALL.replace("width = 4", 'width = "four"'),
        "init.scale": SMALL.replace("scale = 1e-2", "scale = -1e-3"),
        "model.d_in": SMALL.replace("[model]\n", "[model]\nd_in = 7\n"),
    }[needle]
    bad = env["dir"] / f"bad_{needle}.toml"
    bad.write_text(text)
    res = _invoke(["run", str(bad), "--json"], env["store"])
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1
    obj = _json(res)  # --json: one JSON object on stdout, errors included
    assert obj["exit_code"] == 2 and needle in obj["error"] and obj["run"] is None


def test_missing_file_and_unknown_run(env):
    res = _invoke(["run", str(env["dir"] / "missing.toml")], env["store"])
    assert res.exit_code == 2 and "not found" in res.stderr
    res = _invoke(["show", "no-such-run"], env["store"])
    assert res.exit_code == 2 and "no run" in res.stderr


@pytest.mark.parametrize("cmd", ["demo", "run", "reproduce", "list", "show", "report", "resume", "sweep"])
def test_help(cmd):
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0 and "Usage" in res.stdout


@pytest.mark.slow
def test_demo_quick(tmp_path):
    res = _invoke(["demo", "--quick", "--json"], tmp_path)
    obj = _json(res)
    assert obj["status"] == "completed" and Path(obj["report"]).is_file()
    assert obj["summary"]["skipped"] == []  # every stage ran: alignment, escape, saddle, late phase, split
    assert len(obj["checks"]) >= 10
    assert res.exit_code == 0, [c for c in obj["checks"] if not c["passed"]]
    page = Path(obj["report"]).read_text()
    assert page.count("data:image/png;base64,") >= 6


def test_demo_stage_skips_missing_pieces():
    from homflow.experiments.demo import _stage

    skipped = []

    def missing():
        raise ImportError("no module named homflow.nothing")

    assert _stage("a stage", skipped, missing) is None
    assert _stage("ok", skipped, lambda: 3) == 3
    assert skipped == ["a stage: module not available (no module named homflow.nothing)"]
