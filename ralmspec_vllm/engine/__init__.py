"""The only package that imports vLLM: generation adapter, models, settings, version gate.

- ``version``   the vLLM version gate; the one module importing vLLM classes by path.
- ``settings``  process environment (CPU thread/compile settings) and ``EngineConfig``.
- ``lm``        ``VllmLanguageModel``: ``core.lm.LanguageModel`` on vLLM's ``AsyncLLM``.
- ``models``    built-in models by name (tiny random Llama, SmolLM2, Qwen, random 7B shape),
                built once into the artefact cache (``artifacts``, ``conversion``).
- ``plugin``    the ``vllm.general_plugins`` entry point.

Importing this package imports neither vLLM nor torch; the names below load lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EngineConfig": "ralmspec_vllm.engine.settings",
    "VllmLanguageModel": "ralmspec_vllm.engine.lm",
    "CacheStats": "ralmspec_vllm.engine.lm",
    "resolve_model": "ralmspec_vllm.engine.models",
    "load_vllm": "ralmspec_vllm.engine.version",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
