"""Opening runs from Python: homflow.load_run (config, summary, checks, arrays, trajectory, provenance, figures as
Displays that re-plot) and homflow.runs (the index as a DataFrame); provenance recorded and shown in the report."""

import platform

import numpy as np
import pytest
from matplotlib.figure import Figure as MplFigure

import homflow
from homflow.experiments import REGISTRY, Figure, Outcome, RunConfig, check, execute, get_experiment, register
from homflow.store import RunStore


def _exp(params, ctx):
    t = np.concatenate([[0.0], np.geomspace(1e-2, 1e2, params["n"] - 1)])
    thetas = np.outer(np.exp(-t), [1.0, -2.0, 0.5]) + np.outer(1 - np.exp(-t), [0.0, 1.0, 1.0])
    loss = 0.5 * np.sum(thetas**2, axis=1)
    norm = np.linalg.norm(thetas, axis=1)
    figs = [Figure("loss_norm", "loss and norm", "t", ("loss", "norm"), ("loss", "||theta||"), display="loss_norm")]
    return Outcome([check("final norm", norm[-1], 2.0)],
                   arrays={"t": t, "loss": loss, "log_loss": np.log(loss), "norm": norm, "thetas": thetas},
                   figures=figs, summary={"n": params["n"]})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    get_experiment("flow")
    register("test-runs-flow", description="a closed-form trajectory", defaults={"n": 9})(_exp)
    st = RunStore(tmp_path_factory.mktemp("runs") / "store")
    a = execute(RunConfig("test-runs-flow", {"n": 9}, name="first"), st)
    b = execute(RunConfig("test-runs-flow", {"n": 12}), st)
    yield st, a, b
    REGISTRY.pop("test-runs-flow")


def test_load_run_by_id_latest_name_and_path(store):
    st, a, b = store
    for ref in (a.run, "first", a.path):
        r = homflow.load_run(ref, store=st)
        assert r.id == a.run and r.config == {"experiment": "test-runs-flow", "name": "first", "n": 9}
    r = homflow.load_run("latest", store=st.root)
    assert r.id == b.run and r.experiment == "test-runs-flow" and r.passed is True
    assert homflow.load_run("test-runs-flow", store=st).id == b.run  # the newest run of that experiment
    with pytest.raises(ValueError, match="no run"):
        homflow.load_run("nope", store=st)


def test_loaded_run_arrays_trajectory_checks_and_figures(store):
    st, a, _ = store
    r = homflow.load_run(a.run, store=st)
    assert r.summary == {"n": 9}
    tr = r.trajectory()
    assert tr.thetas.shape == (9, 3) and tr.ts[0] == 0.0
    np.testing.assert_allclose(tr.loss, 0.5 * np.sum(tr.thetas**2, axis=1))  # stored as computed
    np.testing.assert_allclose(tr.theta_final, tr.thetas[-1])
    assert list(tr.frame().columns) == ["t", "loss", "log_loss", "norm"]
    df = r.checks_frame()
    assert df.loc[0, "name"] == "final norm" and df.loc[0, "value"] == pytest.approx(tr.norm[-1])
    af = r.arrays_frame()
    assert list(af.columns[:1]) == ["t"] and len(af) == 9
    disp = r.figures["loss_norm"]
    ax = MplFigure().add_subplot(1, 1, 1)
    assert disp.plot(ax=ax) is disp and disp.ax_ is ax  # re-plots on the caller's axes
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), tr.ts[1:])
    assert r.report_path is not None and r.report_path.name == "report.html"


def test_runs_dataframe(store):
    st, a, b = store
    df = homflow.runs(st)
    assert list(df["id"]) == [b.run, a.run]
    assert df["passed"].tolist() == [True, True] and str(df["created"].dtype).startswith("datetime64")
    assert {"experiment", "status", "duration_s", "path"} <= set(df.columns)


def test_provenance_recorded_and_reported(store):
    import jax

    st, a, _ = store
    prov = homflow.load_run(a.run, store=st).provenance
    assert prov["homflow"] == homflow.__version__ and prov["jax"] == jax.__version__
    assert prov["python"] == platform.python_version() and prov["platform"] and prov["command"]
    assert prov["device"] and prov["float64"] is True
    assert prov["git_commit"] is None or len(prov["git_commit"].split("+")[0]) == 40
    page = (st.root / a.run / "report.html").read_text()
    assert "<h2>Provenance</h2>" in page and jax.__version__ in page and "homflow.load_run(" in page
