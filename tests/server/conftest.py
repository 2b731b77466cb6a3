"""The real OpenAI-compatible server, once per test session, for ``tests/server``.

World: the tiny random-weight Llama (real SmolLM2 tokenizer) on vLLM (the session's shared
engine), a small real index (80 Wikipedia passages from the gensim dump, MiniLM vectors,
exact flat search) served by the real gRPC retriever service on 127.0.0.1 (OS-chosen port),
``RaLMService`` over a ``RetrieverClient`` (cache scored in the server, as ``serve`` does for
a dense retriever), and the FastAPI app on uvicorn on 127.0.0.1
(OS-chosen port) with an API key. Everything runs in the session's event loop, so tests are
async and use ``openai.AsyncOpenAI``. ``offline`` is a ``RaLMEngine`` over the same LM and
retriever: the reference the server's answers must equal token for token.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from ralmspec_vllm.core.config import RaLMConfig, SpeculationConfig
from ralmspec_vllm.core.encoding import AsyncEmbedder
from ralmspec_vllm.core.runner import RaLMEngine
from ralmspec_vllm.service import RaLMService, ServiceConfig, local_cache_scoring

API_KEY = "test-key-123"
MODEL_NAME = "tiny-ralm"
RALM = RaLMConfig(retrieval_stride=4, query_window=32, max_doc_tokens=64, max_new_tokens=16)
SPECULATION = SpeculationConfig.preset("PSA", max_speculation_stride=4)


@dataclass
class Served:
    """The running server and what tests need to check it."""

    base_url: str
    service: RaLMService
    offline: RaLMEngine
    lm: object
    titles: dict[int, str]


def _passages(path: Path, count: int = 80, every: int = 15) -> None:
    from ralmspec_vllm.retrieval.corpus import wiki_passages

    chosen = itertools.islice(wiki_passages(60), 0, count * every, every)
    with path.open("w", encoding="utf-8") as f:
        for p in chosen:
            f.write(json.dumps({"id": p.ext_id, "title": p.title, "text": p.text}) + "\n")


@pytest.fixture(scope="session")
def small_index() -> Path:
    """Built once per machine into the artefact cache (MiniLM encoding takes a while)."""
    from ralmspec_vllm.engine.artifacts import build_once
    from ralmspec_vllm.retrieval.kb import build_index

    def build(out: Path) -> None:
        _passages(out / "corpus.jsonl")
        build_index(out / "index", sources=(), corpus=out / "corpus.jsonl", show_progress=False)

    return build_once("server-test-index-v1", build) / "index"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def served(small_index: Path, vllm_lm: object) -> AsyncIterator[Served]:
    import uvicorn

    from ralmspec_vllm.entrypoints.openai.app import build_app
    from ralmspec_vllm.retrieval.client import RetrieverClient
    from ralmspec_vllm.retrieval.factory import RetrieverConfig, open_retriever
    from ralmspec_vllm.retrieval.kb import KnowledgeBase
    from ralmspec_vllm.retrieval.server import start_server

    kb = KnowledgeBase.open(small_index)
    retriever = open_retriever(kb, RetrieverConfig(backend="flat", device="cpu", progress=False))
    grpc_server = await start_server(retriever, "127.0.0.1", 0)
    client = RetrieverClient(grpc_server.target, timeout_s=30.0)
    await client.wait_ready()
    lm = vllm_lm
    tokenizer = lm.tokenizer  # type: ignore[attr-defined]
    max_model_len = lm.max_model_len  # type: ignore[attr-defined]
    # No retriever fallback here: these tests compare speculation itself with the baseline.
    # The fallback has its own tests (test_service, test_openai_server).
    config = ServiceConfig(
        ralm=RALM,
        speculation=SPECULATION,
        max_tokens_limit=256,
        batch_window_s=0.01,
        max_retriever_utilization=None,
    )
    # As `serve` builds it: the dense cache is scored here (the default "auto"), while the
    # offline reference ranks it with the retriever's Score: both must give the baseline.
    embedder = (await local_cache_scoring(client, config.cache_scoring)).embedder
    assert isinstance(embedder, AsyncEmbedder)
    service = RaLMService(
        lm,  # type: ignore[arg-type]
        tokenizer,
        client,
        config,
        max_model_len=max_model_len,
        embedder=embedder,
    )
    offline = RaLMEngine(lm, tokenizer, client, RALM, SPECULATION)  # type: ignore[arg-type]
    app = build_app(service, MODEL_NAME, [API_KEY])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    while not uv.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    titles = {d.doc_id: d.title for d in kb.documents.get(list(range(len(kb))))}
    yield Served(f"http://127.0.0.1:{port}", service, offline, lm, titles)
    uv.should_exit = True
    await task
    await client.close()
    await grpc_server.stop(0)


@pytest.fixture
def openai_client(served: Served):  # type: ignore[no-untyped-def]
    import openai

    return openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key=API_KEY, max_retries=0)
