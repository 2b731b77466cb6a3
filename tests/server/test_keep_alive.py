"""Keep-alive races between uvicorn and a pooled HTTP client, on the real server.

uvicorn closes a connection that sat idle ``--timeout-keep-alive`` seconds from a timer
callback, without reading what arrived on it. The client's pool (httpx: expiry 5 s, the same
as uvicorn's default keep-alive) drops an idle connection after its own expiry or once it sees
the server's FIN. A request sent in the instant the server's timer is about to close the
connection is lost: the server never reads it and logs nothing, the openai client raises
``APIConnectionError('Connection error.')``.

``collide`` makes that instant deterministic. The real app (``build_app`` over the session's
``RaLMService``, configured by ``serve.uvicorn_config`` from ``serve`` flags) runs in the
session loop on 127.0.0.1; the client runs in a thread with its own loop. After the client's
first request has left its connection idle, the session loop is blocked past the server's
keep-alive deadline, so the keep-alive timer and a callback due just before it run in the same
loop iteration: the callback lets the client send its second request and waits until the
bytes have reached the server (on the idle connection, or a new one), then the timer closes
the connection. Only uvicorn's private connection state is read (to find that deadline).
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
import uvicorn
from openai._constants import DEFAULT_CONNECTION_LIMITS
from prometheus_client import REGISTRY

from benchmarks.serving_load import Job, RequestRecord, ask, never_answered
from ralmspec_vllm.entrypoints.cli import build_parser
from ralmspec_vllm.entrypoints.openai.app import build_app
from ralmspec_vllm.entrypoints.serve import uvicorn_config

from .conftest import MODEL_NAME, Served

pytestmark = pytest.mark.vllm

QUESTION = "Which rivers cross the plains of Hungary?"
Second = Callable[[openai.AsyncOpenAI], Awaitable[Any]]


async def _client_side(
    base_url: str, second: Second, idle: threading.Event, go: threading.Event, expiry_s: float
) -> Any:
    """Runs in its own thread and loop: one request that leaves a pooled idle connection,
    then ``second`` once the server loop says go. Returns its result or its exception."""
    limits = type(DEFAULT_CONNECTION_LIMITS)(max_connections=10, keepalive_expiry=expiry_s)
    http = openai.DefaultAsyncHttpxClient(limits=limits)
    client = openai.AsyncOpenAI(
        base_url=base_url + "/v1", api_key="unused", max_retries=0, http_client=http
    )
    try:
        await client.models.list()
        idle.set()
        await asyncio.to_thread(go.wait, 60)
        try:
            return await second(client)
        except Exception as err:
            return err
    finally:
        await client.close()


async def collide(served: Served, keep_alive_s: int, second: Second, expiry_s: float = 5.0) -> Any:
    """``second``'s outcome when sent at the server's keep-alive close (see module doc), with
    a client pool expiry of ``expiry_s``."""
    args = build_parser(argv := ["serve", "--timeout-keep-alive", str(keep_alive_s)])
    config = uvicorn_config(build_app(served.service, MODEL_NAME), args.parse_args(argv))
    assert config.timeout_keep_alive == keep_alive_s
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        idle, go = threading.Event(), threading.Event()
        client = _client_side(url, second, idle, go, expiry_s)
        outcome = asyncio.ensure_future(asyncio.to_thread(asyncio.run, client))
        assert await asyncio.to_thread(idle.wait, 60)
        conns: list[Any] = list(server.server_state.connections)  # uvicorn's HTTP/1.1 protocols
        assert len(conns) == 1
        conn = conns[0]
        close_at: float = conn.timeout_keep_alive_task.when()  # armed when the reply ended
        loop = asyncio.get_running_loop()

        def let_client_send() -> None:
            go.set()
            select.select([conn.transport.get_extra_info("socket"), listener], [], [], 30)

        loop.call_at(close_at - 0.001, let_client_send)
        time.sleep(max(0.0, close_at - loop.time()) + 0.05)  # a busy server loop
        return await outcome
    finally:
        server.should_exit = True
        await serving


def ok_count() -> float:
    labels = {"method": "baseline", "outcome": "ok"}
    return REGISTRY.get_sample_value("ralmspec_requests_total", labels) or 0.0


async def test_request_at_keep_alive_close_is_lost_then_resent(served: Served) -> None:
    """The race itself (a plain request fails unanswered), and the benchmark's ``ask``
    sending it again on a new connection: answered once, the resend counted."""

    async def plain(client: openai.AsyncOpenAI) -> Any:
        return await client.completions.create(model=MODEL_NAME, prompt=QUESTION, max_tokens=4)

    lost = await collide(served, 1, plain)
    assert isinstance(lost, openai.APIConnectionError), lost
    assert str(lost) == "Connection error." and never_answered(lost)

    job = Job("q0", QUESTION, "baseline", {"mode": "baseline"})

    async def benchmark_request(client: openai.AsyncOpenAI) -> RequestRecord:
        return await ask(client, MODEL_NAME, job, 6, time.perf_counter())

    before = ok_count()
    record = await collide(served, 1, benchmark_request)
    assert isinstance(record, RequestRecord), record
    assert record.error == "" and record.resends == 1
    assert record.text and record.completion_tokens >= 1
    assert ok_count() == before + 1  # the lost send never reached the app


async def test_server_keep_alive_outlives_client_pool(served: Served) -> None:
    """``serve``'s default keep-alive outlasts the openai client's pool expiry; scaled down
    (server 2 s, client 1 s), a plain request at the server's close instant is answered
    because the client already dropped the idle connection."""
    args = build_parser(["serve"]).parse_args(["serve"])
    default = uvicorn_config(build_app(served.service, MODEL_NAME), args).timeout_keep_alive
    client_expiry = DEFAULT_CONNECTION_LIMITS.keepalive_expiry
    assert client_expiry is not None and default > client_expiry + 10

    async def plain(client: openai.AsyncOpenAI) -> Any:
        return await client.completions.create(model=MODEL_NAME, prompt=QUESTION, max_tokens=4)

    answer = await collide(served, 2, plain, expiry_s=1.0)
    assert isinstance(answer, openai.types.Completion), answer
    assert answer.choices[0].text
