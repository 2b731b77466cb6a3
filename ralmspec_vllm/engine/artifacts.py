"""The on-disk cache of converted and generated models, built once per machine.

``cache_dir()`` is ``$RALMSPEC_CACHE`` or ``~/.cache/ralmspec-vllm``. :func:`build_once`
creates one named directory in it exactly once, even when several processes (pytest-xdist
workers, a server and a benchmark) ask at the same time: the first takes an exclusive
``flock`` on ``<name>.lock``, builds into a temporary sibling directory and renames it into
place (atomic on one filesystem); the others wait on the lock and then find the directory.
A directory that exists is therefore always complete.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The artefact cache root (created if missing)."""
    root = os.environ.get("RALMSPEC_CACHE") or str(Path.home() / ".cache" / "ralmspec-vllm")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_once(name: str, build: Callable[[Path], None], root: Path | None = None) -> Path:
    """Return ``root/name``, calling ``build(tmp_dir)`` to create it if it does not exist.

    ``build`` writes the artefact's files into the empty directory it is given; if it raises,
    nothing is left behind and the error propagates.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a plain directory name, got {name!r}")
    root = cache_dir() if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if target.is_dir():
        return target
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if target.is_dir():
                return target
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
            start = time.perf_counter()
            try:
                build(tmp)
                tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared
                tmp.rename(target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            logger.info("built %s in %.1f s", target, time.perf_counter() - start)
            return target
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
