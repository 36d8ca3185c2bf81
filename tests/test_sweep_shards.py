"""The shard executor (homflow.shards): a dead worker's shard is retried (bounded) while the healthy worker goes on,
every shard is delivered once to the driver, a shard that keeps killing its worker is reported, and killing the
driver stops its workers."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from homflow.shards import enable_compilation_cache, run_shards


def crash_once(payload):
    """Dies (SIGKILL-like) the first time it sees its marker file missing; otherwise squares the number."""
    x, marker, always = payload
    if always or (marker and not os.path.exists(marker)):
        if marker:
            Path(marker).write_text(str(os.getpid()))
        os._exit(9)
    time.sleep(0.05)
    return x * x


@pytest.mark.slow
def test_dead_worker_retried_and_every_shard_once(tmp_path):
    got, failed = [], {}
    payloads = {i: (i, str(tmp_path / f"m{i}") if i in (1, 4) else None, i == 5) for i in range(7)}
    run_shards(crash_once, payloads, on_result=lambda k, v: got.append((k, v)),
               on_failure=lambda k, r: failed.__setitem__(k, r), workers=2, max_retries=2, inline=False)
    assert sorted(got) == [(i, i * i) for i in range(7) if i != 5]  # each once, retried ones included
    assert list(failed) == [5] and "died" in failed[5] and "3 times" in failed[5]
    assert (tmp_path / "m1").exists() and (tmp_path / "m4").exists()


def test_bad_arguments():
    for kw, msg in (({"workers": 0}, "workers"), ({"backend": "dask"}, "backend"), ({"max_retries": -1}, "retries"),
                    ({"num_gpus": -1.0}, "num_gpus")):
        with pytest.raises(ValueError, match=msg):
            run_shards(abs, {0: 1}, on_result=print, on_failure=print, **kw)


def test_compilation_cache_dir(tmp_path, monkeypatch):
    import jax

    old = jax.config.jax_compilation_cache_dir
    try:
        p = enable_compilation_cache(tmp_path / "c")
        assert p == tmp_path / "c" and jax.config.jax_compilation_cache_dir == str(p)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        monkeypatch.setenv("HOMFLOW_JAX_CACHE", "off")
        assert enable_compilation_cache() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", old)


def test_killing_the_driver_stops_its_workers(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    driver = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from homflow.shards import run_shards
        from test_sweep_shards import sleeper
        run_shards(sleeper, {{i: {str(pids)!r} for i in range(4)}}, on_result=print, on_failure=print, workers=2,
                   inline=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", driver], env={**os.environ, "HOMFLOW_JAX_CACHE": "off"})
    deadline = time.time() + 180
    while time.time() < deadline and len(list(pids.iterdir())) < 2:
        time.sleep(0.1)
    workers = [int(p.name) for p in pids.iterdir()]
    assert len(workers) == 2, "the workers did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "workers outlived their driver"


def test_inline_driver_slot(tmp_path):
    """workers = 2, not pinned: one spawned process and the driver's own thread share the shards; every shard arrives
    once."""
    got = {}
    run_shards(square_and_pid, {i: i for i in range(8)}, on_result=got.__setitem__, on_failure=print, workers=2,
               pin=False)
    assert {k: v[0] for k, v in got.items()} == {i: i * i for i in range(8)}
    assert os.getpid() in {v[1] for v in got.values()}  # the driver computed some of them


def square_and_pid(x):
    time.sleep(0.3)
    return x * x, os.getpid()


def sleeper(pid_dir):
    Path(pid_dir, str(os.getpid())).write_text("")
    time.sleep(120)
    return 0


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_release_compiled_programs_frees_memory_maps():
    """Compiled CPU programs hold memory mappings until released; the guard drops them past its threshold only."""
    import jax
    import jax.numpy as jnp

    from homflow.shards import _map_counts, release_compiled_programs

    counts = _map_counts()
    if counts is None:
        pytest.skip("no /proc on this system")
    fns = [jax.jit(lambda x, i=i: jnp.sin(x) * i + jnp.cumsum(x) ** 2) for i in range(40)]
    for f in fns:
        f(jnp.ones(8)).block_until_ready()
    before = _map_counts()[0]
    assert not release_compiled_programs(fraction=1.0)  # far below the limit: nothing dropped
    assert release_compiled_programs(force=True)
    del fns
    import gc

    gc.collect()
    after = _map_counts()[0]
    assert after < before, (before, after)
    with pytest.raises(ValueError, match="fraction"):
        release_compiled_programs(fraction=0.0)


def test_cpu_plan_splits_the_cpus_into_disjoint_sets():
    from homflow.shards import cpu_plan

    assert cpu_plan(2, [0, 1]) == [(0,), (1,)]
    assert cpu_plan(3, range(8)) == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert cpu_plan(2, [5, 3, 9, 7]) == [(3, 5), (7, 9)]  # sorted, contiguous halves
    assert cpu_plan(3, [0, 1]) == [(0,), (1,), (0,)]  # more workers than CPUs: one each, in turn
    assert cpu_plan(1, range(4)) is None and cpu_plan(4, [2]) is None  # nothing to share
    for w in range(2, 9):  # every CPU used, none twice while there are enough
        plan = cpu_plan(w, range(7))
        flat = [c for p in plan for c in p]
        assert len(plan) == w and set(flat) == set(range(7))
        assert len(flat) == (7 if w <= 7 else w)


def where_am_i(x):
    """The CPUs the calling thread may run on, this process's XLA flags and pid, after a JAX computation."""
    import jax.numpy as jnp

    time.sleep(0.2)
    return float(jnp.sum(jnp.arange(x + 1.0))), sorted(os.sched_getaffinity(0)), os.environ.get("XLA_FLAGS", ""), \
        os.getpid()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="pinning needs Linux and two CPUs")
