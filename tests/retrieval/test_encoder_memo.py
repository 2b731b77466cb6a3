"""The query encoder's memo of recent texts, and the switch that turns it off for benchmarks."""

from __future__ import annotations

import numpy as np
import pytest

from ralmspec_vllm.retrieval.encoder import (
    DEFAULT_ENCODER,
    MEMO_ENV,
    MEMO_SIZE,
    QueryEncoder,
    clear_memos,
    encoder_for,
)


def count_passes(encoder: QueryEncoder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the encoder's forward passes, appended as they run."""
    encoded: list[int] = []
    inner = encoder._encode

    def counting(texts: list[str], show_progress: bool) -> np.ndarray:
        encoded.append(len(texts))
        return inner(texts, show_progress)

    monkeypatch.setattr(encoder, "_encode", counting)
    return encoded


@pytest.mark.parametrize("memo", ["1", "0"])
def test_memo_serves_repeats_unless_switched_off(
    memo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the memo a repeated text is not encoded again; with ``RALMSPEC_ENCODER_MEMO=0``
    (what ``bench_retrieval`` sets, so that a cell's encode time is never a memo hit) every
    call encodes. Same vectors either way."""
    monkeypatch.setenv(MEMO_ENV, memo)
    encoder = QueryEncoder()
    encoded = count_passes(encoder, monkeypatch)
    first = encoder.encode(["who wrote the iliad", "capital of france"])
    again = encoder.encode(["capital of france", "who wrote the iliad"])
    assert np.array_equal(first[::-1], again)
    assert encoded == ([2] if memo == "1" else [2, 2])


def test_clear_memos_makes_every_shared_encoder_encode_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What ``bench_latency`` does before each run: a method answering the same question
    after another must encode its queries itself, not find the other's encodings."""
    encoder = encoder_for(DEFAULT_ENCODER)  # shared: made by whichever test came first
    monkeypatch.setattr(encoder, "_memo_size", MEMO_SIZE)
    encoded = count_passes(encoder, monkeypatch)
    encoder.clear_memo()
    encoder.encode(["who founded rome"])
    encoder.encode(["who founded rome"])
    assert encoded == [1]  # the memo served the repeat
    clear_memos()
    encoder.encode(["who founded rome"])
    assert encoded == [1, 1]  # encoded again


def test_a_text_being_encoded_is_waited_for_not_encoded_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two calls for one text at once (a plain step scores its guess beside its search):
    one forward pass, both get its vector; the other texts of a call are encoded as usual.
    A failed pass leaves the waiter to encode the text itself."""
    import threading
    import time

    monkeypatch.setenv(MEMO_ENV, "1")
    encoder = QueryEncoder()
    encoded: list[list[str]] = []
    inner = encoder._encode
    fail = threading.Event()

    def slow(texts: list[str], show_progress: bool) -> np.ndarray:
        encoded.append(list(texts))
        time.sleep(0.2)
        if fail.is_set() and len(encoded) == 1:
            raise RuntimeError("injected")
        return inner(texts, show_progress)

    monkeypatch.setattr(encoder, "_encode", slow)
    results: dict[str, np.ndarray] = {}

    def call(name: str, texts: list[str]) -> None:
        try:
            results[name] = encoder.encode(texts)
        except RuntimeError:
            results[name] = np.empty(0)

    first = threading.Thread(target=call, args=("first", ["capital of peru"]))
    first.start()
    time.sleep(0.05)  # the first pass is running
    call("second", ["capital of peru", "longest river"])
    first.join()
    assert encoded == [["capital of peru"], ["longest river"]]
    assert np.array_equal(results["first"][0], results["second"][0])
    assert np.array_equal(results["second"][0], inner(["capital of peru"], False)[0])

    encoded.clear()
    encoder.clear_memo()
    fail.set()
    first = threading.Thread(target=call, args=("first", ["capital of chile"]))
    first.start()
    time.sleep(0.05)
    call("second", ["capital of chile"])
    first.join()
    assert results["first"].size == 0  # its pass failed ...
    assert encoded == [["capital of chile"], ["capital of chile"]]  # ... so the waiter encoded
    assert np.array_equal(results["second"][0], inner(["capital of chile"], False)[0])


def test_busy_seconds_count_forward_passes_not_memo_hits(monkeypatch: pytest.MonkeyPatch) -> None:
    """``busy_s``: the time passes held the encoder, which a retriever reports as its
    ``encoder_busy_s`` counter for the server's load rule."""
    monkeypatch.setenv(MEMO_ENV, "1")
    encoder = QueryEncoder()
    assert encoder.busy_s == 0.0
    encoded = count_passes(encoder, monkeypatch)
    encoder.encode(["who painted the night watch", "the longest river in asia"])
    after_pass = encoder.busy_s
    assert after_pass > 0.0 and encoded == [2]
    encoder.encode(["the longest river in asia"])  # a memo hit: no pass, no time
    assert encoder.busy_s == after_pass and encoded == [2]
