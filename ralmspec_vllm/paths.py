"""Where heavy one-time artefacts live: the cache directory.

Built indexes, downloaded wheels and parsed question sets go under one folder, never into the
repository: ``$RALMSPEC_CACHE`` when set, else ``~/.cache/ralmspec-vllm``.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "RALMSPEC_CACHE"
DEFAULT_CACHE = Path("~/.cache/ralmspec-vllm")


def cache_dir(*parts: str, create: bool = True) -> Path:
    """The cache directory (or a subfolder of it), created on demand."""
    root = os.environ.get(CACHE_ENV) or str(DEFAULT_CACHE)
    path = Path(root).expanduser().joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
