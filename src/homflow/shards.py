"""Shards of work run in-process, in a pool of spawned processes or as Ray tasks; the driver gets their results back.

A *shard* is one picklable call ``fn(payload) -> value`` (a sweep point, a batch of census directions). Workers
return values (arrays, file contents); the driver alone writes the run store and its SQLite index, through the
``on_result`` callback, as each shard finishes. So a worker that dies leaves nothing half-written: its shard is run
again (at most ``max_retries`` more times) on a fresh worker, and the healthy workers go on undisturbed.

Backends:

* ``'local'`` with ``workers = 1``: in the driver's process.
* ``'local'`` with ``workers > 1``: ``workers`` long-lived spawned processes (JAX does not survive ``fork``), one
  shard at a time each, each on CPUs of its own (``pin``, the default, :func:`cpu_plan`: JAX processes sharing every
  core slowed each other down several times over); the driver only waits. Not pinned: the driver itself (a thread,
  already warm) and ``workers - 1`` processes on every CPU. A worker watches its parent and exits when the parent
  dies, so killing the driver stops its workers.
* ``'ray'``: Ray tasks with declared resources (``num_cpus``, ``num_gpus``), ``max_retries`` for a task whose worker
  died, at most ``workers`` shards in flight; ``ray.init(address=...)`` gives up with a clear message after
  ``connect_timeout_s`` when no cluster answers.

All workers share JAX's persistent compilation cache (:func:`enable_compilation_cache`), so a program compiled once,
by any worker or an earlier run, is loaded instead of compiled again.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["ShardError", "run_shards", "enable_compilation_cache", "compilation_cache_dir", "worker_setup",
           "release_compiled_programs", "cpu_plan", "ONE_CPU_XLA_FLAGS"]

# a shard whose worker died is run again at most this many times (a deterministic crash must not loop forever)
DEFAULT_MAX_RETRIES = 2
# how long ``ray.init(address=...)`` may take before we say that no cluster answers
DEFAULT_CONNECT_TIMEOUT_S = 30.0
# how often a pool worker checks that its parent is alive
PARENT_POLL_S = 0.5
# XLA's CPU flags for a process with one CPU of its own: no intra-op thread pool (a pool of threads on one core only
# hands work around; docs/performance.md, "Several flows at once on a CPU")
ONE_CPU_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


class ShardError(RuntimeError):
    """A backend could not be used (no Ray installed, no cluster at the address): the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------------
