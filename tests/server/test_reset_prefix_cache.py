"""``POST /reset_prefix_cache`` on the real server, with both ways of reaching vLLM.

Evidence that the reset empties vLLM's prefix cache: a RaLM baseline request reports the
prompt tokens vLLM served from KV (``ralm.prefix_cached_tokens``, summed over its LM calls).
Asked cold (right after a reset), a question gets some hits from its own earlier LM calls;
asked again, it also hits the blocks its first run left, so it reports more; asked after
another reset it must report exactly the cold count again (greedy, one request at a time,
so the LM calls are the same). The answer must not change either way.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.serving_server import ServerProcess
from ralmspec_vllm.retrieval.client import RetrieverClient

from .conftest import API_KEY, RALM, Served

pytestmark = pytest.mark.vllm

AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = "Which rivers flow through the old city of Prague and its bridges?"


async def reset(http: httpx.AsyncClient, attempts: int = 50) -> None:
    """Reset, retrying while requests of earlier tests still hold KV blocks."""
    for _ in range(attempts):
        reply = await http.post("/reset_prefix_cache", headers=AUTH)
        assert reply.status_code == 200
        if reply.json() == {"reset": True}:
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the prefix cache was never reset")


async def ask(http: httpx.AsyncClient, model: str, question: str) -> tuple[list[int], int]:
    """A baseline answer's token ids and its prefix-cached prompt tokens."""
    body = {
        "model": model,
        "prompt": question,
        "max_tokens": 16,
        "return_token_ids": True,
        "ralm": {"mode": "baseline"},
    }
    reply = await http.post("/v1/completions", json=body, headers=AUTH, timeout=300)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    return data["choices"][0]["token_ids"], data["ralm"]["prefix_cached_tokens"]


async def check_reset_empties_the_cache(http: httpx.AsyncClient, model: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        reply = await http.post("/reset_prefix_cache", headers=headers)
        assert reply.status_code == 401
        assert reply.json()["error"]["code"] == "invalid_api_key"
    await reset(http)
    cold_answer, cold = await ask(http, model, QUESTION)
    warm_answer, warm = await ask(http, model, QUESTION)
    assert warm > cold  # the second run found the first one's blocks
    await reset(http)
    again_answer, again = await ask(http, model, QUESTION)
    assert again == cold  # ... and after the reset it found none of them
    assert cold_answer == warm_answer == again_answer


async def test_reset_resubmit_path(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        model = (await http.get("/v1/models", headers=AUTH)).json()["data"][0]["id"]
        await check_reset_empties_the_cache(http, model)


async def test_reset_empties_the_retrievers_query_memo(served: Served) -> None:
    """The reset also empties the retriever's query-encoder memo (its ``ResetCaches``), so
    a benchmark's RaLMSpec run after the baseline's encodes its queries itself. Read through
    the retriever's own RPC, which reports what it dropped."""
    retriever = served.service.retriever
    assert isinstance(retriever, RetrieverClient)
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        model = (await http.get("/v1/models", headers=AUTH)).json()["data"][0]["id"]
        await reset(http)
        assert await retriever.reset_caches() == 0  # the HTTP reset left nothing
        first, _ = await ask(http, model, QUESTION)
        await reset(http)
        assert await retriever.reset_caches() == 0  # ... again, after an answer's queries
        again, _ = await ask(http, model, QUESTION)
        assert await retriever.reset_caches() > 0  # without a reset the queries stay
        assert first == again


async def test_reset_scheduler_hook_sessions(
    tiny_model_dir: Path, small_index: Path, tmp_path: Path
) -> None:
    """``serve --lm-path sessions`` as the benchmark runs it. A request in flight keeps its
    paused sessions' KV blocks, so a reset then must answer false (vLLM's verdict)."""
    argv = ["--model", str(tiny_model_dir), "--index", str(small_index), "--seed", "0"]
    argv += ["--max-model-len", "1024", "--max-doc-tokens", str(RALM.max_doc_tokens)]
    argv += ["--lm-path", "sessions", "--api-key", API_KEY]
    server = await asyncio.to_thread(ServerProcess.start, argv, tmp_path / "serve.log", 600)
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            model = (await http.get("/v1/models", headers=AUTH)).json()["data"][0]["id"]
            await check_reset_empties_the_cache(http, model)
            body: dict[str, Any] = {
                "model": model,
                "prompt": "Tell me everything about the history of astronomy.",
                "max_tokens": 800,
                "stream": True,
                "ralm": {"mode": "baseline"},
            }
            async with http.stream(
                "POST", "/v1/completions", json=body, headers=AUTH, timeout=300
            ) as stream:
                lines = stream.aiter_lines()
                async for line in lines:
                    if line.startswith("data: ") and json.loads(line[6:])["choices"]:
                        break  # the first verified text: the request is mid-answer
                held = await http.post("/reset_prefix_cache", headers=AUTH)
                assert held.json() == {"reset": False}
            await reset(http)  # leaving the stream aborted the request and freed its KV
    finally:
        await asyncio.to_thread(server.stop)
