"""The checkpointed segmented flow (experiments/_segments.py) picks its solver by the one rule of ``gradient_flow``
(:func:`homflow.flow.select_solver`): the non-smooth Clarke flow for ReLU / leaky-ReLU networks, each segment started
from the previous one's end state. Checked against independent computations: the one-shot non-smooth flow over the
same horizon, the energy identity ``L(0) - L(T) = int_0^T ||dtheta/dt||^2`` summed over segments, and a run interrupted
after its first segment and resumed from the checkpoint, which must give the uninterrupted numbers bit for bit (linear
and log time; in-process, and through the CLI after a SIGKILL)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from homflow.activations import leaky_relu, relu
from homflow.data import sphere
from homflow.experiments import Context, segmented_flow
from homflow.flow import Clarke, LossBelow, gradient_flow, make_problem, nonsmooth_flow, select_solver
from homflow.models import TwoLayer


def _net(seed=0, n=16, d=3, width=6, act=leaky_relu(0.1), scale=0.5):
    data = sphere(n, d, seed=seed, labels="linear")
    return TwoLayer(d, width, act, key=jax.random.PRNGKey(seed), scale=scale), data


class _Store:
    """An in-memory checkpoint store standing in for a run directory."""

    def __init__(self):
        self.saved = {}

    def ctx(self, progress=lambda f, m: None):
        return Context(progress=progress, save_checkpoint=lambda name, a: self.saved.__setitem__(name, dict(a)),
                       load_checkpoint=lambda name: self.saved.get(name))


def test_default_is_the_rule_of_gradient_flow():
    model, data = _net()
    problem, theta = make_problem(model, data, "exponential")
    assert select_solver(problem, theta).name == "clarke"
    assert select_solver(problem, theta, events=[LossBelow(1e-3)]).name == "auto"  # Clarke has no events yet
    assert select_solver(problem, theta, "tsit5").name == "tsit5"  # a name forces its solver
    assert select_solver(problem, theta, "clarke", rtol=1e-9).rtol == 1e-9  # the non-smooth solver has a name too
    with pytest.raises(ValueError, match="not supported by the non-smooth solver"):  # and says what it cannot do
        gradient_flow(model, data, loss="exponential", t1=1.0, solver="clarke", events=[LossBelow(1e-3)])
    smooth, sdata = _net(act="relu_power")
    assert select_solver(*make_problem(smooth, sdata, "exponential")).name == "auto"


@pytest.mark.slow  # two non-smooth flows at rtol 1e-10 (~25 s)
def test_segments_of_a_relu_net_are_the_one_shot_nonsmooth_flow():
    """ReLU net, logistic loss, linear time: 3 segments (restarted controller, mode read off each start state) agree
    with the one-shot non-smooth flow to about the global error of each, and the dissipated energy summed over the
    segments is L(0) - L(T)."""
    model, data = _net(seed=2, n=20, d=4, width=8, act=relu, scale=0.3)
    t1 = 30.0
    seg = segmented_flow(model, data, loss="logistic", t1=t1, segments=3, n_save=6, rtol=1e-10)
    assert seg.success and seg.stats["solver"] == "clarke" and seg.stats["segments"] == 3, seg.reason
    assert seg.stats["events"] > 0  # the flow did meet kinks (else this would be a smooth flow)
    one = nonsmooth_flow(model, data, loss="logistic", t1=t1, ts=seg.ts, rtol=1e-10)
    assert one.success
    err = np.linalg.norm(seg.thetas - one.thetas, axis=1) / np.linalg.norm(one.thetas, axis=1)
    assert err.max() < 1e-6, err
    drop = seg.loss[0] - seg.loss[-1]
    assert abs(drop - seg.stats["energy"]) <= 1e-7 * drop, (drop, seg.stats["energy"])


@pytest.mark.parametrize("time,t1", [pytest.param("linear", 20.0, marks=pytest.mark.slow), ("log", 1e6)])
def test_interrupted_nonsmooth_segments_resume_bit_for_bit(time, t1):
    """An interrupted run resumed from its checkpoint equals the uninterrupted run to the last bit (the same segments
    from the same checkpointed states); leaky ReLU, exponential loss, the late phase in log time too."""
    model, data = _net(seed=1)
    kw = dict(loss="exponential", t1=t1, segments=3, n_save=5, time=time, name="flow")
    full = segmented_flow(model, data, ctx=_Store().ctx(), **kw)
    assert full.success and full.stats["solver"] == "clarke", full.reason

    store = _Store()

    def stop_at_second(f, m):
        if "segment 2/3" in m:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        segmented_flow(model, data, ctx=store.ctx(stop_at_second), **kw)
    assert int(store.saved["flow"]["segment"]) == 0
    resumed = segmented_flow(model, data, ctx=store.ctx(), **kw)
    assert resumed.stats["resumed_from"] == 1
    for k in ("ts", "thetas", "log_loss", "norm"):
        np.testing.assert_array_equal(getattr(resumed, k), getattr(full, k), err_msg=k)
    for k in ("grad_evals", "events", "energy"):
        assert resumed.stats[k] == full.stats[k], k


@pytest.mark.slow  # compiles the smooth engine with and without events (~15 s)
def test_a_named_solver_is_forced_and_clarke_with_events_refused():
    model, data = _net(seed=3, n=10, width=4)
    store = _Store()
    tr = segmented_flow(model, data, loss="exponential", t1=2.0, segments=2, n_save=3, solver="auto", ctx=store.ctx())
    assert tr.stats["solver"] == "auto"
    # the smooth run's checkpoint is not taken up by the default (non-smooth) flow: it starts over
    tr = segmented_flow(model, data, loss="exponential", t1=2.0, segments=2, n_save=3, ctx=store.ctx())
    assert tr.stats["solver"] == "clarke" and tr.stats["resumed_from"] == 0 and tr.success
    tr = segmented_flow(model, data, loss="exponential", t1=2.0, segments=2, n_save=3, solver="default",
                        events=[LossBelow(1e-30)])
    assert tr.stats["solver"] == "auto"  # stop events: the smooth engine (the rule)
    with pytest.raises(ValueError, match="events"):
        segmented_flow(model, data, loss="exponential", t1=2.0, segments=2, solver=Clarke(), events=[LossBelow(1.0)])


LEAKY_RUN = """
experiment = "flow"
name = "leaky"
loss = "exponential"
analyses = ["loss_norm", "balance"]
[data]
kind = "sphere"
n = 20
d = 4
labels = "linear"
[model]
kind = "two_layer"
width = 8
activation = "leaky_relu"
p = 1
alpha = 0.1
[init]
scale = 0.5
[flow]
t1 = 1e6
segments = 4
n_save = 8
"""


@pytest.mark.slow  # three CLI processes (~2 min)
def test_sigkilled_nonsmooth_run_resumes_bit_identical(tmp_path):
    """`homflow run` of a leaky-ReLU flow (the non-smooth solver, log time) killed with SIGKILL once its first segment
    is checkpointed, then `homflow resume`: the arrays equal those of an uninterrupted run bit for bit."""
    cfg = tmp_path / "leaky.toml"
    cfg.write_text(LEAKY_RUN)
    env = {**os.environ, "HOMFLOW_JAX_CACHE": str(tmp_path / "cache")}

    def cli(*args):
        return [sys.executable, "-m", "homflow.cli", *args]

    full = subprocess.run(cli("run", str(cfg), "--store", str(tmp_path / "s1"), "--json"), env=env,
                          capture_output=True, text=True, timeout=900)
    assert full.returncode == 0, full.stderr
    a = json.loads(full.stdout.strip().splitlines()[-1])
    assert a["summary"]["stats"]["solver"] == "clarke"
    store = tmp_path / "s2"
    proc = subprocess.Popen(cli("run", str(cfg), "--store", str(store), "--json"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while not list(store.glob("*/checkpoints/flow.npz")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ck = list(store.glob("*/checkpoints/flow.npz"))
    assert ck, "no checkpoint was written"
    rid = ck[0].parent.parent.name
    res = subprocess.run(cli("resume", rid, "--store", str(store), "--json"), env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr
    b = json.loads(res.stdout.strip().splitlines()[-1])
    assert b["summary"]["stats"]["resumed_from"] >= 1 and b["summary"]["stats"]["solver"] == "clarke"
    A, B = np.load(os.path.join(a["path"], "arrays.npz")), np.load(os.path.join(b["path"], "arrays.npz"))
    assert set(A.files) == set(B.files)
    for k in A.files:
        np.testing.assert_array_equal(A[k], B[k], err_msg=k)
