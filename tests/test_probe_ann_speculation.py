"""``benchmarks/probe_ann_speculation.py``: the replay's counts on a tiny knowledge base."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from corpus_fixtures import build_tiny_kb

from benchmarks.probe_ann_speculation import replay, summary

QUESTIONS = ["which king fought the battle by the river", "who painted the island city"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, object]:
    from transformers import AutoTokenizer

    from ralmspec_vllm.engine.models import smollm2_tokenizer
    from ralmspec_vllm.retrieval.factory import RetrieverConfig, open_retriever

    root = Path(tmp_path_factory.mktemp("probe"))
    kb = build_tiny_kb(root, np.random.default_rng(3), num_docs=60)
    exact = open_retriever(kb, RetrieverConfig(backend="flat", device="cpu"))
    hnsw = open_retriever(kb, RetrieverConfig(backend="hnsw", ef_search=16, progress=False))
    return exact, hnsw, AutoTokenizer.from_pretrained(str(smollm2_tokenizer()))


def test_an_exact_backend_is_never_outranked_in_its_own_cache(world: tuple) -> None:
    """Against itself, the exact search is its own nearest neighbour, and a cached top-1 is
    the cache's best: every miss is a document the earlier lists did not hold."""
    exact, _, tokenizer = world
    counts = replay(exact, exact, tokenizer, QUESTIONS, prefetch=3, steps=12)
    assert counts["steps"] > 0 and counts["ann_is_exact"] == counts["steps"]
    assert counts["truth_outranked"] == 0
    assert counts["hit"] + counts["truth_not_cached"] == counts["steps"]
    assert summary(counts)["ann_recall_at_1"] == 1.0


def test_every_step_is_a_hit_or_one_kind_of_miss(world: tuple) -> None:
    exact, hnsw, tokenizer = world
    counts = replay(hnsw, exact, tokenizer, QUESTIONS, prefetch=15, steps=12)
    misses = counts["truth_not_cached"] + counts["truth_outranked"]
    assert counts["steps"] > 0 and counts["hit"] + misses == counts["steps"]
    assert counts["spec_is_exact"] <= misses
    assert 0.0 <= summary(counts)["accuracy"] <= 1.0
