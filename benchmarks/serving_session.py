"""One benchmark session against a running server: cells, metric diffs, identity reference.

``Session`` holds the openai client, the rows so far, each row's request records and the
baseline answers seen so far (``reference``). ``cell`` times one (cell, method): scrape
``/metrics``, run the requests closed-loop or Poisson (progress every 30 s), scrape again,
build the row (``serving_report.cell_row``) and refresh every row's identity check.
``reference_pass`` fetches, untimed, the baseline answers of questions that only other
methods were timed on. ``reset_prefix_cache`` empties the server's caches (``POST
/reset_prefix_cache``) before a cell, retrying while the last cell's requests still hold KV
blocks; the next row records that it ran (``prefix_cache_reset``). ``ralm_options`` maps a
method name onto the request's ``ralm`` field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from benchmarks.serving_load import Job, RequestRecord, run_closed, run_poisson, summarize
from benchmarks.serving_report import (
    cell_row,
    cpu_columns,
    finish_rows,
    gauge_columns,
    load_columns,
)
from benchmarks.serving_server import batch_stats, scrape
from ralmspec_vllm.core.config import PRESETS

if TYPE_CHECKING:
    from benchmarks.bench_serving import ServingConfig

logger = logging.getLogger("bench_serving")

UTILIZATION_GAUGE = "ralmspec_retriever_utilization"
"""The server's retriever load signal (``ralmspec_vllm.metrics``), sampled during cells."""
SIGNAL_GAUGES = {
    "encoder_busy": "ralmspec_retriever_encoder_busy",
    "loop_cpu": "ralmspec_loop_cpu",
}
"""The load signals' parts, sampled with it: the retriever's query-encoder busy share and
the server's event-loop CPU (``gauge_columns``)."""
LOAD_SAMPLE_S = 1.0
"""How often a cell samples it: each sample is one ``/metrics`` request to the server."""

METHODS = ("baseline", "ralmspec", *PRESETS)
"""``baseline``, ``ralmspec`` (the server's defaults) and the preset rows (options sent)."""


def ralm_options(method: str) -> dict[str, Any]:
    """The ``ralm`` request field of a method."""
    if method in ("baseline", "ralmspec"):
        return {"mode": method}
    spec = PRESETS[method]
    return {
        "mode": "ralmspec",
        "speculation_stride": spec.speculation_stride,
        "prefetch_k": spec.prefetch_k,
        "async_verification": spec.async_verification,
    }


async def _sample_load(
    url: str, out: list[tuple[float, float]], every_s: float, signals: dict[str, list[float]]
) -> None:
    """Append ``(seconds since start, ralmspec_retriever_utilization)`` to ``out`` and each
    ``SIGNAL_GAUGES`` value to ``signals[name]`` every ``every_s`` (reading only those
    gauges' lines of ``/metrics``); a failed or unreadable scrape is skipped: the sampler
    must never end a cell."""
    import httpx

    wanted = {UTILIZATION_GAUGE: "", **{g: name for name, g in SIGNAL_GAUGES.items()}}
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
        while True:
            try:
                text = (await http.get("/metrics")).text
                for line in text.splitlines():
                    gauge, _, value = line.partition(" ")
                    if gauge not in wanted:
                        continue
                    if gauge == UTILIZATION_GAUGE:
                        out.append((time.perf_counter() - start, float(value)))
                    else:
                        signals.setdefault(wanted[gauge], []).append(float(value))
            except (httpx.HTTPError, ValueError) as exc:
                logger.debug("utilization sample skipped: %r", exc)
            await asyncio.sleep(every_s)


async def _ticker(label: str, records: list[RequestRecord], total: int, every_s: float) -> None:
    start = time.perf_counter()
    while True:
        await asyncio.sleep(every_s)
        done = len(records)
        logger.info("  %s: %d/%d done, %.0f s", label, done, total, time.perf_counter() - start)


