"""Scheduler hook (paused sessions, ``lm_path=sessions``) vs resubmission with prefix caching.

Both LM paths run on ONE engine that has the hook (the hook leaves ordinary requests alone),
so they see the same weights, KV cache and machine; cells alternate the two paths. The
workloads are scripted RaLM runs through ``RaLMEngine`` (real vLLM, real tokenizer):

- ``continue``: baseline RaLM whose retriever always returns the same document: every step
  extends the previous one (resume = 1 new token; resubmission recomputes the partial
  last KV block).
- ``rollback``: RaLMSpec (stride 3) whose true document is doc 0 except at about one step in
  three, where it is a fresh document: speculation misses there and rolls back.
- ``docchange``: baseline RaLM whose retriever returns a different document at every step:
  nothing but the BOS token is shared between steps (the hook can only lose here).

Each workload runs at low load (1 and 4 concurrent requests) on a normal KV cache and under
memory pressure (16 concurrent requests on a KV cache smaller than they need, set with
``num_gpu_blocks_override``). Reported per cell: wall time, generated tokens/s, prompt
tokens recomputed (prefill not served from KV), and whether both paths produced identical
tokens. Writes ``benchmarks/results/scheduler_<machine>.json`` and ``.png``.

Run: ``flock -x /tmp/bench.lock .venv/bin/python benchmarks/bench_scheduler.py`` (``--quick``
for a smoke run).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ralmspec_vllm.engine.settings import apply_process_settings

apply_process_settings()  # before torch / vLLM are imported

from benchmarks.cli import Flag, parse_config  # noqa: E402
from benchmarks.common import (  # noqa: E402
    Series,
    describe_machine,
    format_table,
    plot_panels,
    run_metadata,
    write_results,
)
from ralmspec_vllm.core.config import RaLMConfig, SpeculationConfig  # noqa: E402
from ralmspec_vllm.core.lm import LanguageModel  # noqa: E402
from ralmspec_vllm.core.runner import RaLMEngine, RaLMResult  # noqa: E402
from ralmspec_vllm.types import Document, Hit, RetrieverInfo  # noqa: E402

logger = logging.getLogger("bench_scheduler")

WORKLOADS = ("continue", "rollback", "docchange")
PATHS = ("resubmit", "sessions")
PROGRESS_COLUMNS = (
    "workload", "load", "concurrency", "method", "wall_s", "throughput_tok_s",
    "prefill_computed_tokens",
)  # fmt: skip
"""Logged per cell while running; the final table adds rollbacks, identity and speed-up."""


@dataclass(frozen=True)
class BenchConfig:
    model: str = "smollm2-135m"
    """Built-in model name or model directory."""
    workloads: tuple[str, ...] = WORKLOADS
    low_concurrency: tuple[int, ...] = (1, 4)
    """Concurrent RaLM requests on the normal KV cache."""
    pressure_concurrency: tuple[int, ...] = (16,)
    """Concurrent RaLM requests on the small KV cache."""
    pressure_blocks: int = 48
    """KV blocks (32 tokens each) of the memory-pressure engine."""
    requests_per_slot: int = 2
    """Requests per cell = concurrency x this (at least 4)."""
    max_new_tokens: int = 32
    doc_words: int = 80
    reps: int = 2
    """Repetitions of each cell and path (alternating); the median wall time is kept."""
    name_suffix: str = ""
    """Appended to the result file name (``--quick`` runs write ``..._quick``)."""

    def __post_init__(self) -> None:
        for name in self.workloads:
            if name not in WORKLOADS:
                raise ValueError(f"workloads: unknown {name!r}, choose from {WORKLOADS}")
        if self.reps < 1 or self.requests_per_slot < 1 or self.pressure_blocks < 8:
            raise ValueError("reps, requests_per_slot must be positive; pressure_blocks >= 8")


FLAGS: list[Flag] = [
    ("--model", "model", {"help": "model name or directory"}),
    ("--workloads", "workloads", {"type": lambda s: tuple(s.split(",")), "help": "workloads"}),
    ("--low", "low_concurrency", {"type": lambda s: tuple(map(int, s.split(","))), "help": "low"}),
    (
        "--pressure",
        "pressure_concurrency",
        {"type": lambda s: tuple(map(int, s.split(","))), "help": "concurrency under pressure"},
    ),
    ("--pressure-blocks", "pressure_blocks", {"type": int, "help": "KV blocks under pressure"}),
    ("--requests-per-slot", "requests_per_slot", {"type": int, "help": "requests per slot"}),
    ("--max-new-tokens", "max_new_tokens", {"type": int, "help": "answer length"}),
    ("--reps", "reps", {"type": int, "help": "repetitions per cell"}),
]
QUICK = {
    "model": "tiny-llama",
    "low_concurrency": (2,),
    "pressure_concurrency": (6,),
    "pressure_blocks": 24,
    "reps": 1,
    "max_new_tokens": 16,
    "name_suffix": "_quick",
}


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


class ScriptedKB:
    """An exact ``AsyncRetriever`` whose top-1 per query follows the workload's script."""

    def __init__(self, workload: str, words: Sequence[str], doc_words: int) -> None:
        self.workload = workload
        self.words = list(words)
        self.doc_words = doc_words

    def truth(self, query: str) -> int:
        h = _crc(query)
        if self.workload == "docchange":
            return 1 + h % 997
        if self.workload == "rollback" and h % 3 == 0:
            return 1000 + h % 997  # a fresh document: speculation misses
        return 0

    def _score(self, query: str, doc_id: int) -> float:
        if doc_id == self.truth(query):
            return 1.0
        return 0.1 + 0.4 * (_crc(f"{query}|{doc_id}") % 1000) / 1000

    async def info(self) -> RetrieverInfo:
        return RetrieverInfo("scripted", 2000, 0, "ip")

    async def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        out = []
        n = k + prefetch
        for query in queries:
            ids = {self.truth(query), *range(min(n, 4))}
            hits = sorted((Hit(d, self._score(query, d)) for d in ids), key=lambda h: -h.score)
            out.append(hits[:n])
        return out

    async def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        return [self._score(query, d) for d in doc_ids]

    async def documents(self, doc_ids: Sequence[int]) -> list[Document]:
        docs = []
        for d in doc_ids:
            start = (d * 37) % max(1, len(self.words) - self.doc_words)
            docs.append(Document(d, f"Title {d}", " ".join(self.words[start:][: self.doc_words])))
        return docs

    async def vectors(self, doc_ids: Sequence[int]) -> Any:
        return None

    async def term_weights(self, doc_ids: Sequence[int]) -> None:
        return None

    async def routing(self) -> None:
        return None

    async def lists(self, doc_ids: Sequence[int]) -> None:
        return None


