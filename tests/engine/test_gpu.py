"""The adapter with GPU defaults (fp32, block size 16, CUDA graphs): skipped without CUDA."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ralmspec_vllm.engine.lm import VllmLanguageModel
from ralmspec_vllm.engine.settings import EngineConfig

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]


async def test_gpu_prefix_cache_and_chunk_identity(tiny_model_dir: Path) -> None:
    lm = await VllmLanguageModel.create(
        EngineConfig(model=str(tiny_model_dir), device="cuda", gpu_memory_utilization=0.3)
    )
    try:
        assert lm.block_size == 16
        rng = random.Random(0)
        prompt = [rng.randrange(100, 49000) for _ in range(150)]
        whole = await lm.generate(prompt, 12, "whole")
        context, chunked = list(prompt), list[int]()
        for i in range(3):
            chunk = await lm.generate(context, 4, f"chunk-{i}")
            assert chunk.num_cached_tokens == ((len(context) - 1) // 16) * 16
            chunked += chunk.token_ids
            context += chunk.token_ids
        assert chunked == list(whole.token_ids)
    finally:
        await lm.shutdown()
