"""The server under load for ``bench_serving``: a real ``ralmspec-vllm serve`` subprocess and
its Prometheus metrics.

``ServerProcess.start(args)`` runs ``python -m ralmspec_vllm.entrypoints.cli serve --port 0
ARGS`` (so it binds 127.0.0.1 on an OS-chosen port), copies its stderr into a log file, and
waits for the ``READY_PREFIX`` line on stdout that names the URL. ``stop`` sends SIGTERM
(the server stops its engine core and child retriever), waits, and kills whatever is left.

``scrape`` reads ``/metrics`` into ``{(sample name, sorted labels): value}``; ``batch_stats``
turns the difference of two scrapes into the cell's retriever-batching and verification
numbers (merged RPCs, callers and queries per RPC, waits, verification sizes and latency) from
the ``ralmspec_*`` histograms of ``ralmspec_vllm.metrics``, the retriever service's own
index searches and backend seconds (``index_stats``), plus the LM's work from vLLM's
``vllm:*`` counters (``lm_stats``).
"""

from __future__ import annotations

import logging
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from ralmspec_vllm.entrypoints.serve import READY_PREFIX

logger = logging.getLogger(__name__)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""One ``/metrics`` scrape: (sample name, sorted label pairs) -> value."""


@dataclass
class ServerProcess:
    """A running ``ralmspec-vllm serve`` child (see module doc)."""

    process: subprocess.Popen[str]
    url: str
    log_path: Path
    startup_s: float
    argv: list[str]
    _children: list[Any] = field(default_factory=list)

    @classmethod
    def start(
        cls, args: Sequence[str], log_path: str | Path, timeout_s: float = 3600.0
    ) -> ServerProcess:
        """Start the server with ``args`` (after ``serve --port 0``); wait until it serves."""
        argv = [sys.executable, "-m", "ralmspec_vllm.entrypoints.cli", "serve", "--port", "0"]
        argv += list(args)
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("starting the server: %s (log: %s)", " ".join(argv[2:]), log_path)
        start = time.perf_counter()
        log = log_path.open("w")
        # The server runs as shipped, its retriever's query memo included: methods answer
        # the same questions one after another, and ``POST /reset_prefix_cache`` before
        # each (cell, method) empties that memo too (the retriever's ResetCaches).
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()  # the child holds its own descriptor
        try:
            url = _wait_ready(process, timeout_s, log_path)
        except BaseException:
            _kill(process)
            raise
        server = cls(process, url, log_path, time.perf_counter() - start, argv)
        logger.info("server ready at %s after %.0f s", url, server.startup_s)
        try:
            import psutil

            server._children = psutil.Process(process.pid).children(recursive=True)
        except Exception:  # psutil is optional: only used to reap stragglers
            server._children = []
        return server

    def model_id(self) -> str:
        """The served model name (first entry of ``/v1/models``)."""
        data = httpx.get(self.url + "/v1/models", timeout=30).json()
        return str(data["data"][0]["id"])

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, wait, then kill the server and any child it left behind."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("server did not stop within %.0f s: killing it", timeout_s)
                _kill(self.process)
        for child in self._children:
            try:
                if child.is_running() and child.status() != "zombie":
                    child.kill()
            except Exception:
                pass
        return self.process.returncode

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) the server's processes have used so far, by role:
        ``server`` (the API process), ``engine`` (vLLM's engine core), ``retriever`` (the
        child retriever service) and ``other``; ``{}`` without psutil. A cell's difference
        says which process the extra work of a method lands on: on a shared host every core
        the server takes is one the retriever's scan threads wait for."""
        try:
            import psutil

            root = psutil.Process(self.process.pid)
            out = {"server": _cpu(root)}
            for child in root.children(recursive=True):
                role = _role(child)
                out[role] = out.get(role, 0.0) + _cpu(child)
        except Exception:  # psutil missing, or the server is gone
            return {}
        return out

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cpu(process: Any) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _role(process: Any) -> str:
    """``engine``, ``retriever`` or ``other``, from the process's command line (vLLM names
    its engine core process ``VLLM::EngineCore``)."""
    try:
        words = " ".join(process.cmdline()) + " " + process.name()
    except Exception:
        return "other"
    if "EngineCore" in words:
        return "engine"
    if "retriever" in words and "serve" in words:
        return "retriever"
    return "other"