# the persistent compilation cache
def compilation_cache_dir() -> Path | None:
    """Where JAX's persistent compilation cache lives: ``$HOMFLOW_JAX_CACHE`` (``off`` disables it), else
    ``$XDG_CACHE_HOME/homflow/jax`` (default ``~/.cache/homflow/jax``)."""
    env = os.environ.get("HOMFLOW_JAX_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "homflow" / "jax"


def enable_compilation_cache(path: os.PathLike | str | None = None, *, min_compile_time_s: float = 0.0) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``path`` (default :func:`compilation_cache_dir`) for every
    program, however small (``min_compile_time_s = 0``, any entry size), so that worker processes and later runs
    load compiled programs instead of compiling them. Returns the directory, or ``None`` if disabled or unusable."""
    import jax

    p = Path(path).expanduser() if path is not None else compilation_cache_dir()
    if p is None:
        return None
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(p))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return p


# ---------------------------------------------------------------------------------------------------------------------
# compiled programs in long-lived processes
MAP_FRACTION = 0.5  # release compiled programs once a process holds this fraction of the kernel's memory-map limit


def _map_counts() -> tuple[int, int] | None:
    """``(memory mappings of this process, the kernel's per-process limit vm.max_map_count)``; ``None`` where
    ``/proc`` does not say (not Linux)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read().strip())
        with open("/proc/self/maps", "rb") as f:
            n = sum(1 for _ in f)
    except (OSError, ValueError):
        return None
    return n, limit


def release_compiled_programs(fraction: float = MAP_FRACTION, *, force: bool = False) -> bool:
    """Drop JAX's compiled programs (``jax.clear_caches()``, then a garbage collection) when this process holds more
    than ``fraction`` of the kernel's per-process memory-map limit (Linux ``vm.max_map_count``, 65,530 by default), or
    always with ``force``. Returns whether it released them.

    Why: every program XLA compiles for the CPU keeps its machine code in memory mappings of its own (hundreds for a
    loop-heavy program such as the non-smooth flow's), held as long as JAX caches the program. A process that
    compiles thousands of distinct programs (a sweep worker, a census driver, a test session) reaches the limit, and
    the next compile's allocation fails inside LLVM with a segmentation fault instead of an error. Programs dropped
    here are compiled again (or loaded from the persistent cache) when next called. Workers of
    :func:`run_shards` call this between shards.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1]; got {fraction!r}.")
    if not force:
        counts = _map_counts()
        if counts is None or counts[0] <= fraction * counts[1]:
            return False
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    return True


def worker_setup(cache_dir: str | None, parent_pid: int | None = None) -> None:
    """What every worker does first: float64 on, the shared compilation cache, and (pool workers) exit when the
    parent process is gone. Idempotent."""
    from . import enable_x64

    enable_x64()
    if cache_dir:
        enable_compilation_cache(cache_dir)
    if parent_pid and not getattr(worker_setup, "_watching", False):
        worker_setup._watching = True  # type: ignore[attr-defined]

        def watch():
            while True:
                if os.getppid() != parent_pid:
                    os._exit(70)  # the driver died: stop computing for nobody
                time.sleep(PARENT_POLL_S)

        threading.Thread(target=watch, daemon=True, name="homflow-parent-watch").start()


# ---------------------------------------------------------------------------------------------------------------------
# CPUs of the pool's processes
def cpu_plan(workers: int, cpus=None) -> list[tuple[int, ...]] | None:
    """The CPUs each of ``workers`` processes of a local pool computes on: ``cpus`` (default: the CPUs this process
    may run on, ``os.sched_getaffinity``) split into ``workers`` disjoint, contiguous sets as equal as they come, or,
    with more workers than CPUs, one CPU each in turn. ``None`` (no pinning) for one worker, one CPU, or a platform
    that cannot pin (``os.sched_setaffinity`` is Linux's).

    Why: XLA's CPU backend gives every process a pool of intra-op threads as large as the machine. Two JAX processes
    computing side by side on all cores slowed each other down 4-5 times (two non-smooth flows on 2 cores), while
    each pinned to its own core, single-threaded, ran at its speed alone (docs/performance.md)."""
    if cpus is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        cpus = os.sched_getaffinity(0)
    cpus = sorted(int(c) for c in cpus)
    if workers < 2 or len(cpus) < 2:
        return None
    if workers >= len(cpus):
        return [(cpus[i % len(cpus)],) for i in range(workers)]
    q, r = divmod(len(cpus), workers)
    plan, i = [], 0
    for w in range(workers):
        k = q + (w < r)
        plan.append(tuple(cpus[i:i + k]))
        i += k
    return plan


# ---------------------------------------------------------------------------------------------------------------------
def run_shards(fn: Callable[[Any], Any], payloads: Mapping[Any, Any], *, on_result: Callable[[Any, Any], None],
               on_failure: Callable[[Any, str], None], backend: str = "local", workers: int = 1,
               max_retries: int = DEFAULT_MAX_RETRIES, address: str | None = None, num_cpus: float = 1.0,
               num_gpus: float = 0.0, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
               cache_dir: str | None = None, progress: Callable[[float, str], None] | None = None,
               inline: bool = True, pin: bool | None = None) -> None:
    """Run ``fn(payload)`` for every ``payloads[key]`` and hand each value to ``on_result(key, value)`` in the
    driver as it arrives; a shard that raised, or whose worker died more than ``max_retries`` times, goes to
    ``on_failure(key, reason)``.

    Arguments:
        fn: a module-level (picklable) function; it should catch its own errors and return them as values.
        backend: ``'local'`` or ``'ray'``. workers: shards in flight at once (processes for ``'local'``).
        max_retries: extra attempts for a shard whose worker died. num_cpus, num_gpus: Ray resources per shard.
        address: Ray cluster address (``None``: start a local Ray with ``workers`` CPUs).
        inline: with the local backend and ``workers > 1``, the driver computes shards too (in a thread, while it
            waits), beside ``workers - 1`` spawned processes; ``False``: ``workers`` processes, the driver only waits.
        pin: with the local backend and ``workers > 1``, ``workers`` spawned processes compute every shard, each on
            CPUs of its own (:func:`cpu_plan`; ``inline`` is then off: the driver's XLA already runs with the
            machine's threads), a worker with a single CPU without XLA's intra-op threads (:data:`ONE_CPU_XLA_FLAGS`,
            unless ``XLA_FLAGS`` already sets ``xla_cpu_multi_thread_eigen``). ``False``: every process on every CPU,
            XLA's defaults.
            ``None`` (default): on, unless ``$HOMFLOW_PIN_WORKERS`` is ``off`` (or ``0``, ``false``, ``no``).
        cache_dir: the compilation cache shared by the workers (default :func:`compilation_cache_dir`;
            ``$HOMFLOW_JAX_CACHE=off`` disables it; see :func:`enable_compilation_cache`).

    Raises:
        ValueError: bad ``backend``, ``workers``, ``max_retries``, ``num_cpus``, ``num_gpus``.
        ShardError: Ray requested but not installed, or no cluster answering at ``address``.
    """
    if backend not in ("local", "ray"):
        raise ValueError(f"`backend` must be 'local' or 'ray'; got {backend!r}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be an integer >= 1; got {workers!r}.")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"`max_retries` must be an integer >= 0; got {max_retries!r}.")
    if pin is None:
        pin = os.environ.get("HOMFLOW_PIN_WORKERS", "on").strip().lower() not in ("off", "0", "false", "no")
    if not isinstance(pin, bool):
        raise ValueError(f"`pin` must be True, False or None ($HOMFLOW_PIN_WORKERS); got {pin!r}.")
    if not num_cpus > 0 or not num_gpus >= 0:
        raise ValueError(f"`num_cpus` must be > 0 and `num_gpus` >= 0; got {num_cpus!r}, {num_gpus!r}.")
    progress = progress or (lambda f, m: None)
    if cache_dir is None:
        default = compilation_cache_dir()
        cache_dir = str(default) if default is not None else None
    todo = dict(payloads)
    if not todo:
        return
    if backend == "ray":
        _run_ray(fn, todo, on_result, on_failure, workers, max_retries, address, num_cpus, num_gpus,
                 connect_timeout_s, cache_dir, progress)
    elif workers == 1:
        for i, (k, p) in enumerate(todo.items()):
            progress(i / len(todo), f"shard {i + 1}/{len(todo)}")
            try:
                v = fn(p)
            except Exception as e:  # noqa: BLE001 - the shard failed; go on with the others
                on_failure(k, f"{type(e).__name__}: {e}")
                continue
            finally:
                release_compiled_programs()
            on_result(k, v)
        progress(1.0, "done")
    else:
        _run_pool(fn, todo, on_result, on_failure, workers, max_retries, cache_dir, progress, inline, pin)


# ---------------------------------------------------------------------------------------------------------------------
# the local pool
def _pool_main(conn, cache_dir: str | None, parent_pid: int, cpus=None) -> None:  # pragma: no cover - a child
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    if cpus:  # before JAX starts its CPU backend (at the first computation), so its threads inherit both
        os.sched_setaffinity(0, cpus)
        flags = os.environ.get("XLA_FLAGS", "")
        if len(cpus) == 1 and "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {ONE_CPU_XLA_FLAGS}".strip()
    worker_setup(cache_dir, parent_pid)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn, key, payload = msg
        try:
            out = ("ok", fn(payload))
        except Exception as e:  # noqa: BLE001
            out = ("error", f"{type(e).__name__}: {e}")
        conn.send((key, out))
        release_compiled_programs()


def _run_pool(fn, todo, on_result, on_failure, workers, max_retries, cache_dir, progress, inline=True,
              pin=True) -> None:
    """``workers - 1`` spawned processes plus the driver itself (``inline``: a thread of the driver computes shards
    while the processes start; it has imported and compiled already, so two workers beat one even for short sweeps).
    ``pin``: ``workers`` spawned processes on CPUs of their own (:func:`cpu_plan`), the driver only waits: a
    driver whose XLA threads (started multi-threaded) were pinned to one core beside a worker ran several times
    slower than unpinned (its intra-op threads wait on each other on one core).
    """
    import multiprocessing as mp
    import queue as _queue
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    queue = list(todo)
    attempts = {k: 0 for k in queue}
    n, done = len(queue), 0
    lock = threading.Lock()
    procs: dict[int, tuple[Any, Any, Any]] = {}  # slot -> (process, connection, key in flight or None)
    local: _queue.Queue = _queue.Queue()

    def take():
        with lock:
            if not queue:
                return None
            k = queue.pop(0)
            attempts[k] += 1
            return k

    plan = cpu_plan(min(workers, n)) if pin else None
    if plan is not None:  # every shard in a pinned, single-threaded worker; the driver only waits (docstring)
        inline = False
    n_procs = min(workers - 1 if inline else workers, n)

    def start(slot: int) -> None:
        a, b = ctx.Pipe()
        cpus = None if plan is None else plan[slot]
        p = ctx.Process(target=_pool_main, args=(b, cache_dir, os.getpid(), cpus), daemon=True,
                        name=f"homflow-worker-{slot}")
        p.start()
        b.close()
        procs[slot] = (p, a, None)

    def feed(slot: int) -> None:
        p, conn, _ = procs[slot]
        k = take()
        if k is not None:
            conn.send((fn, k, todo[k]))
        procs[slot] = (p, conn, k)

    def inline_loop() -> None:
        while (k := take()) is not None:
            try:
                out = ("ok", fn(todo[k]))
            except Exception as e:  # noqa: BLE001
                out = ("error", f"{type(e).__name__}: {e}")
            local.put((k, out))
        local.put(None)

    def deliver(key, kind, value) -> None:
        nonlocal done
        done += 1
        (on_result if kind == "ok" else on_failure)(key, value)
        progress(done / n, f"{done}/{n} done")

    thread = None
    try:
        for slot in range(n_procs):
            start(slot)
            feed(slot)
        if inline:
            thread = threading.Thread(target=inline_loop, daemon=True, name="homflow-inline-shards")
            thread.start()
        inline_busy = inline
        while inline_busy or any(k is not None for _, _, k in procs.values()) or (queue and procs):
            watched = [c for _, c, k in procs.values() if k is not None] \
                + [p.sentinel for p, _, k in procs.values() if k is not None]
            ready = wait(watched, timeout=0.05 if inline_busy else None) if watched else []
            if not watched and inline_busy:
                time.sleep(0.05)
            while True:
                try:
                    item = local.get_nowait()
                except _queue.Empty:
                    break
                if item is None:
                    inline_busy = False
                else:
                    deliver(item[0], *item[1])
            for slot, (p, conn, k) in list(procs.items()):
                if k is None:
                    if queue:  # a retried shard came back after this worker went idle
                        feed(slot)
                    continue
                if conn in ready or conn.poll():
                    try:
                        key, (kind, value) = conn.recv()
                    except (EOFError, OSError):
                        pass  # died while sending: treated as a dead worker below
                    else:
                        deliver(key, kind, value)
                        feed(slot)
                        continue
                if p.sentinel in ready or not p.is_alive():
                    p.join()
                    conn.close()
                    reason = f"its worker process died (exit code {p.exitcode})"
                    if attempts[k] <= max_retries:
                        with lock:
                            queue.insert(0, k)
                        progress(done / n, f"retrying a shard: {reason}")
                    else:
                        deliver(k, "error", f"{reason}, {attempts[k]} times")
                    start(slot)
                    feed(slot)
            if not procs and not inline_busy and queue:  # no worker left to take a retried shard
                start(0)
                feed(0)
    finally:
        for p, conn, _ in procs.values():
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.time() + 5.0
        for p, conn, k in procs.values():
            if k is not None:  # interrupted mid-shard: no one will read its result
                p.kill()
            p.join(max(0.0, deadline - time.time()))
            if p.is_alive():
                p.kill()
                p.join()
            conn.close()


# ---------------------------------------------------------------------------------------------------------------------
# Ray
def _ray_shard(fn, payload, cache_dir):  # pragma: no cover - runs in a Ray worker
    worker_setup(cache_dir)
    try:
        return fn(payload)
    finally:
        release_compiled_programs()  # Ray reuses its worker processes


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _keep_ray_on_loopback(ray) -> None:
    """A cluster on this machine stays on 127.0.0.1.

    Ray resolves a loopback address (``ray.init(address="127.0.0.1:PORT")``, and the node address of a new local
    cluster) to the host's outward-facing address (the source address of a route to the internet). A head started
    with ``ray start --head --node-ip-address=127.0.0.1`` listens on loopback only, so the driver then dials an
    address where nothing listens and fails (or, behind a firewall, waits). Ray's switch for single-machine use
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when Ray is imported) makes it resolve loopback to loopback; it
    is applied here for loopback and local clusters only, so a remote address is resolved as Ray does.
    """
    try:
        import ray._private.ray_constants as ray_constants
    except ImportError:  # pragma: no cover - a Ray without the switch resolves as it does
        return
    if hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        ray_constants.ENABLE_RAY_CLUSTER = False


def ray_connect(address: str | None, *, num_cpus: int | None = None,
                timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S):
    """``ray.init`` that never waits forever: a TCP probe of ``host:port`` first, then ``ray.init`` in a thread that
    must answer within ``timeout_s``. Returns the ``ray`` module.

    Raises:
        ShardError: Ray is not installed, or no cluster answers at ``address``.
    """
    try:
        import ray
    except ImportError:
        raise ShardError("`--backend ray` needs the ray package, which is not installed: pip install "
                         "'homflow[ray]' (or use --backend local).") from None
    if ray.is_initialized():
        return ray
    host, _, port = address.rpartition(":") if address and not address.startswith("ray://") else ("", "", "")
    if address is None or host in LOOPBACK_HOSTS:
        _keep_ray_on_loopback(ray)
    if address and address not in ("auto", "local") and not address.startswith("ray://"):
        import socket

        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=min(timeout_s, 5.0)).close()
        except (OSError, ValueError) as e:
            raise ShardError(f"no Ray cluster answers at --address {address!r} ({e}); start one with `ray start "
                             f"--head --port=PORT` or leave out --address for a local Ray.") from None
    box: dict[str, Any] = {}

    def init():
        try:
            kw: dict[str, Any] = dict(address=address, ignore_reinit_error=True, log_to_driver=False,
                                      include_dashboard=False, logging_level="ERROR")
            if address is None:
                kw["num_cpus"] = num_cpus
            ray.init(**kw)
            box["ok"] = True
        except Exception as e:  # noqa: BLE001
            box["error"] = e

    if address is None:
        # A new local cluster starts in this thread: Ray's daemons die with the *thread* that started them (Linux
        # parent-death signal), so starting them in a helper thread would kill the cluster as soon as it returns.
        # Starting a local cluster cannot wait on an unreachable address, so no timeout is needed.
        init()
        t = None
    else:
        t = threading.Thread(target=init, daemon=True, name="homflow-ray-init")
        t.start()
        t.join(timeout_s)
    if t is not None and t.is_alive():
        raise ShardError(f"no Ray cluster answered at --address {address!r} within {timeout_s:g} s; check that "
                         f"`ray status --address {address}` works there, or leave out --address for a local Ray.")
    if "error" in box:
        e = box["error"]
        raise ShardError(f"could not connect to Ray at {address or 'a new local cluster'!r}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return ray


def _run_ray(fn, todo, on_result, on_failure, workers, max_retries, address, num_cpus, num_gpus, connect_timeout_s,
             cache_dir, progress) -> None:
    ray = ray_connect(address, num_cpus=workers, timeout_s=connect_timeout_s)
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                        retry_exceptions=False)(_ray_shard)
    queue = list(todo)
    n, done = len(queue), 0
    inflight: dict[Any, Any] = {}  # ObjectRef -> key
    fn_ref = ray.put(fn)
    try:
        while queue or inflight:
            while queue and len(inflight) < workers:
                k = queue.pop(0)
                inflight[remote.remote(fn_ref, todo[k], cache_dir)] = k
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                k = inflight.pop(ref)
                done += 1
                try:
                    value = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the worker died more than max_retries times, or fn raised
                    on_failure(k, f"Ray task failed after {max_retries} retries: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}")
                else:
                    on_result(k, value)
                progress(done / n, f"{done}/{n} done")
    finally:
        for ref in inflight:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001, S110 - best effort on the way out
                pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit("homflow.shards is a library module")
