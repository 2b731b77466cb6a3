"""The retriever client's failure handling, and the server's runners (thread, CLI process).

Fault injection only: a port with nothing listening, a retriever wrapper that sleeps past
the client's deadline, a server started late. The retriever behind the servers is the real
BM25 backend over a few real sentences (no model to load), or a real knowledge base for the
CLI. Elapsed-time assertions are loose bounds that catch hangs, not performance claims.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from ralmspec_vllm.retrieval.base import AsyncRetriever
from ralmspec_vllm.retrieval.bm25 import BM25Retriever
from ralmspec_vllm.retrieval.client import RetrieverClient
from ralmspec_vllm.retrieval.errors import (
    RetrieverRequestError,
    RetrieverServerError,
    RetrieverUnavailable,
)
from ralmspec_vllm.retrieval.server import RunningServer, ServerProcess, ServerThread, start_server
from ralmspec_vllm.retrieval.service import ServiceConfig
from ralmspec_vllm.types import Document, Hit, RetrieverInfo

TEXTS = [
    "Achilles was the son of the nymph Thetis and Peleus, king of Phthia.",
    "Albedo is the fraction of sunlight that is diffusely reflected by a body.",
    "Montgomery is the capital city of the U.S. state of Alabama.",
    "Anarchism is a political philosophy that advocates self-governed societies.",
    "Fresh snow has a high albedo and reflects most sunlight.",
]


def free_port() -> int:
    """A port the OS just handed out and that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def bm25() -> BM25Retriever:
    return BM25Retriever.from_texts(TEXTS)


