"""``ralmspec-vllm serve`` as users run it: flags, a real subprocess, its child retriever."""

from __future__ import annotations

import gc
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from ralmspec_vllm.auth import RETRIEVER_KEY_ENV
from ralmspec_vllm.entrypoints.cli import build_parser
from ralmspec_vllm.entrypoints.serve import (
    READY_PREFIX,
    engine_config_from_args,
    freeze_startup_objects,
    parser_defaults,
    service_config_from_args,
)
from ralmspec_vllm.retrieval.client import RetrieverClient
from ralmspec_vllm.retrieval.errors import RetrieverServerError
from ralmspec_vllm.retrieval.server import ServerProcess

from .conftest import RALM, Served

pytestmark = pytest.mark.vllm


def parse(argv: list[str]) -> tuple[object, dict[str, object]]:
    return build_parser(argv).parse_args(argv), parser_defaults()


def test_flags_build_configs(tiny_model_dir: Path) -> None:
    argv = ["serve", "--model", str(tiny_model_dir), "--max-model-len", "1024"]
    argv += ["--block-size", "64", "--speculation-stride", "3", "--prefetch-k", "5"]
    argv += ["--no-async-verification", "--mode", "baseline", "--batch-window-ms", "5"]
    args, defaults = parse(argv)
    engine = engine_config_from_args(args, defaults)  # type: ignore[arg-type]
    # vLLM flags the user gave pass through; the rest keep the project's device defaults
    assert engine.extra == {"block_size": 64, "max_model_len": 1024}
    kwargs = engine.engine_kwargs()
    assert kwargs["block_size"] == 64 and kwargs["max_model_len"] == 1024
    assert kwargs["dtype"] == "float32" and kwargs["enable_prefix_caching"] is True
    config = service_config_from_args(args)  # type: ignore[arg-type]
    assert config.default_mode == "baseline" and config.batch_window_s == 0.005
    spec = config.speculation
    assert (spec.speculation_stride, spec.prefetch_k, spec.async_verification) == (3, 5, False)
    assert spec.overlap_depth == "stride"  # PSA's default
    assert config.max_speculating is None  # no load-aware fallback unless asked
    args, _ = parse(["serve", "--max-speculating", "48"])
    assert service_config_from_args(args).max_speculating == 48  # type: ignore[arg-type]
    args, _ = parse(["serve", "--max-speculating", "-1"])
    with pytest.raises(ValueError, match="max_speculating"):
        service_config_from_args(args)  # type: ignore[arg-type]
    # The retriever's and the event loop's fallbacks: on by default, 0 turns each off.
    for field, default, value, bad in (
        ("max_retriever_utilization", 0.4, "0.8", "-1"),
        ("max_loop_cpu", 0.6, "0.9", "-0.5"),
        ("max_encoder_busy", 0.8, "0.9", "-0.1"),
    ):
        flag = "--" + field.replace("_", "-")
        assert getattr(config, field) == default
        for given, want in ((value, float(value)), ("0", None)):
            args, _ = parse(["serve", flag, given])
            assert getattr(service_config_from_args(args), field) == want  # type: ignore[arg-type]
        args, _ = parse(["serve", flag, bad])
        with pytest.raises(ValueError, match=field):
            service_config_from_args(args)  # type: ignore[arg-type]
    args, _ = parse(["serve", "--overlap-depth", "2"])
    assert service_config_from_args(args).speculation.overlap_depth == 2  # type: ignore[arg-type]
    args, _ = parse(["serve", "--overlap-depth", "fill"])
    assert service_config_from_args(args).speculation.overlap_depth == "fill"  # type: ignore[arg-type]
    assert not config.speculation.early_verification
    args, _ = parse(["serve", "--overlap-depth", "pipeline", "--early-verification"])
    assert service_config_from_args(args).speculation.early_verification  # type: ignore[arg-type]
    assert config.speculation.plain_probe_every == 1  # every plain step probes by default
    args, _ = parse(["serve", "--plain-probe-every", "4"])
    assert service_config_from_args(args).speculation.plain_probe_every == 4  # type: ignore[arg-type]
    args, _ = parse(["serve", "--plain-probe-every", "0"])
    with pytest.raises(ValueError, match="plain_probe_every"):
        service_config_from_args(args)  # type: ignore[arg-type]
    assert config.speculation.route_guesses == "auto"  # routed over IVF where it pays
    for word, value in (("on", True), ("off", False), ("auto", "auto")):
        args, _ = parse(["serve", "--route-guesses", word])
        assert service_config_from_args(args).speculation.route_guesses == value  # type: ignore[arg-type]
    args, _ = parse(["serve", "--early-verification"])  # needs the pipeline
    with pytest.raises(ValueError, match="early_verification"):
        service_config_from_args(args)  # type: ignore[arg-type]
    for flag in ("--speculation-stride", "--overlap-depth"):
        args, _ = parse(["serve", flag, "fast"])
        with pytest.raises(ValueError, match=flag):
            service_config_from_args(args)  # type: ignore[arg-type]
    args, _ = parse(["serve"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)  # type: ignore[attr-defined]
    assert args.warmup  # type: ignore[attr-defined]
    assert not parse(["serve", "--no-warmup"])[0].warmup  # type: ignore[attr-defined]
    assert engine_config_from_args(args, defaults).lm_path == "resubmit"  # type: ignore[arg-type]
    args, _ = parse(["serve", "--model", str(tiny_model_dir), "--lm-path", "sessions"])
    hooked = engine_config_from_args(args, defaults)  # type: ignore[arg-type]
    assert hooked.lm_path == "sessions" and hooked.extra == {}
    assert hooked.engine_kwargs()["scheduler_cls"].endswith("RaLMScheduler")


def test_start_up_objects_are_frozen_out_of_garbage_collection() -> None:
    """``serve`` freezes what start-up left alive before it takes requests, so a full
    collection no longer walks vLLM's and torch's objects with the event loop stopped."""
    survivors = [[] for _ in range(1000)]  # lists are tracked by the collector; object()s are not
    try:
        frozen = freeze_startup_objects()
        # Other tests' threads may free frozen objects meanwhile, so the count is a floor, not
        # an equality (CI once read 760,104 returned against 760,098 a moment later).
        assert frozen >= len(survivors) and gc.get_freeze_count() <= frozen
        tracked = {id(obj) for obj in gc.get_objects()}  # the permanent generation is excluded
        assert not any(id(obj) in tracked for obj in survivors)
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
    tracked = {id(obj) for obj in gc.get_objects()}
    assert all(id(obj) in tracked for obj in survivors)


def _wait_ready(process: subprocess.Popen[str], timeout_s: float) -> str:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    while True:
        line = lines.get(timeout=timeout_s)
        if not line:
            raise RuntimeError(f"serve exited with {process.wait()} before it was ready")
        if line.startswith(READY_PREFIX):
            return line.split()[-1]


@pytest.mark.parametrize("lm_path", ["resubmit", "sessions"])
async def test_serve_subprocess_with_child_retriever(
    tiny_model_dir: Path, small_index: Path, served: Served, lm_path: str
) -> None:
    """The CLI end to end: OS-chosen port, API key from the environment, a child retriever
    that dies with the server, and the same answer as the in-process offline baseline, with
    either way of reaching vLLM (the scheduler hook's sessions included)."""
    question = "What did Aristotle teach about logic?"
    want = await served.offline.generate(question, "baseline")
    argv = [sys.executable, "-m", "ralmspec_vllm.entrypoints.cli", "serve", "--port", "0"]
    argv += ["--model", str(tiny_model_dir), "--index", str(small_index)]
    argv += ["--max-model-len", "1024", "--served-model-name", "cli-model", "--seed", "0"]
    argv += ["--max-doc-tokens", str(RALM.max_doc_tokens), "--max-new-tokens", "16"]
    argv += ["--lm-path", lm_path]
    cores = sorted(os.sched_getaffinity(0))
    pinned = lm_path == "sessions" and len(cores) >= 2  # and --cpus: server apart from child
    if pinned:
        argv += ["--cpus", str(cores[0]), f"--retriever-arg=--cpus={cores[-1]}"]
    env = {**os.environ, "RALMSPEC_API_KEY": "cli-key"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    descendants: list[psutil.Process] = []
    try:
        url = _wait_ready(process, timeout_s=600)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url) and not url.endswith(":0")
        descendants = psutil.Process(process.pid).children(recursive=True)
        retrievers = [c for c in descendants if "retriever" in " ".join(c.cmdline())]
        assert len(retrievers) == 1
        if pinned:  # the engine core inherited the server's core; the child took its own
            assert os.sched_getaffinity(process.pid) == {cores[0]}
            others = [c for c in descendants if c not in retrievers]
            assert others and all(os.sched_getaffinity(c.pid) == {cores[0]} for c in others)
            assert os.sched_getaffinity(retrievers[0].pid) == {cores[-1]}
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="cli-key", max_retries=0)
        response = await client.completions.create(
            model="cli-model",
            prompt=question,
            extra_body={"ralm": {"return_sources": True}, "return_token_ids": True},
        )
        assert tuple(response.choices[0].token_ids) == want.token_ids  # type: ignore[attr-defined]
        assert (response.model_extra or {})["sources"]
        async with httpx.AsyncClient(base_url=url) as http:
            metrics = (await http.get("/metrics")).text  # ours and vLLM's, one registry
        assert "ralmspec_requests_total" in metrics and "vllm:prompt_tokens" in metrics
        loop = re.search(r"^ralmspec_loop_cpu (\S+)$", metrics, re.M)  # the loop's load
        assert loop is not None and 0.0 <= float(loop.group(1)) < 1.5
        # The child retriever's own counters: it searched, and its backend's time is there.
        searched = re.search(r"^ralmspec_retriever_search_seconds_total (\S+)$", metrics, re.M)
        assert searched is not None and float(searched.group(1)) > 0
        # This server's calls to it, by RPC: the request's searches and its documents.
        for rpc in ("Search", "GetDocuments"):
            line = rf'^ralmspec_retriever_calls_total{{method="{rpc}"}} (\S+)$'
            sent = re.search(line, metrics, re.M)
            assert sent is not None and float(sent.group(1)) >= 1, rpc
        # The child retriever holds a random key of serve's: other local users cannot query it.
        (child,) = [c.laddr for c in retrievers[0].net_connections() if c.status == "LISTEN"]
        async with RetrieverClient(f"127.0.0.1:{child.port}", timeout_s=10) as keyless:
            with pytest.raises(RetrieverServerError, match="UNAUTHENTICATED"):
                await keyless.info()
        assert not any(arg.startswith("--api-key") for arg in retrievers[0].cmdline())
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(
                base_url=url + "/v1", api_key="wrong", max_retries=0
            ).models.list()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        psutil.wait_procs(descendants, timeout=15)  # the engine core exits with it too
        assert not [d for d in descendants if d.is_running() and d.status() != "zombie"]
    finally:  # on failure, leave no engine core or retriever behind
        if process.poll() is None:
            process.kill()
            process.wait()
        for proc in descendants:
            if proc.is_running():
                proc.kill()


