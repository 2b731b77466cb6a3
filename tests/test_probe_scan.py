"""``benchmarks/probe_scan.py``'s staggered load with callers that give up (rollbacks)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.probe_scan import staggered
from ralmspec_vllm.retrieval.flat import FlatRetriever


@pytest.mark.parametrize("honour", [True, False])
def test_given_up_searches_leave_the_walk_only_when_honoured(honour: bool) -> None:
    rng = np.random.default_rng(2)
    docs = rng.standard_normal((200_000, 32)).astype(np.float32)
    queries = rng.standard_normal((12, 32)).astype(np.float32)
    flat = FlatRetriever(docs, impl="torch", device="cpu", dtype="bfloat16", chunk_size=64,
                         scan="circular")  # fmt: skip
    walk = flat._circular
    assert walk is not None
    try:
        kept = staggered(flat, queries, 0.001, 4, 1, give_up_every=3, give_up_after_s=0.005,
                         honour_give_up=honour)  # fmt: skip
    finally:
        flat.close()  # waits for the walk: every search has ended
    assert len(kept) == 8 and all(s > 0 for s in kept)  # 4 of 12 gave up
    # given up on the walk or before boarding it (a thread that started late)
    assert flat.times.abandoned == (4 if honour else 0)
    assert walk.abandoned <= flat.times.abandoned
