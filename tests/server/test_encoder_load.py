"""The load rule's second reading: the retriever's query encoder, busy one pass at a time,
as the server reads it from a real gRPC retriever service on 127.0.0.1 (the small MiniLM
flat index). Other clients keep the encoder full; this server's ``ralmspec`` requests then
run as the baseline, and speculate again once the encoder has room."""

from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path

from core.fakes import FakeLM, FakeTokenizer
from core.world import LONG_QUESTION
from retrieval.synthetic import ListDocumentStore

from ralmspec_vllm.core.config import RaLMConfig
from ralmspec_vllm.load import RetrieverLoad
from ralmspec_vllm.retrieval.client import RetrieverClient
from ralmspec_vllm.retrieval.server import start_server
from ralmspec_vllm.service import RaLMService, ServiceConfig
from ralmspec_vllm.types import Document
from server.test_service import collect, fallbacks


class OtherClients:
    """A thread that keeps the retriever's encoder busy with fresh texts (no memo hits)."""

    def __init__(self, encode: object) -> None:
        self.encode = encode
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for i in itertools.count():
            if self.stop.is_set():
                return
            self.encode([f"another client's question number {i} about the albedo of ice"])  # type: ignore[operator]

    def __enter__(self) -> OtherClients:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


async def until(condition: object, service: RaLMService, timeout_s: float = 30.0) -> None:
    """Answer baseline requests (their searches return, so the server reads the encoder)
    until ``condition()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, "the condition never held"
        await collect(service, LONG_QUESTION, mode="baseline", retrieval_stride=2)
        await asyncio.sleep(0.05)


async def test_a_full_query_encoder_sends_ralmspec_requests_to_the_baseline(
    small_index: Path,
) -> None:
    from ralmspec_vllm.retrieval.factory import RetrieverConfig, open_retriever

    retriever = open_retriever(small_index, RetrieverConfig(backend="flat", progress=False))
    running = await start_server(retriever, "127.0.0.1", 0)
    try:
        async with RetrieverClient(running.target, timeout_s=30.0) as client:
            config = ServiceConfig(ralm=RaLMConfig(max_new_tokens=48))
            service = RaLMService(
                FakeLM(eos_at_length=37), FakeTokenizer(), client, config, max_model_len=1024
            )
            service.retriever_load = RetrieverLoad(window_s=4.0, min_span_s=1.0)
            assert service.config.max_retriever_utilization == 0.4
            _, want = await collect(service, LONG_QUESTION, mode="baseline", retrieval_stride=2)
            _, idle = await collect(service, LONG_QUESTION, mode="ralmspec", retrieval_stride=2)
            assert not idle.load_fallback and idle.trace.verifications  # room: it speculates

            with OtherClients(retriever.encode):
                full = service.config.max_encoder_busy
                assert full == 0.8
                await until(lambda: service.retriever_load.encoder_busy() > full, service)
                assert service.retriever_load.query_cost_s == 0.0  # uncalibrated: by queries
                # alone the retriever reads as idle, so only the encoder's reading can say busy
                before = fallbacks("retriever")
                _, busy = await collect(service, LONG_QUESTION, mode="ralmspec", retrieval_stride=2)
                assert busy.load_fallback and busy.trace.mode == "baseline"
                assert fallbacks("retriever") == before + 1
                assert busy.token_ids == want.token_ids

            await asyncio.sleep(3.5)  # no search returned meanwhile: the reading is stale
            assert service.fallback_reason() is None
            _, again = await collect(service, LONG_QUESTION, mode="ralmspec", retrieval_stride=2)
            assert not again.load_fallback and again.trace.verifications
            assert again.token_ids == want.token_ids
    finally:
        await running.stop(grace=0)


async def test_a_retriever_without_an_encoder_is_asked_once() -> None:
    """BM25 has no query encoder: after one ``Info`` without ``encoder_busy_s`` the server
    stops asking, and its load reads by queries alone."""
    from ralmspec_vllm.retrieval.bm25 import BM25Retriever

    texts = [f"passage {i} about the albedo of ice and the capital of alabama" for i in range(20)]
    docs = [Document(d, "", text) for d, text in enumerate(texts)]
    bm25 = BM25Retriever.from_texts(texts, ListDocumentStore(docs))
    running = await start_server(bm25, "127.0.0.1", 0)
    try:
        async with RetrieverClient(running.target, timeout_s=30.0) as client:
            asked: list[str] = []
            client.on_call = asked.append
            config = ServiceConfig(ralm=RaLMConfig(max_new_tokens=48))
            service = RaLMService(
                FakeLM(eos_at_length=37), FakeTokenizer(), client, config, max_model_len=1024
            )
            for _ in range(3):
                await collect(service, LONG_QUESTION, mode="baseline", retrieval_stride=2)
                await asyncio.sleep(1.1)  # past the poll interval
            assert asked.count("Info") == 1 and not service._encoder_readable
            assert service.retriever_load.encoder_busy() == 0.0
    finally:
        await running.stop(grace=0)