def questions(n: int, seed: int) -> list[str]:
    topics = ["river", "castle", "novel", "planet", "bridge", "painter", "war", "island"]
    return [
        f"what do we know about the {topics[(seed + i) % 8]} number {seed}-{i}" for i in range(n)
    ]


async def run_cell(
    lm: LanguageModel,
    tokenizer: Any,
    kb: ScriptedKB,
    workload: str,
    qs: list[str],
    c: int,
    cfg: BenchConfig,
) -> tuple[float, list[RaLMResult]]:
    engine = RaLMEngine(lm, tokenizer, kb, RaLMConfig(max_new_tokens=cfg.max_new_tokens))
    mode = "ralmspec" if workload == "rollback" else "baseline"
    spec = SpeculationConfig(speculation_stride=3)
    start = time.perf_counter()
    results = await engine.generate_many(qs, mode, speculation=spec, max_concurrency=c)  # type: ignore[arg-type]
    return time.perf_counter() - start, results


def row_of(
    workload: str, load: str, c: int, path: str, walls: list[float], results: list[RaLMResult]
) -> dict[str, Any]:
    wall = statistics.median(walls)
    tokens = sum(len(r.token_ids) for r in results)
    prompt = sum(r.trace.num_prompt_tokens for r in results)
    cached = sum(r.trace.num_cached_tokens for r in results)
    return {
        "workload": workload,
        "load": load,
        "concurrency": c,
        "method": path,
        "requests": len(results),
        "wall_s": round(wall, 3),
        "walls_s": [round(w, 3) for w in walls],
        "throughput_tok_s": round(tokens / wall, 2),
        "generated_tokens": tokens,
        "prompt_tokens": prompt,
        "prefill_computed_tokens": prompt - cached,
        "rollbacks": sum(r.trace.rollbacks for r in results),
    }