async def test_serve_bm25_ranks_the_cache_from_term_weights(
    tiny_model_dir: Path, small_index: Path, served: Served, tmp_path: Path
) -> None:
    """``serve`` over a BM25 child retriever scores each request's cache itself from the
    documents' term weights (``--cache-scoring auto``), and a ``ralmspec`` answer is the
    offline BM25 baseline's, token for token."""
    from ralmspec_vllm.core.runner import RaLMEngine
    from ralmspec_vllm.retrieval.base import InProcessAsyncRetriever
    from ralmspec_vllm.retrieval.factory import RetrieverConfig, open_retriever

    bm25 = open_retriever(small_index, RetrieverConfig(backend="bm25", progress=False))
    lm = served.lm
    offline = RaLMEngine(lm, lm.tokenizer, InProcessAsyncRetriever(bm25), RALM)  # type: ignore[attr-defined]
    question = "Which city is the capital of Alabama and what did Aristotle teach?"
    want = await offline.generate(question, "baseline")
    argv = [sys.executable, "-m", "ralmspec_vllm.entrypoints.cli", "serve", "--port", "0"]
    argv += ["--model", str(tiny_model_dir), "--index", str(small_index)]
    argv += ["--max-model-len", "1024", "--seed", "0", "--retriever-backend", "bm25"]
    argv += ["--max-doc-tokens", str(RALM.max_doc_tokens), "--max-new-tokens", "16"]
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        url = _wait_ready(process, timeout_s=600)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        response = await client.completions.create(
            model=str(tiny_model_dir),
            prompt=question,
            extra_body={"ralm": {"mode": "ralmspec"}, "return_token_ids": True},
        )
        assert tuple(response.choices[0].token_ids) == want.token_ids  # type: ignore[attr-defined]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "cache scoring: local (BM25 term weights)" in text
    assert "requests default to ralmspec; ralmspec runs PSA\n" in text  # the shipped defaults
    assert "warm-up: a baseline and a RaLMSpec answer in" in text  # before it took requests


def test_serve_refuses_to_start_on_an_external_retriever_it_cannot_use(
    small_index: Path,
) -> None:
    """A keyed external retriever without (or with the wrong) ``--retriever-api-key``: a
    one-line error before the engine's slow start, exit code 1."""
    args = ["--index", str(small_index), "--backend", "bm25", "--port", "0", "--no-progress"]
    with ServerProcess.spawn(args, timeout_s=180, env={RETRIEVER_KEY_ENV: "right"}) as child:
        env = {k: v for k, v in os.environ.items() if k != RETRIEVER_KEY_ENV}
        argv = [sys.executable, "-m", "ralmspec_vllm.entrypoints.cli", "serve", "--port", "0"]
        argv += ["--retriever", child.target]
        for extra in ([], ["--retriever-api-key", "wrong"]):
            done = subprocess.run([*argv, *extra], capture_output=True, text=True, env=env)
            assert done.returncode == 1, done.stderr[-2000:]
            last = done.stderr.strip().splitlines()[-1]
            assert last.startswith("ralmspec-vllm serve: error: the retriever failed")
            assert "UNAUTHENTICATED" in last and "--retriever-api-key" in last
            assert "LLM engine" not in done.stderr  # refused before the engine started
