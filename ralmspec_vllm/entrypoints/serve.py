"""``ralmspec-vllm serve``: the OpenAI-compatible RaLM server.

With no arguments: SmolLM2-135M (``engine.models.resolve_model``, converted once and cached),
the default real-text index, a retriever service started as a child process on 127.0.0.1
(OS-chosen port; killed when the server exits), and the HTTP server on 127.0.0.1:8000.

Flags: our own (server, retriever, RaLM defaults and limits) plus every vLLM engine flag
(``AsyncEngineArgs.add_cli_args``: ``--max-model-len``, ``--dtype``, ``--block-size``,
``--enable-prefix-caching``, ...). Engine settings the user does not give come from
``engine.settings.EngineConfig`` (the project's CPU/GPU defaults), the ones given win.

Start-up order: the retriever child and the engine start concurrently; then the app
(``entrypoints.openai.app.build_app``) is served by uvicorn on a socket bound here, so
``--port 0`` works and the line ``ralmspec-vllm serving on http://HOST:PORT`` (stdout) names
the real port. Idle keep-alive connections stay open ``--timeout-keep-alive`` seconds (65),
longer than the clients' connection-pool expiry (5 s in httpx), so a client never reuses a
connection that the server is closing at that very moment (such a request is lost).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import secrets
import signal
import socket
import sys
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Literal

from ralmspec_vllm.auth import API_KEY_ENV, RETRIEVER_KEY_ENV, keys
from ralmspec_vllm.core.config import RaLMConfig, SpeculationConfig
from ralmspec_vllm.cpus import CPUS_HELP, pin
from ralmspec_vllm.engine.version import load_vllm
from ralmspec_vllm.load import RELEASE_FRACTION
from ralmspec_vllm.service import CACHE_SCORING, ServiceConfig

logger = logging.getLogger(__name__)

READY_PREFIX = "ralmspec-vllm serving on"
DEFAULT_MODEL = "smollm2-135m"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_KEEP_ALIVE_S = 65
"""Idle keep-alive timeout: above the 5 s pool expiry of httpx (and the openai client) and the
60 s idle timeout common in load balancers, so the client side always closes first."""

# Our flags' destinations; everything else in the namespace is a vLLM engine flag.
_OWN: set[str] = set()


def _own(group: Any, *flags: str, **kwargs: Any) -> None:
    action = group.add_argument(*flags, **kwargs)
    _OWN.add(action.dest)


ROUTE_GUESSES: dict[str, bool | Literal["auto"]] = {"auto": "auto", "on": True, "off": False}
"""``--route-guesses`` words and their ``SpeculationConfig.route_guesses`` values."""


def _route_word(value: bool | Literal["auto"]) -> str:
    return next(word for word, v in ROUTE_GUESSES.items() if v == value)


EPILOG = """\
defaults: --model smollm2-135m (converted from PyPI once, cached), the default index (built
once), a child retriever on 127.0.0.1, the server on 127.0.0.1:8000. --model also takes
tiny-llama, qwen2.5-0.5b or a model directory. vLLM's engine flags pass through.

per-request RaLM controls (JSON field "ralm"; openai client: extra_body={"ralm": {...}}):
  mode: "baseline" | "ralmspec"     retrieval_stride: int     speculation_stride: int | "auto"
  prefetch_k: int     async_verification: bool     return_sources: bool
