"""Provenance of a run: what ran (homflow, JAX, NumPy, Python versions, float64 on or off), where (platform, host,
device) and from which source (git commit of the homflow checkout, when it is one) and command line.

Recorded by the runner into every run's ``provenance.json`` and shown in its report.
"""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["provenance", "git_commit"]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit(path: Path | str | None = None, *, timeout_s: float = 5.0) -> str | None:
    """The commit of the git checkout holding ``path`` (default: the homflow package), with ``+dirty`` when tracked
    files differ from it; ``None`` outside a checkout or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=timeout_s)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def _device() -> dict[str, Any]:
    if "jax" not in sys.modules:  # a run that never touched JAX: do not start it just to describe it
        return {"device": None, "float64": None}
    import jax

    try:
        d = jax.devices()[0]
        desc = f"{d.platform}:{getattr(d, 'device_kind', '') or d.platform} (x{jax.device_count()})"
    except RuntimeError as e:  # pragma: no cover - no backend
        desc = f"unavailable ({e})"
    return {"device": desc, "float64": bool(jax.config.jax_enable_x64)}


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """A JSON-able record of the software, machine, source and command behind a run.

    Arguments:
        argv: the command line (default ``sys.argv``).
    """
    from . import __version__

    argv = sys.argv if argv is None else argv
    return {
        "homflow": __version__,
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "numpy": _version("numpy"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        **_device(),
        "git_commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in argv),
        "recorded": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
