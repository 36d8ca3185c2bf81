"""The Ray backend on a real local cluster: a head started with `ray start --head` on 127.0.0.1, a sweep run through
``ray.init(address=...)`` with two workers, one worker process SIGKILLed mid-task; the sweep completes with every
point exactly once (Ray retries the task), the driver alone having written the store. Ray is an optional extra, but
this test does not skip without it: CI installs it, and a missing Ray fails here with the line to install it."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from homflow.store import RunStore

POINT = """
experiment = "flow"
loss = "square"
analyses = ["loss_norm", "balance"]
[data]
kind = "teacher_student"
n = 20
d = 3
teacher_width = 2
labels = "value"
[model]
kind = "two_layer"
width = 5
[init]
scale = 1e-2
[flow]
t1 = 60.0
segments = 3
n_save = 10
[[checks]]
metric = "balance_drift"
tolerance = 1e-6
[sweep]
name = "ray"
[sweep.grid]
"init.seed" = [0, 1, 2, 3]
"""


def _require_ray():
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.fail("ray is not installed; the Ray backend is tested for real in CI: "
                    f"`{sys.executable} -m pip install ray==2.60.0` (homflow[ray]).")
    return Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _task_pids(name: str = "ray::_ray_shard") -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if f.read().startswith(name.encode()):
                        out.append(int(d))
            except OSError:
                pass
    return out


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on 127.0.0.1 (``ray start --head --block``), two CPUs; yields its address."""
    ray_bin = _require_ray()
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="hfray", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    # Ray 2.5x authenticates with a token once one exists in ~/.ray (an earlier local ray.init() writes it): the head
    # then demands it while a driver given an explicit address, whose mode Ray fixes when it is imported, does not
    # send it. This loopback-only test cluster runs without tokens on both sides, whatever ~/.ray holds.
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # the head stays on 127.0.0.1 (Ray otherwise resolves --node-ip-address=127.0.0.1 to the host's outward address)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
                             "--object-store-memory=100000000", "--disable-usage-stats", f"--temp-dir={tmp}"],
                            env=env, stdout=open(Path(tmp) / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, "`ray start --head` exited: " + (Path(tmp) / "head.log").read_text()[-2000:]
                time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def _drive_and_kill_one_task(work):
    """Run ``work()`` in a thread; SIGKILL the first Ray task process seen once it has run a second. Returns
    (result, pid killed)."""
    box = {}

    def drive():
        try:
            box["res"] = work()
        except BaseException as e:  # noqa: BLE001
            box["err"] = e

    t = threading.Thread(target=drive)
    t.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and t.is_alive() and time.time() < deadline:
        pids = _task_pids()
        if pids:
            time.sleep(1.0)  # let it get into the flow
            if pids[0] in _task_pids():
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
        time.sleep(0.1)
    t.join(600)
    assert not t.is_alive(), "the work did not finish"
    assert "err" not in box, box.get("err")
    assert killed is not None, "no Ray task process was seen running (nothing was killed)"
    return box["res"], killed


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_ray_cluster_sweep_survives_a_killed_worker(tmp_path, ray_head):
    import ray
    import tomllib

    from homflow.sweep import parse_sweep, run_sweep

    sw = parse_sweep(tomllib.loads(POINT))
    store = RunStore(tmp_path / "store")
    try:
        res, _ = _drive_and_kill_one_task(lambda: run_sweep(
            sw, store, backend="ray", workers=2, address=ray_head, max_retries=3, connect_timeout_s=120,
            cache_dir=str(tmp_path / "cache")))
    finally:
        ray.shutdown()
    recs = store.list(sweep=res.sweep)
    assert sorted(r.point for r in recs) == [0, 1, 2, 3]  # every point exactly once
    assert all(r.status == "completed" and r.passed for r in recs), [(r.point, r.status, r.error) for r in recs]
    assert Path(res.report).is_file() and store.check()["ok"]


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_ray_cluster_census_survives_a_killed_worker(tmp_path, ray_head):
    """A census of a depth-3 diagonal network (closed-form NCF escape times) sharded into Ray tasks, one task
    process SIGKILLed mid-run: every member arrives exactly once and equals the in-process census."""
    import functools

    import jax
    import numpy as np
    import ray

    from homflow.census import CensusOptions, DriverOptions, census
    from homflow.data import Dataset
    from homflow.models import DiagonalLinear
    from homflow.shards import run_shards

    data = Dataset(np.ones((1, 1)), np.ones(1))
    model = DiagonalLinear(1, 3, key=jax.random.PRNGKey(0))
    phis = np.linspace(0.1, 2 * np.pi - 0.1, 12)
    dirs = np.stack([np.cos(phis), np.sin(phis)], axis=1)
    opts = CensusOptions(deltas=(1e-3, 1e-4), escape_factor=10.0, t_after=2.0, rtol=1e-10,
                         driver=DriverOptions(batch_size=4, chunk_steps=50))
    runner = functools.partial(run_shards, backend="ray", workers=2, address=ray_head, max_retries=3,
                               connect_timeout_s=120, cache_dir=str(tmp_path / "cache"))
    try:
        sharded, _ = _drive_and_kill_one_task(lambda: census(model, data, opts, directions=dirs, runner=runner,
                                                             n_shards=6))
    finally:
        ray.shutdown()
    local = census(model, data, opts, directions=dirs)
    a, b = sharded.table, local.table
    assert len(a) == len(b) == 2 * len(phis)  # every (direction, delta) once
    assert sorted(zip(a["direction"].tolist(), a["delta"].tolist())) == sorted(
        zip(b["direction"].tolist(), b["delta"].tolist()))
    np.testing.assert_array_equal(a["escaped"], b["escaped"])  # directions with u0 <= 0 <= v0 never escape
    esc = a["escaped"]
    assert esc.sum() == 2 * np.sum((dirs[:, 0] > 0) | (dirs[:, 1] < 0))
    np.testing.assert_allclose(a["t_escape"][esc], b["t_escape"][esc], rtol=1e-12)
    for name, col in a.columns.items():  # every numeric column of the table, row by row
        if np.asarray(col).dtype.kind == "f":
            np.testing.assert_allclose(col, b[name], rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=name)


@pytest.mark.ray_cluster
@pytest.mark.slow  # needs Ray, which `make test-slow` installs (the optional extra homflow[ray])
def test_ray_address_without_cluster_fails_fast(tmp_path):
    _require_ray()
    from homflow.shards import ShardError, ray_connect

    t0 = time.time()
    with pytest.raises(ShardError, match="no Ray cluster"):
        ray_connect(f"127.0.0.1:{_free_port()}", timeout_s=5.0)
    listener = socket.socket()  # something listens there, but it is not Ray: the timeout, not a hang
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        with pytest.raises(ShardError, match="within 3 s|could not connect"):
            ray_connect(f"127.0.0.1:{listener.getsockname()[1]}", timeout_s=3.0)
    finally:
        listener.close()
    assert time.time() - t0 < 60


@pytest.mark.ray_cluster
@pytest.mark.slow
def test_ray_without_address_starts_a_local_cluster_on_loopback():
    """``backend='ray'`` without an address starts a local cluster (on 127.0.0.1) that outlives the call that started
    it: Ray's daemons die with the thread that spawned them, so the start must not happen in a helper thread."""
    _require_ray()
    import operator

    import ray

    from homflow.shards import run_shards

    ray.shutdown()
    got = {}
    try:
        for _ in range(2):  # a second call reuses the running cluster
            run_shards(operator.neg, {i: i for i in range(4)}, on_result=got.__setitem__, on_failure=print, backend="ray",
                       workers=2)
            assert got == {i: -i for i in range(4)}
            got.clear()
        nodes = [k for k in ray.cluster_resources() if k.startswith("node:") and k != "node:__internal_head__"]
        assert nodes == ["node:127.0.0.1"], nodes
    finally:
        ray.shutdown()
