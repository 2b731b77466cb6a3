"""The query encoder's memo of recent texts, and the switch that turns it off for benchmarks."""

from __future__ import annotations

import numpy as np
import pytest

from ralmspec_vllm.retrieval.encoder import (
    DEFAULT_ENCODER,
    MEMO_ENV,
    QueryEncoder,
    clear_memos,
    encoder_for,
)


@pytest.mark.parametrize("memo", ["1", "0"])
def test_memo_serves_repeats_unless_switched_off(
    memo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the memo a repeated text is not encoded again; with ``RALMSPEC_ENCODER_MEMO=0``
    (what ``bench_retrieval`` sets, so that a cell's encode time is never a memo hit) every
    call encodes. Same vectors either way."""
    monkeypatch.setenv(MEMO_ENV, memo)
    encoder = QueryEncoder()
    encoded: list[int] = []
    inner = encoder._encode

    def counting(texts: list[str], show_progress: bool) -> np.ndarray:
        encoded.append(len(texts))
        return inner(texts, show_progress)

    monkeypatch.setattr(encoder, "_encode", counting)
    first = encoder.encode(["who wrote the iliad", "capital of france"])
    again = encoder.encode(["capital of france", "who wrote the iliad"])
    assert np.array_equal(first[::-1], again)
    assert encoded == ([2] if memo == "1" else [2, 2])


def test_clear_memos_makes_every_shared_encoder_encode_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What ``bench_latency`` does before each run: a method answering the same question
    after another must encode its queries itself, not find the other's encodings."""
    monkeypatch.setenv(MEMO_ENV, "1")
    encoder = encoder_for(DEFAULT_ENCODER)
    encoded: list[int] = []
    inner = encoder._encode

    def counting(texts: list[str], show_progress: bool) -> np.ndarray:
        encoded.append(len(texts))
        return inner(texts, show_progress)

    monkeypatch.setattr(encoder, "_encode", counting)
    encoder.clear_memo()
    encoder.encode(["who founded rome"])
    encoder.encode(["who founded rome"])
    assert encoded == [1]  # the memo served the repeat
    clear_memos()
    encoder.encode(["who founded rome"])
    assert encoded == [1, 1]  # encoded again