@pytest.mark.parametrize("pin,env", [(True, None), (False, None), (None, "off"), (None, None)])
def test_pool_processes_compute_on_cpus_of_their_own(pin, env, monkeypatch):
    """workers = 2, pinned (the default): two spawned workers compute every shard, one on each half of the CPUs, with
    XLA's intra-op threads off when a worker has one CPU; the driver computes none and its CPUs stay as they were.
    Not pinned: the driver and one worker, every process on every CPU, XLA's flags as given."""
    from homflow.shards import ONE_CPU_XLA_FLAGS, cpu_plan

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("HOMFLOW_PIN_WORKERS", raising=False)
    if env is not None:
        monkeypatch.setenv("HOMFLOW_PIN_WORKERS", env)
    mine = sorted(os.sched_getaffinity(0))
    got = {}
    run_shards(where_am_i, {i: i for i in range(8)}, on_result=got.__setitem__, on_failure=print, workers=2, pin=pin)
    assert {k: v[0] for k, v in got.items()} == {i: i * (i + 1) / 2 for i in range(8)}
    assert sorted(os.sched_getaffinity(0)) == mine  # the driver as before
    by_pid = {v[3]: (v[1], v[2]) for v in got.values()}
    assert len(by_pid) == 2  # two processes computed
    if pin or (pin is None and env is None):  # the default is on
        plan = cpu_plan(2, mine)
        assert os.getpid() not in by_pid  # the driver only waits
        assert sorted(cpus for cpus, _ in by_pid.values()) == sorted(list(p) for p in plan)
        for cpus, flags in by_pid.values():
            assert (ONE_CPU_XLA_FLAGS in flags) == (len(cpus) == 1)
    else:
        assert os.getpid() in by_pid  # the driver computed some
        assert all(cpus == mine for cpus, _ in by_pid.values())
        assert all(flags == "" for p, (_, flags) in by_pid.items() if p != os.getpid())


def test_pin_must_be_a_bool():
    with pytest.raises(ValueError, match="`pin` must be True, False or None .* got 'yes'"):
        run_shards(abs, {0: 1}, on_result=print, on_failure=print, pin="yes")
