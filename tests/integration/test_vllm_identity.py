"""Baseline vs RaLMSpec on real vLLM (the session's tiny random-weight Llama with SmolLM2's
tokenizer): token-identical answers with forced rollbacks, over real in-process retrievers
(FAISS flat with dense cache scoring, BM25 with corpus-statistics scoring), one at a time and
concurrently through ``BatchingRetriever``. Also checks that a kept prefix is served from
vLLM's prefix cache after a rollback.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from core.fakes import ScriptedRetriever
from core.test_real_retrievers import BagOfWords, Store
from core.world import forced

from ralmspec_vllm.core.batching import BatchingRetriever
from ralmspec_vllm.core.config import RaLMConfig, SpeculationConfig
from ralmspec_vllm.core.runner import RaLMEngine
from ralmspec_vllm.engine.lm import VllmLanguageModel
from ralmspec_vllm.retrieval.base import InProcessAsyncRetriever
from ralmspec_vllm.retrieval.bm25 import BM25Retriever
from ralmspec_vllm.retrieval.flat import FlatRetriever
from ralmspec_vllm.types import Document

pytestmark = pytest.mark.vllm

CONFIG = RaLMConfig(max_new_tokens=30)  # not a multiple of the 4-token retrieval stride
QUESTIONS = [
    "who wrote the novel about the white whale",
    "what is the name of the largest lake in the country that has the most lakes in the "
    "world, counted by number of lakes larger than one square kilometre, and why",
]
CONFIGS = [
    SpeculationConfig(speculation_stride=3),
    SpeculationConfig(speculation_stride=2, prefetch_k=20),
    SpeculationConfig(speculation_stride=1, async_verification=True),
    SpeculationConfig.preset("PSA", max_speculation_stride=8),
]


def corpus(lm: VllmLanguageModel, size: int = 120) -> list[Document]:
    """Passages made of real vocabulary words, so generated text matches them unevenly."""
    tok = lm.tokenizer
    words = [w.strip() for w in tok.decode(list(range(1000, 1600))).split() if w.strip()]
    rng = np.random.default_rng(7)
    return [Document(d, f"Title {d}", " ".join(rng.choice(words, 30))) for d in range(size)]


def flat(docs: list[Document]) -> FlatRetriever:
    vectors = BagOfWords().encode([d.contents for d in docs])
    return FlatRetriever(vectors, Store(docs), BagOfWords(), impl="faiss", device="cpu")


async def check(engine: RaLMEngine, questions: Sequence[str]) -> None:
    for question in questions:
        baseline = await engine.generate(question, "baseline")
        for spec in CONFIGS:
            result = await engine.generate(question, "ralmspec", speculation=spec)
            assert result.token_ids == baseline.token_ids, spec.label
            assert result.trace.step_doc_ids == baseline.trace.step_doc_ids


async def test_forced_rollbacks_on_vllm(vllm_lm: VllmLanguageModel) -> None:
    retriever = ScriptedRetriever(forced(lambda step: step % 3 == 2), doc_length=40)
    engine = RaLMEngine(vllm_lm, vllm_lm.tokenizer, retriever, CONFIG)
    baseline = await engine.generate(QUESTIONS[0], "baseline")
    retriever.freeze()
    for spec in CONFIGS:
        result = await engine.generate(QUESTIONS[0], "ralmspec", speculation=spec)
        assert result.token_ids == baseline.token_ids, spec.label
        # OS3 may turn to plain steps once it has measured the misses (fewer rollbacks)
        assert result.trace.rollbacks >= (1 if spec.adaptive else 2), spec.label
        # the correction step after a rollback re-uses the cached prefix (whole blocks)
        assert result.trace.num_cached_tokens > 0


@pytest.mark.parametrize("backend", ["flat", "bm25"])
async def test_real_retrievers_on_vllm(vllm_lm: VllmLanguageModel, backend: str) -> None:
    docs = corpus(vllm_lm)
    if backend == "flat":
        kb = InProcessAsyncRetriever(flat(docs))
        engine = RaLMEngine(vllm_lm, vllm_lm.tokenizer, kb, CONFIG, encoder=BagOfWords().encode)
    else:
        bm25 = BM25Retriever.from_texts([d.contents for d in docs], Store(docs))
        engine = RaLMEngine(vllm_lm, vllm_lm.tokenizer, InProcessAsyncRetriever(bm25), CONFIG)
    await check(engine, QUESTIONS)


async def test_concurrent_batched_on_vllm(vllm_lm: VllmLanguageModel) -> None:
    docs = corpus(vllm_lm)
    kb = InProcessAsyncRetriever(flat(docs))
    questions = [f"{q} {i}" for i, q in enumerate(QUESTIONS * 3)]
    sequential = RaLMEngine(vllm_lm, vllm_lm.tokenizer, kb, CONFIG)
    expected = [await sequential.generate(q, "baseline") for q in questions]
    batching = BatchingRetriever(kb, window_s=0.002)
    engine = RaLMEngine(
        vllm_lm,
        vllm_lm.tokenizer,
        batching,
        CONFIG,
        SpeculationConfig.preset("PSA"),
        encoder=BagOfWords().encode,
    )
    for mode in ("baseline", "ralmspec"):
        results = await engine.generate_many(questions, mode)  # type: ignore[arg-type]
        assert [r.token_ids for r in results] == [r.token_ids for r in expected], mode
    assert max(record.num_callers for record in batching.stats) > 1