def _wait_ready(process: subprocess.Popen[str], timeout_s: float, log_path: Path) -> str:
    lines: queue.Queue[str] = queue.Queue()

    def pump(stream: IO[str]) -> None:
        for line in stream:
            lines.put(line)
        lines.put("")

    assert process.stdout is not None
    threading.Thread(target=pump, args=(process.stdout,), daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            msg = f"server not ready after {timeout_s:.0f} s (log: {log_path})"
            raise TimeoutError(msg) from None
        if not line:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited with {process.wait()} before it was ready:\n{tail}")
        if line.startswith(READY_PREFIX):
            return line.split()[-1]


def _kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


# -- /metrics -------------------------------------------------------------------------------


def scrape(url: str, timeout_s: float = 30.0) -> Samples:
    """Every sample of the server's ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=timeout_s).text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """Sum over matching label sets of ``after - before`` for sample ``name``."""
    total = 0.0
    for (sample, pairs), value in after.items():
        if sample != name:
            continue
        got = dict(pairs)
        if all(got.get(k) == v for k, v in labels.items()):
            total += value - before.get((sample, pairs), 0.0)
    return total


def _histogram(before: Samples, after: Samples, name: str, **labels: str) -> dict[str, float]:
    """Count, sum, mean and bucket-estimated p50 / p99 of one histogram's new observations."""
    count = _delta(before, after, name + "_count", **labels)
    total = _delta(before, after, name + "_sum", **labels)
    buckets: dict[float, float] = {}
    for (sample, pairs), _ in after.items():
        le = dict(pairs).get("le")
        if sample == name + "_bucket" and le is not None:
            edge = float(le)
            if edge not in buckets:
                buckets[edge] = _delta(before, after, sample, le=le, **labels)
    out = {"count": count, "sum": total, "mean": total / count if count else 0.0}
    for q in (50, 99):
        out[f"p{q}"] = _bucket_quantile(buckets, count, q / 100)
    return out


def _bucket_quantile(buckets: Mapping[float, float], count: float, q: float) -> float:
    """Upper edge of the bucket holding the ``q`` quantile (cumulative buckets)."""
    if not count:
        return 0.0
    for edge in sorted(buckets):
        if buckets[edge] >= q * count:
            return edge
    return float("inf")


def batch_stats(before: Samples, after: Samples) -> dict[str, Any]:
    """The cell's retriever batching and verification numbers (see module doc)."""
    calls = _histogram(before, after, "ralmspec_retriever_batch_calls")
    queries = _histogram(before, after, "ralmspec_retriever_batch_queries")
    wait = _histogram(before, after, "ralmspec_retriever_batch_wait_seconds")
    steps = _histogram(before, after, "ralmspec_verification_steps")
    vlat = _histogram(before, after, "ralmspec_verification_latency_seconds")
    search = _histogram(before, after, "ralmspec_retrieval_latency_seconds", kind="search")
    return {
        "retriever_rpcs": int(calls["count"]),
        "batch_callers_mean": round(calls["mean"], 3),
        "batch_queries_mean": round(queries["mean"], 3),
        "batch_queries_p50": queries["p50"],
        "batch_queries_p99": queries["p99"],
        "batch_wait_mean_s": round(wait["mean"], 5),
        "batch_wait_p99_s": wait["p99"],
        "verifications": int(steps["count"]),
        "verification_steps_mean": round(steps["mean"], 3),
        "verification_latency_mean_s": round(vlat["mean"], 4),
        "search_latency_mean_s": round(search["mean"], 4),
        "searches_seen_by_requests": int(search["count"]),
        "retriever_queries": int(queries["sum"]),
        "load_fallbacks": int(_delta(before, after, "ralmspec_load_fallbacks_total")),
        "retriever_fallbacks": int(
            _delta(before, after, "ralmspec_load_fallbacks_total", reason="retriever")
        ),
        "held_steps": int(_delta(before, after, "ralmspec_held_steps_total")),
        "retriever_calls": {
            method: int(n)
            for method, n in _by_label(
                before, after, "ralmspec_retriever_calls_total", "method"
            ).items()
            if n
        },
        "measured_plain_steps": int(_delta(before, after, "ralmspec_measured_plain_steps_total")),
        **index_stats(before, after),
        **lm_stats(before, after),
    }


def index_stats(before: Samples, after: Samples) -> dict[str, Any]:
    """The retriever service's own view (its counters, fetched by each scrape): index
    searches and the mean seconds its backend spent in one. Next to ``search_latency_mean_s``
    (a search as the server's requests saw it) this tells a slow index from slow RPCs, batch
    windows or a busy event loop. None where the server's retriever has no counters.
    Plus ``backend_stats``."""
    if ("ralmspec_retriever_index_searches_total", ()) not in after:
        return {"index_searches": None, "index_search_mean_s": None}
    searches = _delta(before, after, "ralmspec_retriever_index_searches_total")
    seconds = _delta(before, after, "ralmspec_retriever_search_seconds_total")
    return {
        "index_searches": int(searches),
        "index_search_mean_s": round(seconds / searches, 4) if searches else 0.0,
        **backend_stats(before, after),
    }


def backend_stats(before: Samples, after: Samples) -> dict[str, Any]:
    """Where the retriever's backend spent the cell (``InfoResponse.backend_counters``):
    seconds per phase (``backend_seconds``), its counts (``backend_work``) and, for a
    circular scan, one chunk's average: query rows and cohorts on board, and milliseconds in
    the product, the threshold ops and the rest of the walk (boarding, bookkeeping, GIL
    waits). A cell where the scan's searches got slower shows here which part grew."""
    phases = _by_label(before, after, "ralmspec_retriever_backend_seconds_total", "phase")
    work = _by_label(before, after, "ralmspec_retriever_backend_work_total", "counter")
    if not phases and not work:
        return {}
    out: dict[str, Any] = {
        "backend_seconds": {k: round(v, 4) for k, v in phases.items()},
        "backend_work": {k: int(v) for k, v in work.items()},
    }
    chunk = scan_chunk({**{f"{k}_s": v for k, v in phases.items()}, **work})
    if chunk is not None:
        out["scan_chunk"] = chunk
    return out


def scan_chunk(counters: Mapping[str, float]) -> dict[str, float] | None:
    """One chunk's average from a difference of ``InfoResponse.backend_counters`` (keys as
    the retriever names them): query rows and cohorts on board, and milliseconds in the
    product, the threshold ops and the rest of the walk. None without a circular scan's
    chunks."""
    chunks = counters.get("scan_chunks", 0.0)
    if not chunks:
        return None
    product, threshold = counters.get("scan_product_s", 0.0), counters.get("scan_threshold_s", 0.0)
    return {
        "rows": round(counters.get("scan_rows", 0.0) / chunks, 2),
        "cohorts": round(counters.get("scan_cohorts", 0.0) / chunks, 2),
        "product_ms": round(1e3 * product / chunks, 3),
        "threshold_ms": round(1e3 * threshold / chunks, 3),
        "other_ms": round(
            1e3 * (counters.get("scan_busy_s", 0.0) - product - threshold) / chunks, 3
        ),
    }


def _by_label(before: Samples, after: Samples, name: str, label: str) -> dict[str, float]:
    """``after - before`` of sample ``name`` per value of ``label``."""
    values = {dict(pairs).get(label) for sample, pairs in after if sample == name}
    present = sorted(v for v in values if v is not None)
    return {v: _delta(before, after, name, **{label: v}) for v in present}


def lm_stats(before: Samples, after: Samples) -> dict[str, Any]:
    """The LM's work in the cell from vLLM's own counters: engine requests (one per RaLM LM
    call), prompt tokens sent and served from the prefix cache, generated tokens (discarded
    ones included), preemptions, engine steps and tokens per step."""
    steps = _histogram(before, after, "vllm:iteration_tokens_total")
    prompt = _delta(before, after, "vllm:prompt_tokens_total")
    cached = _delta(before, after, "vllm:prompt_tokens_cached_total")
    return {
        "lm_calls": int(_delta(before, after, "vllm:request_success_total")),
        "lm_prompt_tokens": int(prompt),
        "lm_prompt_tokens_computed": int(prompt - cached),
        "lm_generated_tokens": int(_delta(before, after, "vllm:generation_tokens_total")),
        "lm_preemptions": int(_delta(before, after, "vllm:num_preemptions_total")),
        "lm_engine_steps": int(steps["count"]),
        "lm_tokens_per_step": round(steps["mean"], 2),
    }