async def run_engine(cfg: BenchConfig, load: str, levels: tuple[int, ...]) -> list[dict[str, Any]]:
    from ralmspec_vllm.engine.models import resolve_model
    from ralmspec_vllm.engine.sessions import SessionConfig, SessionLanguageModel
    from ralmspec_vllm.engine.settings import EngineConfig

    extra = {"num_gpu_blocks_override": cfg.pressure_blocks} if load == "pressure" else {}
    max_len = min(2048, cfg.pressure_blocks * 32) if load == "pressure" else 2048
    config = EngineConfig(model=str(resolve_model(cfg.model)), max_model_len=max_len, extra=extra)
    hooked = await SessionLanguageModel.create(config, sessions=SessionConfig(max_sessions=32))
    base = hooked.base
    paths: dict[str, LanguageModel] = {"resubmit": base, "sessions": hooked}
    tok = base.tokenizer
    words = [w for w in tok.decode(list(range(1000, 3000))).split() if w.isalpha()]
    rows = []
    try:
        warm = ScriptedKB("continue", words, cfg.doc_words)
        for lm in paths.values():  # warm-up: first engine steps are slower
            await run_cell(lm, tok, warm, "continue", questions(2, 999), 2, cfg)
        for workload in cfg.workloads:
            kb = ScriptedKB(workload, words, cfg.doc_words)
            for c in levels:
                qs = questions(max(4, c * cfg.requests_per_slot), c)
                walls: dict[str, list[float]] = {p: [] for p in PATHS}
                outs: dict[str, list[RaLMResult]] = {}
                for rep in range(cfg.reps):
                    order = PATHS if rep % 2 == 0 else PATHS[::-1]
                    for path in order:
                        # Each run starts from a cold prefix cache: the paths run the same
                        # prompts, so the second would otherwise be served by the first.
                        if not await base.engine.reset_prefix_cache():
                            logger.warning("prefix cache not reset (blocks in use)")
                        wall, outs[path] = await run_cell(
                            paths[path], tok, kb, workload, qs, c, cfg
                        )
                        walls[path].append(wall)
                same = [r.token_ids for r in outs["resubmit"]] == [
                    r.token_ids for r in outs["sessions"]
                ]
                for path in PATHS:
                    row = row_of(workload, load, c, path, walls[path], outs[path])
                    row["outputs_identical"] = same
                    rows.append(row)
                    logger.info(
                        "%s",
                        {k: row[k] for k in PROGRESS_COLUMNS},
                    )
        rows.append({"load": load, "session_stats": asdict(hooked.stats)})
    finally:
        await hooked.shutdown()
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``speedup`` on each sessions row: resubmit wall / sessions wall (same cell)."""
    index = {
        (r["workload"], r["load"], r["concurrency"], r["method"]): r for r in rows if "method" in r
    }
    for (workload, load, c, method), row in index.items():
        if method == "sessions":
            ref = index[(workload, load, c, "resubmit")]
            row["speedup"] = round(ref["wall_s"] / row["wall_s"], 3)


def plot(path: Any, rows: list[dict[str, Any]], cfg: BenchConfig) -> None:
    panels: dict[str, list[Series]] = {}
    for workload in cfg.workloads:
        series = []
        for method in PATHS:
            cells = sorted(
                (r for r in rows if r.get("workload") == workload and r.get("method") == method),
                key=lambda r: r["concurrency"],
            )
            xs = [r["concurrency"] for r in cells]
            series.append(Series(method, xs, [r["throughput_tok_s"] for r in cells]))
        panels[workload] = series
    plot_panels(
        path,
        panels,
        xlabel="concurrent RaLM requests (last: KV pressure)",
        ylabel="generated tokens/s",
        title="Scheduler hook vs resubmission",
        logy=False,
    )


async def main_async(cfg: BenchConfig) -> int:
    machine = describe_machine()
    meta = run_metadata("bench_scheduler", asdict(cfg), machine)
    rows = await run_engine(cfg, "low", cfg.low_concurrency)
    rows += await run_engine(cfg, "pressure", cfg.pressure_concurrency)
    add_ratios(rows)
    cells = [r for r in rows if "method" in r]
    cols = [
        *PROGRESS_COLUMNS,
        "rollbacks",
        "outputs_identical",
        "speedup",
    ]
    print(format_table(cells, cols))
    name = f"scheduler_{machine.tag}{cfg.name_suffix}"
    out = write_results(name, rows, meta)
    plot(out.with_suffix(".png"), cells, cfg)
    identical = all(r["outputs_identical"] for r in cells)
    print(f"outputs identical in every cell: {identical}")
    return 0 if identical else 1


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(BenchConfig, FLAGS, QUICK, __doc__, argv)
    return asyncio.run(main_async(cfg))


if __name__ == "__main__":
    raise SystemExit(main())
