"""A weightless model directory (``random_model``) starts with vLLM's dummy loader.

Slow only because it starts a second engine; the 7B shape itself is for the GPU.
"""

from __future__ import annotations

import pytest

from ralmspec_vllm.engine.lm import VllmLanguageModel
from ralmspec_vllm.engine.models import TINY_SHAPE, random_model
from ralmspec_vllm.engine.settings import EngineConfig

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


async def test_weightless_model_generates_with_dummy_weights() -> None:
    path = random_model(TINY_SHAPE)
    assert not list(path.glob("*.safetensors"))
    config = EngineConfig(model=str(path), max_model_len=512)
    assert config.engine_kwargs()["load_format"] == "dummy"
    lm = await VllmLanguageModel.create(config)
    try:
        out = await lm.generate([5, 6, 7, 8], 8, "dummy")
        assert len(out.token_ids) == 8
    finally:
        await lm.shutdown()
