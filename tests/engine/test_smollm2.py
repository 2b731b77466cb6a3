"""SmolLM2-135M-Instruct from its PyPI GGUF: the conversion, and vLLM generating English."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from ralmspec_vllm.engine.lm import VllmLanguageModel
from ralmspec_vllm.engine.settings import EngineConfig


def test_conversion_fixes_special_tokens_and_drops_quantization(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["vocab_size"] == 49152
    assert config["eos_token_id"] == 2  # transformers 5.17 reads the GGUF's EOS as BOS (1)
    assert "quantization_config" not in config
    tokenizer = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tokenizer["eos_token"] == "<|im_end|>"
    assert list(smollm2_dir.glob("*.safetensors"))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def smollm2_lm(smollm2_dir: Path) -> AsyncIterator[VllmLanguageModel]:
    lm = await VllmLanguageModel.create(EngineConfig(model=str(smollm2_dir), max_model_len=1024))
    try:
        yield lm
    finally:
        await lm.shutdown()


def chat_prompt(lm: VllmLanguageModel, question: str) -> list[int]:
    tokenizer = lm.tokenizer
    text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.vllm
async def test_smollm2_answers_in_english(smollm2_lm: VllmLanguageModel) -> None:
    prompt = chat_prompt(smollm2_lm, "What is the capital of France?")
    out = await smollm2_lm.generate(prompt, 24, "france")
    text = smollm2_lm.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert "Paris" in text, text
    assert out.finished or len(out.token_ids) == 24
    if out.finished:  # EOS is the last token returned
        assert out.token_ids[-1] == smollm2_lm.tokenizer.eos_token_id == 2


@pytest.mark.vllm
async def test_smollm2_chunked_generation_is_identical(smollm2_lm: VllmLanguageModel) -> None:
    prompt = smollm2_lm.tokenizer.encode(
        "Retrieval-augmented language models fetch documents while they generate, so",
        add_special_tokens=False,
    )
    whole = await smollm2_lm.generate(prompt, 24, "whole")
    context, chunked = list(prompt), list[int]()
    for i in range(6):
        chunk = await smollm2_lm.generate(context, 4, f"chunk-{i}")
        chunked += chunk.token_ids
        context += chunk.token_ids
        if chunk.finished:
            break
    assert chunked == list(whole.token_ids)[: len(chunked)]
    assert len(chunked) == len(whole.token_ids)