@dataclass
class Session:
    """One run against one server: the client, the results so far and the baseline answers."""

    cfg: ServingConfig
    client: Any
    url: str
    model: str
    base: dict[str, Any]
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    records: dict[int, list[RequestRecord]] = dataclasses.field(default_factory=dict)
    reference: dict[str, str] = dataclasses.field(default_factory=dict)
    api_key: str = "unused"
    cpu: Callable[[], dict[str, float]] | None = None
    """The server's CPU seconds so far by process role (``ServerProcess.cpu_seconds``): each
    row gets the cores every process kept busy during its cell (``cpu_cores``)."""
    _reset: bool = False
    """A reset ran since the last cell (recorded in the next row)."""

    async def reset_prefix_cache(self, timeout_s: float = 60.0) -> None:
        """Empty the server's prefix cache; ``RuntimeError`` if vLLM never confirms."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"}
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.url, timeout=30.0) as http:
            while True:
                reply = await http.post("/reset_prefix_cache", headers=headers)
                reply.raise_for_status()
                if reply.json().get("reset") is True:
                    self._reset = True
                    return
                if time.monotonic() >= deadline:
                    msg = f"the server did not reset its prefix cache within {timeout_s:.0f} s"
                    raise RuntimeError(msg)
                await asyncio.sleep(0.25)

    async def run(self, jobs: list[Job], width: int, deadline: float) -> list[RequestRecord]:
        """Untimed helper: ``jobs`` at ``width`` in flight."""
        out: list[RequestRecord] = []
        tick = asyncio.create_task(_ticker("untimed", out, len(jobs), 30.0))
        try:
            await run_closed(
                self.client, self.model, jobs, width, self.cfg.max_tokens, deadline, out
            )
        finally:
            tick.cancel()
        return out

    async def cell(
        self,
        conc: int | None,
        rate: float | None,
        method: str,
        jobs: list[Job],
        deadline: float,
        repeat: int = 0,
    ) -> None:
        """Time one (cell, method), diff the server's metrics around it, add its row."""
        cfg = self.cfg
        label = f"{method} c={conc}" if rate is None else f"{method} rate={rate:g}/s"
        logger.info("cell %s: %d requests", label, len(jobs))
        records: list[RequestRecord] = []
        before = await asyncio.to_thread(scrape, self.url)
        cpu_before = self._cpu_seconds()
        load: list[tuple[float, float]] = []
        signals: dict[str, list[float]] = {}
        sampler = asyncio.create_task(_sample_load(self.url, load, LOAD_SAMPLE_S, signals))
        tick = asyncio.create_task(_ticker(label, records, len(jobs), 30.0))
        try:
            if rate is None:
                assert conc is not None
                wall = await run_closed(
                    self.client, self.model, jobs, conc, cfg.max_tokens, deadline, records
                )
            else:
                seed = cfg.seed + len(self.rows)
                wall = await run_poisson(
                    self.client, self.model, jobs, rate, cfg.max_tokens, deadline, records, seed
                )
        finally:
            tick.cancel()
            sampler.cancel()
        cpu = cpu_columns(cpu_before, self._cpu_seconds(), wall)
        after = await asyncio.to_thread(scrape, self.url)
        if not records:
            return
        summary = summarize(records, wall)
        row = cell_row(
            self.base, conc, rate, method, ralm_options(method), summary, batch_stats(before, after)
        )
        row.update(load_columns(load), **gauge_columns(signals), **cpu)
        row["prefix_cache_reset"], self._reset = self._reset, False
        row["repeat"] = repeat
        self.records[len(self.rows)] = records
        self.rows.append(row)
        if method == "baseline":
            self.reference.update({r.job.qid: r.text for r in records if not r.error})
        finish_rows(self.rows, self.records, self.reference)
        logger.info(
            "  %s: %.2f req/s, %.1f tok/s, p50 %.2f s, %d failed, %d resent, %d fell back,"
            " %d held steps, %d measured plain steps, identical %s",
            label, row["requests_per_s"], row["throughput_tok_s"], row["p50_s"] or 0.0,
            row["failed"], row["connection_resends"], row.get("load_fallbacks", 0),
            row.get("held_steps", 0), row.get("measured_plain_steps", 0),
            row["outputs_identical"],
        )  # fmt: skip
        logger.info(
            "  %s: retriever utilization p10/p50/p90 %s/%s/%s (encoder busy p50/p90 %s/%s);"
            " loop CPU p50/p90 %s/%s; CPU cores %s",
            label, row["utilization_p10"], row["utilization_p50"], row["utilization_p90"],
            row["encoder_busy_p50"], row["encoder_busy_p90"], row["loop_cpu_p50"],
            row["loop_cpu_p90"],
            ", ".join(f"{k} {v:.2f}" for k, v in row["cpu_cores"].items()) or "n/a",
        )  # fmt: skip
        if row.get("retriever_calls"):  # what the server asked of the retriever, per answer
            done = max(row["num_requests"] - row["failed"], 1)
            calls = sorted(row["retriever_calls"].items())
            logger.info(
                "  %s: retriever calls an answer: %s",
                label, ", ".join(f"{k} {v / done:.1f}" for k, v in calls),
            )  # fmt: skip
        if row.get("scan_chunk"):  # where the retriever's scan spent the cell, in the log
            chunk = row["scan_chunk"]
            logger.info(
                "  %s: index search %.3f s; scan chunk: %.1f rows, %.1f cohorts, product %.2f ms,"
                " threshold %.2f ms, other %.2f ms",
                label, row["index_search_mean_s"], chunk["rows"], chunk["cohorts"],
                chunk["product_ms"], chunk["threshold_ms"], chunk["other_ms"],
            )  # fmt: skip

    def _cpu_seconds(self) -> dict[str, float]:
        """The server's CPU seconds by role (``cpu``) plus this process's (``client``)."""
        out = self.cpu() if self.cpu is not None else {}
        return {**out, "client": time.process_time()}

    async def reference_pass(self) -> dict[str, Any]:
        """Untimed baseline answers for questions only other methods were timed on."""
        missing = {
            r.job.qid: r.job
            for recs in self.records.values()
            for r in recs
            if r.job.qid not in self.reference
        }
        info: dict[str, Any] = {"questions": len(missing), "seconds": 0.0, "failed": 0}
        if missing:
            logger.info("reference pass: baseline answers to %d more questions", len(missing))
            base = ralm_options("baseline")
            jobs = [Job(j.qid, j.question, "baseline", base) for j in missing.values()]
            width = max([c for c, _ in self.cfg.cells if c is not None] or [8])
            start = time.perf_counter()
            records = await self.run(jobs, width, math.inf)
            info["seconds"] = round(time.perf_counter() - start, 1)
            info["failed"] = sum(1 for r in records if r.error)
            self.reference.update({r.job.qid: r.text for r in records if not r.error})
        finish_rows(self.rows, self.records, self.reference)
        return info
