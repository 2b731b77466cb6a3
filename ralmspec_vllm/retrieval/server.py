"""Running the retriever service: ``ralmspec-vllm retriever serve`` and programmatic starts.

``start_server`` warms the retriever up (one search, so the encoder loads before the port
opens), binds a ``grpc.aio`` server (retriever service + standard health service) in the
running event loop and returns a ``RunningServer`` with the bound port. ``ServerThread``
runs one in a background thread with its own loop (for synchronous code);
``ServerProcess.spawn`` runs the CLI command as a child process, parses the one line it
prints on stdout (``retriever listening on HOST:PORT``) and ties the child's life to its
own through a stdin pipe (``--exit-with-parent``). The CLI opens the knowledge base and the
backend through ``kb`` and ``factory``, serves until SIGINT/SIGTERM, then drains gracefully.
With API keys (``--api-key``, or ``RALMSPEC_RETRIEVER_API_KEY``), every retriever RPC needs
``authorization: Bearer <key>`` metadata (``RetrieverClient(api_key=...)``) and is refused
with UNAUTHENTICATED otherwise; the health service stays open, as probes expect.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ralmspec_vllm.auth import RETRIEVER_KEY_ENV, KeyCheck, keys
from ralmspec_vllm.cpus import add_cpus_argument, pin
from ralmspec_vllm.retrieval.base import Retriever
from ralmspec_vllm.retrieval.proto_gen import retriever_pb2_grpc as pb_grpc
from ralmspec_vllm.retrieval.service import SERVICE_NAME, RetrieverService, ServiceConfig

logger = logging.getLogger(__name__)

LISTENING_PREFIX = "retriever listening on"
_LISTENING_RE = re.compile(rf"^{LISTENING_PREFIX} (\S+):(\d+)$")
MERGE_CHOICES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}
"""``--merge-searches``: ``ServiceConfig.merge_searches``."""


def grpc_options(config: ServiceConfig) -> list[tuple[str, int]]:
    """Server options: message limits; no SO_REUSEPORT, so a second server on a busy port
    fails to start instead of silently sharing the port with the first."""
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


@dataclass(slots=True)
class RunningServer:
    """A started server; ``stop`` drains in-flight calls for ``grace`` seconds."""

    server: grpc.aio.Server
    service: RetrieverService
    health: health.aio.HealthServicer
    host: str
    port: int

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.health.enter_graceful_shutdown()  # NOT_SERVING from now on
        await self.server.stop(grace)
        await self.service.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(
    retriever: Retriever,
    host: str = "127.0.0.1",
    port: int = 0,
    config: ServiceConfig | None = None,
    *,
    warm_up: bool = True,
    api_keys: Sequence[str] = (),
) -> RunningServer:
    """Serve ``retriever`` on ``host:port`` (port 0: the OS picks one, see ``.port``).

    ``warm_up`` runs one search first, so lazy loads (the query encoder, index pages) happen
    before the port opens rather than inside the first client's deadline. ``api_keys``: the
    retriever RPCs need one of them (see the module doc).
    """
    config = config or ServiceConfig()
    check = KeyCheck(api_keys)
    if warm_up:
        await _warm_up(retriever)
    service = RetrieverService(retriever, config)
    server = grpc.aio.server(
        options=grpc_options(config),
        maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
        interceptors=[_KeyInterceptor(check)] if check else None,
    )
    pb_grpc.add_RetrieverServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
        if bound == 0:  # older grpc versions return 0 instead of raising
            raise RuntimeError("no address bound")
    except RuntimeError as exc:
        await service.close()
        raise OSError(f"could not bind {address}: {exc}") from exc
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    info = service.info
    logger.info(
        "retriever service: backend=%s docs=%d dim=%d metric=%s on %s:%d "
        "(batch window %.1f ms, max batch %d, merging %s)",
        info.backend,
        info.num_docs,
        info.dim,
        info.metric,
        host,
        bound,
        config.batch_window_ms,
        config.max_batch,
        "on" if service.text_lane.merging else "off",
    )
    return RunningServer(server, service, health_servicer, host, bound)


class _KeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses retriever RPCs without a known key (UNAUTHENTICATED); health stays open."""

    def __init__(self, check: KeyCheck) -> None:
        self._check = check

        async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown API key (authorization: Bearer <key>)",
            )

        self._denied = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        if self._check.bearer(header if isinstance(header, str) else header.decode()):
            return await continuation(details)
        return self._denied