class SlowRetriever:
    """A real retriever whose searches take ``delay_s`` longer (deadline fault injection)."""

    def __init__(self, inner: BM25Retriever, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.searches = 0

    @property
    def info(self) -> RetrieverInfo:
        return self.inner.info

    def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        self.searches += 1
        time.sleep(self.delay_s)
        return self.inner.search(queries, k, prefetch)

    def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        return self.inner.score(query, doc_ids)

    def documents(self, doc_ids: Sequence[int]) -> list[Document]:
        return self.inner.documents(doc_ids)


@pytest.fixture(scope="module")
async def server(bm25: BM25Retriever) -> AsyncIterator[RunningServer]:
    running = await start_server(bm25, "127.0.0.1", 0)
    yield running
    await running.stop(grace=0)


async def test_dead_port_raises_unavailable_after_bounded_retries() -> None:
    target = f"127.0.0.1:{free_port()}"
    client = RetrieverClient(target, timeout_s=0.5, max_retries=3, backoff_s=0.02)
    calls: list[str] = []
    client.on_call = calls.append
    start = time.monotonic()
    with pytest.raises(RetrieverUnavailable) as err:
        await client.search(["albedo"], 2)
    elapsed = time.monotonic() - start
    await client.close()
    assert err.value.target == target and target in str(err.value)
    assert err.value.attempts == 4 and calls == ["Search"]  # a call counts once, retried or not
    assert err.value.last_status == "UNAVAILABLE"
    # Budget: 4 attempts x 0.5 s deadline + 0.02 + 0.04 + 0.08 s of backoff (+ slack).
    assert elapsed < 4 * 0.5 + 0.14 + 5.0


async def test_zero_retries_means_one_attempt() -> None:
    async with RetrieverClient(f"127.0.0.1:{free_port()}", max_retries=0) as client:
        with pytest.raises(RetrieverUnavailable) as err:
            await client.info()
    assert err.value.attempts == 1


async def test_slow_server_hits_deadline_then_unavailable(bm25: BM25Retriever) -> None:
    slow = SlowRetriever(bm25, delay_s=0.6)
    running = await start_server(slow, "127.0.0.1", 0, warm_up=False)
    try:
        async with RetrieverClient(running.target, timeout_s=0.1, max_retries=2) as client:
            with pytest.raises(RetrieverUnavailable) as err:
                await client.search(["albedo"], 2)
            assert err.value.attempts == 3
            assert err.value.last_status == "DEADLINE_EXCEEDED"
            # A call with a longer per-call deadline gets its answer from the same server.
            got = await client.search(["snow albedo"], 2, timeout_s=30)
            assert got == bm25.search(["snow albedo"], 2)
            # Non-search RPCs are not slowed down by the wrapper and meet the short deadline.
            assert await client.score("albedo", [1, 4]) == bm25.score("albedo", [1, 4])
    finally:
        await running.stop(grace=0)


async def test_overloaded_server_resource_exhausted_is_retried(bm25: BM25Retriever) -> None:
    slow = SlowRetriever(bm25, delay_s=0.3)
    config = ServiceConfig(max_concurrent_rpcs=1)
    running = await start_server(slow, "127.0.0.1", 0, config, warm_up=False)
    try:
        async with (
            RetrieverClient(running.target, timeout_s=30, max_retries=0) as impatient,
            RetrieverClient(
                running.target, timeout_s=30, max_retries=20, backoff_s=0.05
            ) as patient,
        ):
            busy = asyncio.ensure_future(patient.search(["albedo"], 1))
            while slow.searches == 0:  # the one allowed RPC is now in flight
                await asyncio.sleep(0.01)
            with pytest.raises(RetrieverUnavailable) as err:
                await impatient.search(["Thetis"], 1)
            assert err.value.last_status == "RESOURCE_EXHAUSTED" and err.value.attempts == 1
            second = await patient.search(["Thetis"], 1)  # retried until the first finished
            assert await busy == bm25.search(["albedo"], 1)
            assert second == bm25.search(["Thetis"], 1)
    finally:
        await running.stop(grace=0)


async def test_invalid_argument_is_not_retried(server: RunningServer) -> None:
    # With a 30 s backoff (>= 15 s after jitter), a single retry would blow the 5 s guard.
    async with RetrieverClient(server.target, max_retries=3, backoff_s=30.0) as client:
        async with asyncio.timeout(5):
            with pytest.raises(RetrieverRequestError, match="top_k"):
                await client.search(["albedo"], 0)
            with pytest.raises(RetrieverRequestError, match=r"text\.texts\[0\]: query is empty"):
                await client.search([""], 1)


async def test_retries_reach_a_server_that_starts_late(bm25: BM25Retriever) -> None:
    port = free_port()
    client = RetrieverClient(f"127.0.0.1:{port}", timeout_s=1.0, max_retries=8, backoff_s=0.1)

    async def start_later() -> RunningServer:
        await asyncio.sleep(0.3)
        return await start_server(bm25, "127.0.0.1", port)

    starter = asyncio.create_task(start_later())
    try:
        got = await client.search(["capital of Alabama"], 1)
        assert got == bm25.search(["capital of Alabama"], 1)
    finally:
        await client.close()
        await (await starter).stop(grace=0)


async def test_wait_ready(server: RunningServer) -> None:
    async with RetrieverClient(server.target) as client:
        await client.wait_ready(10)
    async with RetrieverClient(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(RetrieverUnavailable, match=r"Health\.Check"):
            await client.wait_ready(0.5)


async def test_client_maps_messages_to_project_types(
    server: RunningServer, bm25: BM25Retriever
) -> None:
    async with RetrieverClient(server.target) as client:
        hits = await client.search(["snow reflects sunlight", "Thetis"], 3)
        assert hits == bm25.search(["snow reflects sunlight", "Thetis"], 3)
        assert all(type(h) is Hit for row in hits for h in row)
        info = await client.info()
        assert type(info) is RetrieverInfo and info.backend == "bm25"
        assert info.num_docs == len(TEXTS) and info.bm25 == bm25.info.bm25
        assert await client.vectors([0]) is None
        assert await client.search([], 3) == [] and await client.score("x", []) == []


async def test_second_server_on_a_busy_port_fails(
    server: RunningServer, bm25: BM25Retriever
) -> None:
    with pytest.raises(OSError, match="could not bind"):
        await start_server(bm25, "127.0.0.1", server.port)
    async with RetrieverClient(server.target) as client:  # the first one still serves
        assert await client.search(["Thetis"], 1) == bm25.search(["Thetis"], 1)


def test_client_is_an_async_retriever() -> None:
    client: AsyncRetriever = RetrieverClient("127.0.0.1:1")  # checked by mypy
    assert callable(client.search)


async def test_vector_only_dense_retriever_is_served() -> None:
    import numpy as np

    from ralmspec_vllm.retrieval.flat import FlatRetriever

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    flat = FlatRetriever(vectors)  # no encoder: embedding queries only
    running = await start_server(flat, "127.0.0.1", 0)  # warm-up failure is only logged
    try:
        async with RetrieverClient(running.target) as client:
            queries = rng.standard_normal((3, 8)).astype(np.float32)
            assert await client.search_vectors(queries, 4) == flat.search_vectors(queries, 4)
            with pytest.raises(RetrieverServerError, match="no query encoder"):
                await client.search(["text"], 1)
    finally:
        await running.stop(grace=0)


async def test_ivf_routing_and_lists_are_served(server: RunningServer) -> None:
    """An IVF server hands a client its routing (centroids and nprobe, bit for bit) and each
    document's list, as the in-process retriever gives them; unknown doc ids are a clear
    INVALID_ARGUMENT; a backend without lists (BM25) answers that it has none."""
    import numpy as np

    from ralmspec_vllm.retrieval.ann import IVFFlatRetriever

    vectors = np.random.default_rng(4).standard_normal((800, 8)).astype(np.float32)
    ivf = IVFFlatRetriever(vectors, nlist=12, nprobe=3, progress=False, save=False)
    running = await start_server(ivf, "127.0.0.1", 0)
    try:
        async with RetrieverClient(running.target) as client:
            routing = await client.routing()
            assert routing is not None and routing.nprobe == 3
            assert routing.centroids.tobytes() == ivf.routing().centroids.tobytes()
            ids = [5, 799, 0, 5]
            lists = await client.lists(ids)
            assert lists is not None and lists.tolist() == ivf.lists(ids).tolist()
            assert (await client.lists([])).tolist() == []  # type: ignore[union-attr]
            with pytest.raises(RetrieverRequestError, match="doc_ids"):
                await client.lists([800])
    finally:
        await running.stop(grace=0)
    # centroids over the message limit: no routing (and a warning), not a failed call
    tight = ServiceConfig(max_message_bytes=12 * 8 * 4 + 1000)
    running = await start_server(ivf, "127.0.0.1", 0, config=tight)
    try:
        async with RetrieverClient(running.target) as client:
            assert await client.routing() is None
    finally:
        await running.stop(grace=0)
    async with RetrieverClient(server.target) as client:  # BM25
        assert await client.routing() is None
        assert await client.lists([1, 2]) is None


async def test_a_server_without_routing_leaves_guesses_unrouted(
    bm25: BM25Retriever, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retriever server from before GetRouting answers UNIMPLEMENTED: the client reports
    no routing (guesses then rank every cached document) instead of failing requests."""
    from ralmspec_vllm.retrieval.proto_gen import retriever_pb2 as pb
    from ralmspec_vllm.retrieval.proto_gen import retriever_pb2_grpc as pb_grpc
    from ralmspec_vllm.retrieval.service import RetrieverService

    monkeypatch.setattr(RetrieverService, "GetRouting", pb_grpc.RetrieverServicer.GetRouting)
    running = await start_server(bm25, "127.0.0.1", 0)
    try:
        async with RetrieverClient(running.target) as client:
            with pytest.raises(RetrieverServerError, match="UNIMPLEMENTED"):  # the old server
                await client._call("GetRouting", pb.GetRoutingRequest())
            assert await client.routing() is None
    finally:
        await running.stop(grace=0)


def test_client_config_validation() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        RetrieverClient("127.0.0.1:1", timeout_s=0)
    with pytest.raises(ValueError, match="max_retries"):
        RetrieverClient("127.0.0.1:1", max_retries=-1)


def test_server_thread_serves_synchronous_callers(bm25: BM25Retriever) -> None:
    with ServerThread(bm25) as thread:

        async def ask() -> list[list[Hit]]:
            async with RetrieverClient(thread.target) as client:
                return await client.search(["Montgomery"], 1)

        assert asyncio.run(ask()) == bm25.search(["Montgomery"], 1)


@pytest.fixture(scope="module")
def small_kb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ralmspec_vllm.retrieval.kb import build_index

    tmp = tmp_path_factory.mktemp("cli-kb")
    corpus = tmp / "docs.jsonl"
    corpus.write_text(
        "".join(
            f'{{"id": "d{i}", "title": "Doc {i}", "text": "{text}"}}\n'
            for i, text in enumerate(TEXTS)
        )
    )
    return build_index(tmp / "kb", sources=(), corpus=corpus, show_progress=False).path


async def test_api_keys_guard_every_retriever_rpc_but_health(bm25: BM25Retriever) -> None:
    """With keys, a call without one or with another is refused at once (UNAUTHENTICATED,
    not retried); the health service answers anyone; a known key gets real answers."""
    running = await start_server(bm25, "127.0.0.1", 0, api_keys=["k1", "k2"])
    try:
        for key in (None, "wrong", "k1x"):
            async with RetrieverClient(running.target, max_retries=3, api_key=key) as client:
                await client.wait_ready(10)  # health: open
                start = time.perf_counter()
                with pytest.raises(RetrieverServerError, match="UNAUTHENTICATED"):
                    await client.search(["capital of Alabama"], 1)
                assert time.perf_counter() - start < 1.0  # refused, not retried with backoff
                with pytest.raises(RetrieverServerError, match="UNAUTHENTICATED"):
                    await client.score("albedo", [1, 4])
                with pytest.raises(RetrieverServerError, match="UNAUTHENTICATED"):
                    await client.reset_caches()  # an admin call: nobody else empties caches
        assert running.service.stats.search_calls == 0  # nothing reached the service
        for key in ("k1", "k2"):
            async with RetrieverClient(running.target, api_key=key) as client:
                (hits,) = await client.search(["capital of Alabama"], 1)
                assert hits[0].doc_id == 2  # Montgomery
    finally:
        await running.stop(grace=0)


async def test_cli_serve_takes_its_key_from_the_environment(
    small_kb: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--index", str(small_kb), "--backend", "bm25", "--port", "0", "--no-progress"]
    env = {"RALMSPEC_RETRIEVER_API_KEY": "from-env"}
    with ServerProcess.spawn(args, timeout_s=180, env=env) as proc:
        async with RetrieverClient(proc.target, timeout_s=30) as client:
            await client.wait_ready(30)
            with pytest.raises(RetrieverServerError, match="UNAUTHENTICATED"):
                await client.info()
        async with RetrieverClient(proc.target, timeout_s=30, api_key="from-env") as client:
            assert (await client.info()).num_docs == len(TEXTS)
        monkeypatch.setenv("RALMSPEC_RETRIEVER_API_KEY", "from-env")  # a client reads it too
        async with RetrieverClient(proc.target, timeout_s=30) as client:
            assert (await client.info()).num_docs == len(TEXTS)
        assert proc.stop() == 0


async def test_cli_serve_starts_answers_and_stops_gracefully(small_kb: Path) -> None:
    args = ["--index", str(small_kb), "--backend", "bm25", "--port", "0", "--no-progress"]
    with ServerProcess.spawn(args, timeout_s=180) as proc:
        assert proc.host == "127.0.0.1" and proc.port > 0
        async with RetrieverClient(proc.target, timeout_s=30) as client:
            await client.wait_ready(30)
            info = await client.info()
            assert info.backend == "bm25" and info.num_docs == len(TEXTS)
            hits = await client.search(["capital of Alabama"], 1)
            docs = await client.documents([hits[0][0].doc_id])
            assert "Montgomery" in docs[0].text
        assert proc.stop() == 0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_cli_serve_pins_itself_to_the_cores_asked(small_kb: Path) -> None:
    """``--cpus``: the child runs on those cores only (a parent pinned elsewhere included);
    a list the system refuses is a clear error, exit code 2."""
    import subprocess
    import sys

    args = ["--index", str(small_kb), "--backend", "bm25", "--port", "0", "--no-progress"]
    core = max(os.sched_getaffinity(0))
    with ServerProcess.spawn([*args, "--cpus", str(core)], timeout_s=180) as proc:
        assert os.sched_getaffinity(proc.process.pid) == {core}
        assert proc.stop() == 0
    cmd = [sys.executable, "-m", "ralmspec_vllm.entrypoints.cli", "retriever", "serve"]
    bad = subprocess.run([*cmd, *args, "--cpus", "100000"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--cpus: cannot run on '100000'" in bad.stderr
    bad = subprocess.run([*cmd, *args, "--switch-interval-ms", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--switch-interval-ms must be > 0" in bad.stderr


def test_cli_child_exits_when_its_parent_goes_away(small_kb: Path) -> None:
    args = ["--index", str(small_kb), "--backend", "bm25", "--port", "0", "--no-progress"]
    proc = ServerProcess.spawn(args, timeout_s=180)
    try:
        assert proc.process.stdin is not None
        proc.process.stdin.close()  # what the OS does when the parent dies
        assert proc.process.wait(60) == 0
    finally:
        proc.stop()


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # exited (a zombie until its new parent reaps it)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_cli_child_exits_when_its_parent_is_killed(small_kb: Path) -> None:
    import subprocess

    args = ["--index", str(small_kb), "--backend", "bm25", "--port", "0", "--no-progress"]
    parent_code = (
        "import sys, time\n"
        "from ralmspec_vllm.retrieval.server import ServerProcess\n"
        f"p = ServerProcess.spawn({args!r}, timeout_s=180)\n"
        "print(p.process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert not _gone(child_pid)
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait()
        deadline = time.monotonic() + 60
        while not _gone(child_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(child_pid)
    finally:
        parent.kill()
        parent.wait()


def test_cli_spawn_reports_a_server_that_cannot_start(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-index"
    with pytest.raises(RuntimeError, match=r"did not start \(exit code 1"):
        ServerProcess.spawn(["--index", str(missing), "--port", "0"], timeout_s=120)


def test_cli_help_lists_service_flags() -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "ralmspec_vllm.entrypoints.cli", "retriever", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for flag in ("--index", "--backend", "--host", "--port", "--batch-window-ms", "--max-batch"):
        assert flag in out


def test_cli_merge_searches_maps_to_the_service_config() -> None:
    """``retriever serve --merge-searches``: auto (the backend decides), on or off."""
    import argparse

    from ralmspec_vllm.retrieval.server import add_arguments, service_config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for flag, want in (
        ([], None),
        (["--merge-searches", "on"], True),
        (["--merge-searches", "off"], False),
    ):
        assert service_config_from_args(parser.parse_args(flag)).merge_searches is want
    with pytest.raises(SystemExit):
        parser.parse_args(["--merge-searches", "sometimes"])
