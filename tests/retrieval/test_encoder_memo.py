"""The query encoder's memo of recent texts, and the switch that turns it off for benchmarks."""

from __future__ import annotations

import numpy as np
import pytest

from ralmspec_vllm.retrieval.encoder import MEMO_ENV, QueryEncoder


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
