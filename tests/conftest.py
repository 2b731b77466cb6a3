"""Session-wide fixtures and markers shared by every test package.

- The process settings of ``ralmspec_vllm.engine.settings`` (CPU: one OpenMP thread, no
  torch.compile, 1 GiB KV cache, offline mode) are applied here, at collection time, before
  any test module imports torch or vLLM.
- ``tiny_model_dir``: the seeded random-weight Llama with SmolLM2's tokenizer (cached).
- ``vllm_lm``: ONE ``VllmLanguageModel`` on the tiny model for the whole session, started
  lazily inside pytest-asyncio's session event loop and shut down at the end. Tests that
  share it must use prompts of their own (e.g. from a test-specific seed) when they assert
  on prefix-cache counts, since the engine's cache is shared.
- ``smollm2_dir``: SmolLM2-135M-Instruct converted from its PyPI GGUF (cached; minutes the
  first time on a fresh machine).
- Tests marked ``gpu`` are skipped without CUDA, tests marked ``vllm`` without vLLM 0.26.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from ralmspec_vllm.engine.lm import VllmLanguageModel
from ralmspec_vllm.engine.settings import EngineConfig, apply_process_settings, detect_device

apply_process_settings()


@functools.cache
def cuda_available() -> bool:
    if detect_device() != "cuda":
        return False
    import torch

    return bool(torch.cuda.is_available())


@functools.cache
def vllm_problem() -> str | None:
    """Why vLLM tests cannot run here, or None when they can."""
    from ralmspec_vllm.engine.version import UnsupportedVllmError, check_vllm_version

    try:
        check_vllm_version()
    except UnsupportedVllmError as exc:
        return str(exc)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "gpu" in item.keywords and not cuda_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "vllm" in item.keywords and (problem := vllm_problem()) is not None:
            item.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from ralmspec_vllm.engine.models import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from ralmspec_vllm.engine.models import smollm2_135m

    return smollm2_135m()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_lm(tiny_model_dir: Path) -> AsyncIterator[VllmLanguageModel]:
    """The session's shared vLLM engine on the tiny model."""
    lm = await VllmLanguageModel.create(EngineConfig(model=str(tiny_model_dir), seed=0))
    try:
        yield lm
    finally:
        await lm.shutdown()