async def _warm_up(retriever: Retriever) -> None:
    """One text search (loads the encoder); a failure is only logged: a vector-only dense
    retriever, for one, has no encoder and still serves embedding queries."""
    start = time.perf_counter()
    try:
        await asyncio.to_thread(retriever.search, ["warm-up query"], 1)
    except Exception as exc:
        logger.warning("warm-up text search failed (%s: %s)", type(exc).__name__, exc)
        return
    logger.info("warm-up search took %.2f s", time.perf_counter() - start)


class ServerThread:
    """A retriever server on its own event loop in a daemon thread (``with`` or start/stop)."""

    def __init__(
        self,
        retriever: Retriever,
        host: str = "127.0.0.1",
        port: int = 0,
        config: ServiceConfig | None = None,
    ) -> None:
        self._args = (retriever, host, port, config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.running: RunningServer | None = None

    @property
    def target(self) -> str:
        assert self.running is not None, "server not started"
        return self.running.target

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start_server(*self._args), self._loop)
        self.running = future.result(timeout_s)
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        if self.running is not None:
            future = asyncio.run_coroutine_threadsafe(self.running.stop(grace), self._loop)
            future.result((grace or 0) + 10)
            self.running = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess:
    """``ralmspec-vllm retriever serve`` as a child process (stderr passes through)."""

    def __init__(self, process: subprocess.Popen[str], host: str, port: int) -> None:
        self.process = process
        self.host = host
        self.port = port

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def spawn(
        cls,
        args: Sequence[str] = (),
        *,
        timeout_s: float = 300.0,
        stderr: IO[str] | int | None = None,
        env: dict[str, str] | None = None,
    ) -> ServerProcess:
        """Start the CLI with ``args`` (add ``--port 0`` for an OS-chosen port); wait for it.
        ``env``: variables set for the child on top of this process's (e.g. its API key,
        which a command line would show to every local user)."""
        cmd = [sys.executable, "-m", "ralmspec_vllm.entrypoints.cli", "retriever", "serve"]
        # stdin is a pipe only this process writes to: if it dies (even by SIGKILL), the
        # child sees EOF and shuts down instead of lingering on its port.
        process = subprocess.Popen(
            [*cmd, *args, "--exit-with-parent"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            bufsize=1,
            env={**os.environ, **env} if env else None,
        )
        assert process.stdout is not None
        # A thread drains stdout for the child's whole life (a full pipe would block it);
        # lines before the "listening" one (a library's print) are logged, not fatal.
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        seen: list[str] = []
        match = None
        while match is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:  # EOF (the child died) or timeout
                process.kill()
                process.wait()
                raise RuntimeError(
                    f"retriever server did not start (exit code {process.returncode}; "
                    f"stdout: {seen[-5:]!r})"
                )
            match = _LISTENING_RE.match(line.strip())
            if match is None:
                seen.append(line.rstrip())
                logger.info("retriever child: %s", line.rstrip())
        return cls(process, match.group(1), int(match.group(2)))

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout_s``; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdin is not None:
            self.process.stdin.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


# -- CLI ----------------------------------------------------------------------------------


SWITCH_INTERVAL_MS = 0.5
"""``retriever serve``'s default GIL switch interval (ms). Python's own is 5 ms. A dense
child under shaped load served the same queries/s at either (session 18,
``results/probe_service_load_cpu-2c_3m_s18.json``); a BM25 child recomputes term weights in
Python beside its searches, and a 3M search beside a GIL-holding thread took ~400 ms at 5 ms
against ~21 ms at 0.5 ms (``benchmarks/probe_bm25_gil.py``, session 24)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ralmspec_vllm.retrieval.factory import add_retriever_arguments

    parser.add_argument(
        "--index", default=None, help="index directory (default: the default index, built once)"
    )
    add_retriever_arguments(parser)
    net = parser.add_argument_group("service")
    net.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    net.add_argument(
        "--api-key",
        action="append",
        default=None,
        help=f"require this key (repeatable) as 'authorization: Bearer <key>' on every "
        f"retriever RPC (default: ${RETRIEVER_KEY_ENV}, else none)",
    )
    net.add_argument(
        "--port",
        type=int,
        default=50051,
        help="port; 0 = OS-chosen, printed on stdout (default: %(default)s)",
    )
    defaults = ServiceConfig()
    add_cpus_argument(net)
    net.add_argument(
        "--switch-interval-ms",
        type=float,
        default=SWITCH_INTERVAL_MS,
        help="Python's GIL switch interval in this process: how long a search thread may "
        "wait to re-take the GIL after each torch or numpy call while other threads run "
        "Python (default: %(default)s; Python's own: 5)",
    )
    net.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when stdin closes (set by parents that spawn the server as a child)",
    )
    net.add_argument(
        "--batch-window-ms",
        type=float,
        default=defaults.batch_window_ms,
        help="merge Search calls arriving within this window (default: %(default)s)",
    )
    net.add_argument(
        "--merge-searches",
        choices=MERGE_CHOICES,
        default="auto",
        help="whether concurrent Search calls may share one index search: auto = every "
        "backend but BM25 (whose batch costs the sum of its queries), on, or off (each call "
        "its own search, oldest first) (default: %(default)s)",
    )
    net.add_argument(
        "--max-batch",
        type=int,
        default=defaults.max_batch,
        help="most queries per merged index search (default: %(default)s)",
    )
    net.add_argument(
        "--max-k", type=int, default=defaults.max_k, help="largest top_k (default: %(default)s)"
    )
    net.add_argument(
        "--max-queries",
        type=int,
        default=defaults.max_queries,
        help="most queries per request (default: %(default)s)",
    )
    net.add_argument(
        "--max-doc-ids",
        type=int,
        default=defaults.max_doc_ids,
        help="most doc ids per request (default: %(default)s)",
    )
    net.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=defaults.max_concurrent_rpcs,
        help="RPCs in flight before RESOURCE_EXHAUSTED; 0 = unlimited (default: %(default)s)",
    )
    net.add_argument(
        "--max-message-mb",
        type=int,
        default=defaults.max_message_bytes // (1024 * 1024),
        help="gRPC message size limit in MiB (default: %(default)s)",
    )


def service_config_from_args(args: argparse.Namespace) -> ServiceConfig:
    return ServiceConfig(
        batch_window_ms=args.batch_window_ms,
        max_batch=args.max_batch,
        max_k=args.max_k,
        max_queries=args.max_queries,
        max_doc_ids=args.max_doc_ids,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        merge_searches=MERGE_CHOICES[args.merge_searches],
    )


def open_from_args(args: argparse.Namespace) -> Retriever:
    """The knowledge base (``--index`` or the default one) behind the chosen backend."""
    from ralmspec_vllm.retrieval.factory import config_from_args, open_retriever
    from ralmspec_vllm.retrieval.kb import KnowledgeBase, default_index

    kb = KnowledgeBase.open(args.index) if args.index else default_index()
    return open_retriever(kb, config_from_args(args))


async def serve(
    retriever: Retriever,
    host: str,
    port: int,
    config: ServiceConfig,
    exit_with_parent: bool = False,
    api_keys: Sequence[str] = (),
) -> None:
    """Serve until SIGINT/SIGTERM (or, with ``exit_with_parent``, until stdin closes: the
    parent died), then stop accepting and drain in-flight calls."""
    running = await start_server(retriever, host, port, config, api_keys=api_keys)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Only now: a parent may send SIGTERM the moment it reads this line.
    print(f"{LISTENING_PREFIX} {running.host}:{running.port}", flush=True)
    if exit_with_parent:
        stdin = sys.stdin.fileno()

        def on_stdin() -> None:
            if not os.read(stdin, 4096):  # EOF: every writer (the parent) is gone
                logger.info("stdin closed: the parent process is gone")
                loop.remove_reader(stdin)
                stop.set()

        loop.add_reader(stdin, on_stdin)
    await stop.wait()
    logger.info("shutting down retriever service on %s", running.target)
    await running.stop(grace=2.0)
    stats = running.service.stats
    logger.info(
        "served %d Search calls with %d index searches (largest merge: %d calls)",
        stats.search_calls,
        stats.index_searches,
        stats.max_merged_calls,
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = service_config_from_args(args)
        cpus = pin(args.cpus)  # before the search threads exist
        if args.switch_interval_ms <= 0:
            raise ValueError(f"--switch-interval-ms must be > 0, got {args.switch_interval_ms}")
        sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    except ValueError as exc:
        logger.error("invalid service option: %s", exc)
        return 2
    if cpus is not None:
        logger.info("pinned to %d cores: %s", len(cpus), args.cpus)
    api_keys = keys(args.api_key, RETRIEVER_KEY_ENV)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_keys:
        logger.warning(
            "binding %s without --api-key: anyone who can reach it may use it", args.host
        )
    try:
        retriever = open_from_args(args)
    except (FileNotFoundError, ValueError) as exc:
        logger.error("cannot open the retriever: %s", exc)
        return 1
    try:
        asyncio.run(serve(retriever, args.host, args.port, config, args.exit_with_parent, api_keys))
    except OSError as exc:
        logger.error("cannot serve on %s:%d: %s", args.host, args.port, exc)
        return 1
    finally:
        close = getattr(retriever, "close", None)  # e.g. a circular scan's walking thread
        if callable(close):
            close()
    return 0
