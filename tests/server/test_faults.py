"""Fault injection: a retriever that cannot be reached gives clean OpenAI-style errors."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest

from ralmspec_vllm.entrypoints.openai.app import build_app
from ralmspec_vllm.retrieval.client import RetrieverClient
from ralmspec_vllm.service import RaLMService, ServiceConfig

from .conftest import RALM

pytestmark = pytest.mark.vllm


def dead_target() -> str:
    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def test_unreachable_retriever_answers_503(vllm_lm: Any) -> None:
    client = RetrieverClient(dead_target(), timeout_s=0.5, max_retries=1, backoff_s=0.01)
    service = RaLMService(
        vllm_lm, vllm_lm.tokenizer, client, ServiceConfig(ralm=RALM), max_model_len=1024
    )
    transport = httpx.ASGITransport(app=build_app(service, "m"))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        reply = await http.post("/v1/completions", json={"prompt": "hello"})
        assert reply.status_code == 503
        error = reply.json()["error"]
        assert error["type"] == "server_error" and "unavailable" in error["message"]
        for prompt in ("hello", ["hello", "world"]):  # one prompt, and a batch
            body = {"prompt": prompt, "stream": True}
            reply = await http.post("/v1/completions", json=body)
            events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert "unavailable" in json.loads(events[-2])["error"]["message"]
        reply = await http.post("/v1/completions", json={"prompt": ["hello", "world"]})
        assert reply.status_code == 503
    assert vllm_lm.in_flight() == 0
    await client.close()