Greedy decoding only (temperature 0/unset): ralmspec returns exactly the baseline's tokens.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    server = parser.add_argument_group("server")
    _own(server, "--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    _own(server, "--port", type=int, default=8000, help="port; 0 = OS-chosen (default: 8000)")
    _own(
        server,
        "--api-key",
        action="append",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1/* (repeatable; env {API_KEY_ENV})",
    )
    _own(server, "--uvicorn-log-level", default="warning", help="uvicorn's log level")
    _own(server, "--warmup", action=argparse.BooleanOptionalAction, default=True,
         help="answer one short question as the baseline and with RaLMSpec before taking "
              "requests, so that one-off costs (kernels compiled on first use) reach neither "
              "the first clients nor OS3's measured step costs (default: %(default)s)")  # fmt: skip
    _own(server, "--cpus", default=None, metavar="LIST", help=CPUS_HELP)
    _own(
        server,
        "--timeout-keep-alive",
        type=int,
        default=DEFAULT_KEEP_ALIVE_S,
        metavar="SECONDS",
        help="seconds an idle keep-alive connection stays open; keep it above the clients' "
        "pool expiry (httpx, the openai client: 5 s) so that clients drop idle connections "
        "first: a request sent just as the server closes its connection is lost "
        "(default: %(default)s; uvicorn's: 5)",
    )
    _own(
        server,
        "--lm-path",
        default="resubmit",
        choices=("resubmit", "sessions"),
        help="how RaLM steps reach vLLM: 'resubmit' (a new request per step; the prefix cache "
        "serves the shared prefix) or 'sessions' (paused/resumed/rewound sessions through "
        "the RaLMScheduler hook) (default: %(default)s)",
    )

    retr = parser.add_argument_group("retriever")
    _own(retr, "--retriever", default=None, help="HOST:PORT of a running retriever service "
         "(default: start one as a child process)")  # fmt: skip
    _own(retr, "--index", default=None, help="index directory for the child retriever "
         "(default: the default index, built once)")  # fmt: skip
    _own(retr, "--retriever-backend", default="flat", choices=("flat", "hnsw", "ivf", "bm25"),
         help="child retriever backend (default: %(default)s)")  # fmt: skip
    _own(retr, "--retriever-arg", action="append", default=[], metavar="ARG",
         help="extra flag for the child 'retriever serve' (repeatable, e.g. "
              "--retriever-arg=--ef-search=64)")  # fmt: skip
    _own(retr, "--retriever-timeout", type=float, default=30.0, help="seconds per retriever call")
    _own(retr, "--retriever-start-timeout", type=float, default=3600.0,
         help="seconds to wait for the child retriever (a first run builds the default "
              "index; default: %(default)s)")  # fmt: skip
    _own(retr, "--retriever-retries", type=int, default=3, help="retries per retriever call")
    _own(retr, "--retriever-api-key", default=None, metavar="KEY",
         help=f"the retriever service's API key (default: ${RETRIEVER_KEY_ENV}; a child "
              "retriever without one gets a random key of its own, so other local users "
              "cannot query it)")  # fmt: skip

    ralm = parser.add_argument_group("RaLM defaults (per-request 'ralm' options override)")
    d, s, c = RaLMConfig(), SpeculationConfig.preset("PSA"), ServiceConfig()
    _own(ralm, "--mode", default=c.default_mode, choices=("baseline", "ralmspec"),
         help="default mode (default: %(default)s)")  # fmt: skip
    _own(ralm, "--retrieval-stride", type=int, default=d.retrieval_stride)
    _own(ralm, "--query-window", type=int, default=d.query_window)
    _own(ralm, "--max-doc-tokens", type=int, default=d.max_doc_tokens)
    _own(ralm, "--max-new-tokens", type=int, default=d.max_new_tokens,
         help="max_tokens of requests that give none (default: %(default)s)")  # fmt: skip
    _own(ralm, "--speculation-stride", default="auto", help="int or 'auto' (default: auto)")
    _own(ralm, "--max-speculation-stride", type=int, default=s.max_speculation_stride)
    _own(ralm, "--prefetch-k", type=int, default=s.prefetch_k)
    _own(ralm, "--exact-k", type=int, default=s.exact_k,
         help="how many of the prefetch-k documents are the exact top ranks; the rest are "
              "the retriever's further candidates (0: all; default: %(default)s)")  # fmt: skip
    _own(ralm, "--async-verification", action=argparse.BooleanOptionalAction,
         default=s.async_verification)  # fmt: skip
    _own(ralm, "--overlap-depth", default=str(s.overlap_depth),
         help="steps speculated ahead while a verification is in flight: an int (1: the "
              "paper's), 'stride' (the next round), 'fill' (up to --max-speculation-stride, "
              "all verified next round) or 'pipeline' (each step verified on its own as soon "
              "as it exists; pair with --flat-scan circular; default: %(default)s)")  # fmt: skip
    _own(ralm, "--early-verification", action=argparse.BooleanOptionalAction,
         default=s.early_verification,
         help="with --overlap-depth pipeline: send a speculated step's search when its "
              "document is guessed, before the step is generated; a miss aborts the step "
              "in flight (default: %(default)s)")  # fmt: skip
    _own(ralm, "--plain-probe-every", type=int, default=s.plain_probe_every,
         help="in a run of plain steps (speculation measured or modelled slower), score "
              "the cache's guess and insert the step's document only every this many steps; "
              "the others run as the baseline's steps (default: %(default)s)")  # fmt: skip
    _own(ralm, "--route-guesses", choices=ROUTE_GUESSES, default=_route_word(s.route_guesses),
         help="over an IVF retriever, rank a guess only among the cached documents in the "
              "lists the query's search reads: 'on', 'off' or 'auto' (while the guesses "
              "it changes are worth the centroid product it costs; default: "
              "%(default)s)")  # fmt: skip
    _own(ralm, "--cache-capacity", type=int, default=s.cache_capacity)
    _own(ralm, "--cache-scoring", choices=CACHE_SCORING, default=c.cache_scoring,
         help="where speculation ranks a request's cached documents: 'local' (this server: "
              "dense: the retriever's query embedding and the cached documents' vectors; "
              "BM25: the cached documents' term weights), 'retriever' (its Score RPC over "
              "every cached id) or 'auto' (local where the retriever allows it; default: "
              "%(default)s)")  # fmt: skip
    _own(ralm, "--batch-window-ms", type=float, default=c.batch_window_s * 1000,
         help="cross-request retrieval batching window (default: %(default)s)")  # fmt: skip
    _own(ralm, "--max-batch-queries", type=int, default=c.max_batch_queries)
    _own(ralm, "--max-tokens-limit", type=int, default=c.max_tokens_limit)
    _own(ralm, "--max-retrieval-stride", type=int, default=c.max_retrieval_stride)
    _own(ralm, "--max-prefetch-k", type=int, default=c.max_prefetch_k)
    _own(ralm, "--max-speculating", type=int, default=c.max_speculating,
         help="load-aware fallback: a ralmspec request that starts while this many others "
              "speculate runs as the baseline (same answer); default: never")  # fmt: skip
    _own(ralm, "--max-retriever-utilization", type=float,
         default=c.max_retriever_utilization,
         help="load-aware fallback: a ralmspec request that starts while this server keeps "
              "the retriever busier than this (queries/s x seconds per query, calibrated "
              "at start) runs as the baseline, and speculating ones run plain steps until "
              f"it falls below {RELEASE_FRACTION:g} of this (same answer); 0: never "
              "(default: %(default)s)")  # fmt: skip
    _own(ralm, "--max-encoder-busy", type=float, default=c.max_encoder_busy,
         help="load-aware fallback: the same while the retriever's query encoder (one pass "
              "at a time) was busy more than this share of the last 10 s, as read from the "
              "retriever's counters; 0: never (default: %(default)s)")  # fmt: skip
    _own(ralm, "--max-loop-cpu", type=float, default=c.max_loop_cpu,
         help="load-aware fallback: a ralmspec request that starts while this server's "
              "event loop ran more than this share of a core over the last 5 s runs as the "
              "baseline, and speculating ones run plain steps until it falls below "
              f"{RELEASE_FRACTION:g} of this (same answer); 0: never "
              "(default: %(default)s)")  # fmt: skip

    # load_vllm applies the process settings (threads, offline) before vLLM/torch is imported.
    engine = parser.add_argument_group("vLLM engine (all of vLLM's engine flags)")
    load_vllm().AsyncEngineArgs.add_cli_args(engine)
    parser.set_defaults(model=None)


def parser_defaults() -> dict[str, Any]:
    """Every flag's default (to tell which vLLM flags the user gave)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return vars(parser.parse_args([]))


def _int_or(value: str, flag: str, *words: str) -> int | str:
    """``value`` as an int, or one of ``words`` itself (ValueError naming ``flag``)."""
    if value in words:
        return value
    try:
        return int(value)
    except ValueError:
        allowed = " or ".join(repr(w) for w in words)
        raise ValueError(f"{flag} must be an int or {allowed}, got {value!r}") from None


def service_config_from_args(args: argparse.Namespace) -> ServiceConfig:
    """The RaLM defaults and limits from the flags (ValueError names a bad one)."""
    stride = _int_or(args.speculation_stride, "--speculation-stride", "auto")
    depth = _int_or(args.overlap_depth, "--overlap-depth", "stride", "fill", "pipeline")
    return ServiceConfig(
        ralm=RaLMConfig(
            retrieval_stride=args.retrieval_stride,
            query_window=args.query_window,
            max_doc_tokens=args.max_doc_tokens,
            max_new_tokens=args.max_new_tokens,
        ),
        speculation=SpeculationConfig(
            speculation_stride=stride,  # type: ignore[arg-type]
            prefetch_k=args.prefetch_k,
            exact_k=args.exact_k,
            async_verification=args.async_verification,
            overlap_depth=depth,  # type: ignore[arg-type]
            early_verification=args.early_verification,
            cache_capacity=args.cache_capacity,
            plain_probe_every=args.plain_probe_every,
            route_guesses=ROUTE_GUESSES[args.route_guesses],
            max_speculation_stride=args.max_speculation_stride,
        ),
        default_mode=args.mode,
        max_tokens_limit=args.max_tokens_limit,
        max_retrieval_stride=args.max_retrieval_stride,
        max_prefetch_k=args.max_prefetch_k,
        batch_window_s=args.batch_window_ms / 1000,
        max_batch_queries=args.max_batch_queries,
        max_speculating=args.max_speculating,
        max_retriever_utilization=args.max_retriever_utilization or None,  # 0: off
        max_loop_cpu=args.max_loop_cpu or None,  # 0: off
        max_encoder_busy=args.max_encoder_busy or None,  # 0: off
        cache_scoring=args.cache_scoring,
    )


def engine_config_from_args(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> Any:
    """The engine's ``EngineConfig``: the project's per-device defaults, with every vLLM flag
    the user gave passed through unchanged (``EngineConfig.extra`` wins over the defaults)."""
    from ralmspec_vllm.engine.models import resolve_model
    from ralmspec_vllm.engine.settings import EngineConfig

    model = str(resolve_model(args.model or DEFAULT_MODEL))
    given = {
        key: value
        for key, value in vars(args).items()
        if key not in _OWN
        and key in parser_defaults
        and key != "model"
        and value != parser_defaults[key]
    }
    return EngineConfig(
        model=model,
        max_model_len=args.max_model_len or 2048,
        disable_log_stats=args.disable_log_stats,  # vLLM's metrics on /metrics by default
        lm_path=args.lm_path,
        extra=given,
    )


@dataclass(frozen=True, slots=True)
class _Bound:
    sock: socket.socket
    host: str
    port: int


def _bind(host: str, port: int) -> _Bound:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return _Bound(sock, host, sock.getsockname()[1])


async def _serve(args: argparse.Namespace, engine_config: Any, config: ServiceConfig) -> None:
    import uvicorn

    from ralmspec_vllm import metrics
    from ralmspec_vllm.entrypoints.openai.app import build_app
    from ralmspec_vllm.retrieval.client import RetrieverClient
    from ralmspec_vllm.retrieval.server import ServerProcess
    from ralmspec_vllm.service import RaLMService, local_cache_scoring

    api_keys = keys(args.api_key, API_KEY_ENV)
    given = keys([args.retriever_api_key] if args.retriever_api_key else None, RETRIEVER_KEY_ENV)
    retriever_key: str | None = given[0] if given else None
    bound = _bind(args.host, args.port)  # fail fast on a taken port, before slow starts
    async with AsyncExitStack() as stack:
        target = args.retriever
        child_start = None
        if target is not None:  # an external retriever: check it before the engine's slow start
            async with RetrieverClient(
                target, timeout_s=args.retriever_timeout, api_key=retriever_key or ""
            ) as probe:
                await probe.wait_ready(args.retriever_timeout)
                await probe.info()  # the health check is open to all; this needs the key
        else:
            retriever_key = retriever_key or secrets.token_urlsafe(32)
            child_args = ["--host", "127.0.0.1", "--port", "0", "--backend", args.retriever_backend]
            child_args += ["--index", args.index] if args.index else []
            child_args += args.retriever_arg
            logger.info("starting the retriever service: retriever serve %s", " ".join(child_args))
            # The child exits with this process even if it is SIGKILLed (stdin EOF).
            spawn = functools.partial(
                ServerProcess.spawn,
                child_args,
                timeout_s=args.retriever_start_timeout,
                env={RETRIEVER_KEY_ENV: retriever_key},  # not argv: ps shows that to all
            )
            child_start = asyncio.create_task(asyncio.to_thread(spawn))
        try:
            lm = await _start_lm(engine_config, stack)
        finally:
            if child_start is not None:  # always reap the child, even if the engine failed
                child = await child_start
                stack.callback(child.stop)
                target = child.target
        client = RetrieverClient(
            target,
            timeout_s=args.retriever_timeout,
            max_retries=args.retriever_retries,
            api_key=retriever_key or "",
        )
        stack.push_async_callback(client.close)
        client.on_call = metrics.count_retriever_call
        await client.wait_ready()
        scoring = await local_cache_scoring(client, config.cache_scoring)
        logger.info("cache scoring: %s", scoring.describe())
        logger.info(
            "requests default to %s; ralmspec runs %s",
            config.default_mode,
            config.speculation.describe(),
        )
        service = RaLMService(
            lm,
            lm.tokenizer,
            client,
            config,
            max_model_len=lm.max_model_len,
            embedder=scoring.embedder,
            scorer=scoring.scorer,
        )
        if config.max_retriever_utilization is not None:
            await service.calibrate_retriever()
        if args.warmup:
            await service.warm_up()
        frozen = freeze_startup_objects()
        logger.info("%d start-up objects frozen out of garbage collection", frozen)
        model_name = (args.served_model_name or [args.model or DEFAULT_MODEL])[0]
        app = build_app(service, model_name, api_keys)
        uv = uvicorn.Server(uvicorn_config(app, args))
        print(f"{READY_PREFIX} http://{bound.host}:{bound.port}", flush=True)
        logger.info(
            "model %s, retriever %s, api key %s", model_name, target, "on" if api_keys else "off"
        )
        # uvicorn re-raises the SIGINT/SIGTERM it handled once it has shut down, with the
        # handlers found at start: make those no-ops so the exit stack still stops the
        # engine and the child retriever, and the process exits 0.
        for sig in (signal.SIGINT, signal.SIGTERM):
            stack.callback(signal.signal, sig, signal.signal(sig, lambda *_: None))
        await uv.serve(sockets=[bound.sock])
        logger.info("shutting down: engine, retriever client and child retriever")


def freeze_startup_objects() -> int:
    """Collect, then move every object alive now (vLLM's, torch's, the tokenizer's: ~670k
    after start-up) out of later garbage collections (``gc.freeze``); returns how many are
    frozen. A speculating request allocates a ``Hit`` per prefetched document each step, so
    collections run often, and a full one walked the whole start-up heap: 0.46 s with the
    event loop stopped for every request (2-core box, c=16, session 47). Frozen, collection
    took 0.10 ms a step against 0.76."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def uvicorn_config(app: Any, args: argparse.Namespace) -> Any:
    """The ``uvicorn.Config`` serving ``app`` with the server flags (tests use it too)."""
    import uvicorn

    return uvicorn.Config(
        app,
        log_level=args.uvicorn_log_level,
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful_shutdown=5,
        lifespan="off",
    )


async def _start_lm(engine_config: Any, stack: AsyncExitStack) -> Any:
    from ralmspec_vllm.engine.sessions import create_language_model

    lm = await create_language_model(engine_config)
    stack.push_async_callback(lm.shutdown)
    return lm


def run(args: argparse.Namespace) -> int:
    if args.host not in LOCAL_HOSTS and not keys(args.api_key, API_KEY_ENV):
        logger.warning(
            "binding %s without --api-key: anyone who can reach it may use it", args.host
        )
    try:
        if args.timeout_keep_alive < 1:
            msg = f"--timeout-keep-alive must be >= 1 s, got {args.timeout_keep_alive}"
            raise ValueError(msg)
        if any(arg.lstrip("-").startswith("api-key") for arg in args.retriever_arg):
            raise ValueError("give the child retriever's key as --retriever-api-key")
        config = service_config_from_args(args)
        cpus = pin(args.cpus)  # before the engine core starts: it inherits the set
    except ValueError as err:
        print(f"ralmspec-vllm serve: error: {err}", file=sys.stderr)
        return 2
    if cpus is not None:
        logger.info("pinned (with the engine core) to %d cores: %s", len(cpus), args.cpus)
    engine_config = engine_config_from_args(args, parser_defaults())
    from ralmspec_vllm.retrieval.errors import RetrieverError

    try:
        asyncio.run(_serve(args, engine_config, config))
    except RetrieverError as err:  # at start-up: later ones are answered per request
        hint = ""
        if "UNAUTHENTICATED" in str(err):
            hint = f" (give its key: --retriever-api-key or ${RETRIEVER_KEY_ENV})"
        print(f"ralmspec-vllm serve: error: the retriever failed: {err}{hint}", file=sys.stderr)
        return 1
    return 0
