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


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_ray_cluster_sweep_survives_a_killed_worker(tmp_path):
    ray_bin = _require_ray()
    import ray

    from homflow.sweep import parse_sweep, run_sweep

    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="hfray", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false",
                             "--object-store-memory=100000000", "--disable-usage-stats", f"--temp-dir={tmp}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, "`ray start --head` exited"
                time.sleep(0.5)
        import tomllib

        sw = parse_sweep(tomllib.loads(POINT))
        store = RunStore(tmp_path / "store")
        box = {}

        def drive():
            try:
                box["res"] = run_sweep(sw, store, backend="ray", workers=2, address=f"127.0.0.1:{port}",
                                       max_retries=3, connect_timeout_s=120, cache_dir=str(tmp_path / "cache"))
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
        assert not t.is_alive(), "the sweep did not finish"
        assert "err" not in box, box.get("err")
        assert killed is not None, "no Ray task process was seen running (nothing was killed)"
        res = box["res"]
        recs = store.list(sweep=res.sweep)
        assert sorted(r.point for r in recs) == [0, 1, 2, 3]  # every point exactly once
        assert all(r.status == "completed" and r.passed for r in recs), [(r.point, r.status, r.error) for r in recs]
        assert Path(res.report).is_file() and store.check()["ok"]
    finally:
        try:
            ray.shutdown()
        finally:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()


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
