"""The ``vllm.general_plugins`` entry point (declared in pyproject.toml).

vLLM calls :func:`register` in every process it starts (front end and engine core), before
any model is built. Registration must therefore be cheap, re-entrant and must never touch
CUDA: it only records that it ran. The scheduler hook of the serving layer registers here
once it exists; until then this is a no-op apart from a debug log line.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

_registered_pids: set[int] = set()


def register() -> None:
    """Register ralmspec-vllm's extensions with vLLM (idempotent per process)."""
    pid = os.getpid()
    if pid in _registered_pids:
        return
    _registered_pids.add(pid)
    logger.debug("ralmspec-vllm plugin registered in process %d", pid)


def is_registered() -> bool:
    """True when :func:`register` has run in this process."""
    return os.getpid() in _registered_pids
