"""Incremental detokenization of verified tokens with the real SmolLM2 tokenizer (no vLLM)."""

from __future__ import annotations

import pytest

from ralmspec_vllm.entrypoints.openai.streaming import IncrementalDecoder, char_offsets

TEXTS = [
    "Plain ASCII text, with punctuation: done.",
    "Accents: héllo wörld, naïve café; CJK: 世界你好; emoji: 🎉🚀 and ZWJ 👩‍👩‍👧.",
    "  leading spaces\nnew lines\n\n and\ttabs",
]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from ralmspec_vllm.engine.models import smollm2_tokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer()))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_deltas_concatenate_to_the_decoded_text(tokenizer, text: str, chunk: int) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode(text, add_special_tokens=False)
    want = tokenizer.decode(ids, skip_special_tokens=True)
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(decoder.flush())
    assert "".join(deltas) == want
    assert not any("\ufffd" in d for d in deltas)  # never half a character
    if "🎉" in text and chunk == 1:
        assert "" in deltas[:-1]  # some token ended mid-character and was held back


def test_char_offsets_split_the_text_at_token_positions(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode(TEXTS[1], add_special_tokens=False)
    text = tokenizer.decode(ids)
    offsets = char_offsets(tokenizer, ids, range(len(ids) + 1))
    assert offsets[0] == 0 and offsets[-1] == len(text)
    assert offsets == sorted(offsets)
