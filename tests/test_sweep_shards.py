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
    """workers = 2: one spawned process and the driver's own thread share the shards; every shard arrives once."""
    got = {}
    run_shards(square_and_pid, {i: i for i in range(8)}, on_result=got.__setitem__, on_failure=print, workers=2)
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
