"""Serving throughput and latency of the real RaLM server: baseline vs RaLMSpec under load.

Flow: load real questions (NQ, TriviaQA, WebQuestions interleaved, or ``--questions FILE``),
open the knowledge base (``--index``, or ``--filler N``: the real passages plus synthetic
filler to N documents, built once into the cache dir by the same code as ``bench_latency``),
start ONE ``ralmspec-vllm serve`` subprocess on 127.0.0.1 (OS-chosen port) with ``--model``,
``--index`` and every ``--server-arg``, then

1. warm up: ``--warmup`` untimed requests per method, concurrently;
2. per cell (each ``--concurrency`` level: closed loop with that many requests in flight;
   each ``--request-rate``: Poisson arrivals), run every method in turn (the order rotates
   from cell to cell so load drift hits them alike) on the same server. The method is chosen
   per request with the ``ralm`` extension field: ``baseline``, ``ralmspec`` (the server's
   defaults) or a preset row (``B``, ``P``, ..., ``PSA``: its options sent explicitly).
   Requests stream (``stream=true``), so TTFT is the first verified text. ``/metrics`` is
   scraped before and after each (cell, method) and the ``ralmspec_*`` histograms diffed:
   retriever RPCs, callers and queries merged per RPC, batch waits, verification sizes.
3. identity: every answer must equal the baseline's answer to the same question. By default
   (``--shared-questions``) every method of a cell answers the SAME questions, and the
   server's caches are emptied before each (cell, method) with ``POST /reset_prefix_cache``
   (vLLM's prefix cache, the document-token cache and the retriever's query-encoder memo;
   retried until vLLM confirms, an error if it never does), so no method finds KV blocks or
   query encodings another method left and all start equally cold, with prefix caching on.
   ``--no-shared-questions`` is the older mode: each (cell, method) gets its OWN fresh
   questions and no reset; baseline answers for questions only other methods timed come
   from an untimed reference pass at the end. Its per-method
   question mix moved results by about +-10% on the 2-core CPU.

``--repeats N`` runs every cell N times (fresh questions each time, the method order rotating
on), for a run-to-run spread: rows carry ``repeat`` and the result's ``meta.repeat_summary``
gives each method's mean, min and max throughput and speedup over the repeats.

``--time-budget-s`` stops starting requests once spent (in-flight ones finish, later cells
are skipped, the reference pass still runs); rows are written after every cell. Results:
``benchmarks/results/serving_<machine>.json`` (``--name`` to change) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/bench_serving.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cli import OutputConfig, output_flags, parse_config
from benchmarks.common import (
    describe_machine,
    format_table,
    run_metadata,
    write_results,
)
from benchmarks.serving_load import Job
from benchmarks.serving_report import TABLE_COLUMNS, plot_serving, repeat_summary
from benchmarks.serving_server import ServerProcess
from benchmarks.serving_session import METHODS, Session, ralm_options
from ralmspec_vllm.paths import cache_dir
from ralmspec_vllm.questions import DATASETS, Question, load_questions, load_questions_file

logger = logging.getLogger("bench_serving")


@dataclass(frozen=True)
class ServingConfig(OutputConfig):
    """What ``bench_serving`` measures and how (one field per CLI flag); ``name`` (from
    ``OutputConfig``) defaults to ``serving_<machine>``."""

    model: str = "smollm2-135m"
    """Passed to the server's ``--model`` (built-in name or model directory)."""
    concurrency: tuple[int, ...] = (1, 4)
    """Closed-loop cells: requests kept in flight (e.g. 1,8,16,64,256 on a GPU)."""
    request_rates: tuple[float, ...] = ()
    """Poisson cells: mean requests per second."""
    methods: tuple[str, ...] = ("baseline", "ralmspec")
    """``baseline`` (always run), ``ralmspec`` (server defaults) and preset rows."""
    requests_per_cell: int | None = None
    """Requests per (cell, method); ``None``: max(4, 2 x concurrency), 16 for rate cells."""
    datasets: tuple[str, ...] = ("nq", "triviaqa", "webquestions")
    questions_file: str | None = None
    """JSONL with ``question`` per line instead of the datasets (recycled if too few)."""
    index: str | None = None
    """Knowledge-base folder for the server; ``None``: the server's default index."""
    filler: int | None = None
    """Grow the index with synthetic filler to this many documents (built once, cached)."""
    shared_questions: bool = True
    """All methods of a cell answer the SAME questions (identity checked directly, no
    reference pass), the server's caches reset before each (cell, method); ``False``: fresh
    questions per (cell, method), no reset, and an untimed baseline reference pass."""
    repeats: int = 1
    """Times every cell is run (fresh questions each time, methods rotating)."""
    max_tokens: int = 128
    warmup: int = 2
    """Untimed requests per method before the first cell."""
    time_budget_s: float | None = None
    """Start no request after this many seconds of cells; the reference pass still runs."""
    server_args: tuple[str, ...] = ()
    """Extra ``ralmspec-vllm serve`` flags (retriever backend, ``--max-num-seqs``, ...)."""
    ready_timeout_s: float = 3600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.methods or any(m not in METHODS for m in self.methods):
            raise ValueError(f"methods: must be a non-empty subset of {METHODS}")
        if any(c < 1 for c in self.concurrency) or any(not r > 0 for r in self.request_rates):
            raise ValueError("concurrency / request_rates: must be positive")
        if not self.concurrency and not self.request_rates:
            raise ValueError("concurrency: give at least one level or a --request-rate")
        if self.questions_file is None and any(d not in DATASETS for d in self.datasets):
            raise ValueError(f"datasets: must be a subset of {sorted(DATASETS)}")
        for name in ("max_tokens", "requests_per_cell", "repeats"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, got {self.warmup}")
        if self.filler is not None and self.filler < 1:
            raise ValueError(f"filler: must be >= 1, got {self.filler}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s: must be > 0, got {self.time_budget_s}")

    @property
    def ordered_methods(self) -> list[str]:
        return ["baseline", *(m for m in self.methods if m != "baseline")]

    @property
    def cells(self) -> list[tuple[int | None, float | None]]:
        return [(c, None) for c in self.concurrency] + [(None, r) for r in self.request_rates]

    def cell_size(self, concurrency: int | None) -> int:
        if self.requests_per_cell is not None:
            return self.requests_per_cell
        return max(4, 2 * concurrency) if concurrency is not None else 16


def question_pool(cfg: ServingConfig) -> list[Question]:
    """Enough distinct questions for the warm-up and every (cell, method), interleaved across
    datasets; a short ``--questions`` file is recycled (with a warning)."""
    per_cell = 1 if cfg.shared_questions else len(cfg.methods)
    needed = cfg.warmup + sum(cfg.cell_size(c) for c, _ in cfg.cells) * per_cell * cfg.repeats
    if cfg.questions_file is not None:
        pool = load_questions_file(cfg.questions_file)
        if len(pool) < needed:
            logger.warning("%d questions for %d requests: recycling", len(pool), needed)
        return list(itertools.islice(itertools.cycle(pool), needed))
    per = math.ceil(needed / len(cfg.datasets))
    sets = [load_questions(d, per) for d in cfg.datasets]
    return [q for group in itertools.zip_longest(*sets) for q in group if q is not None][:needed]


def knowledge_base(cfg: ServingConfig) -> tuple[str | None, dict[str, Any]]:
    """The index path for the server and its description (``bench_latency.open_kb``)."""
    if cfg.index is None and cfg.filler is None:
        return None, {"path": "server default"}
    from benchmarks.bench_latency import LatencyConfig, open_kb

    kb, info = open_kb(LatencyConfig(index=cfg.index, filler=cfg.filler))
    return str(kb.path), info


def server_argv(cfg: ServingConfig, index: str | None) -> list[str]:
    argv = ["--model", cfg.model, "--seed", str(cfg.seed)]
    return argv + (["--index", index] if index else []) + list(cfg.server_args)


async def measure(
    session: Session, questions: Sequence[Question], save: Any = None
) -> dict[str, Any]:
    """Warm-up, every cell x method (``save(rows)`` after each), then the reference pass."""
    cfg = session.cfg
    pool = iter(questions)
    warm = [next(pool) for _ in range(cfg.warmup)]
    start = time.perf_counter()
    for method in cfg.ordered_methods:
        jobs = [Job(q.qid, q.text, method, ralm_options(method)) for q in warm]
        await session.run(jobs, max(1, len(jobs)), math.inf)
    warmup_s = time.perf_counter() - start
    logger.info("warm-up done in %.0f s", warmup_s)
    deadline = time.monotonic() + (cfg.time_budget_s or math.inf)
    methods = cfg.ordered_methods
    skipped: list[str] = []
    runs = itertools.product(range(cfg.repeats), cfg.cells)
    for n, (repeat, (conc, rate)) in enumerate(runs):
        size = cfg.cell_size(conc)
        shared = list(itertools.islice(pool, size)) if cfg.shared_questions else None
        for method in methods[n % len(methods) :] + methods[: n % len(methods)]:
            asked = shared if shared is not None else itertools.islice(pool, size)
            jobs = [Job(q.qid, q.text, method, ralm_options(method)) for q in asked]
            if time.monotonic() >= deadline:
                skipped.append(f"{method} c={conc} rate={rate} repeat={repeat}")
                continue
            if cfg.shared_questions:
                await session.reset_prefix_cache()
            await session.cell(conc, rate, method, jobs, deadline, repeat)
            if save is not None:
                save(session.rows)
    if skipped:
        logger.warning("time budget spent: skipped %s", ", ".join(skipped))
    ref = await session.reference_pass()
    return {"warmup_s": round(warmup_s, 1), "reference_pass": ref, "skipped_cells": skipped}


async def run_benchmark(cfg: ServingConfig) -> tuple[Path, list[dict[str, Any]]]:
    """Start the server, measure, write JSON (+ PNG); the server is stopped in any case."""
    import openai

    machine = describe_machine()
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out_dir"}
    meta = run_metadata("bench_serving", params, machine)  # git state of the code run
    questions = question_pool(cfg)
    index, kb_info = knowledge_base(cfg)
    name = cfg.name or f"serving_{machine.tag}"
    out_dir = Path(cfg.out_dir)
    model_tag = Path(cfg.model).name
    base = {
        "machine": machine.tag,
        "model": model_tag,
        "corpus_size": kb_info.get("num_docs"),
        "max_tokens": cfg.max_tokens,
    }
    meta.update(knowledge_base=kb_info, seed=cfg.seed)
    log_path = cache_dir("bench") / f"{name}.server.log"  # not in the repo
    server = await asyncio.to_thread(
        ServerProcess.start, server_argv(cfg, index), log_path, cfg.ready_timeout_s
    )
    meta["server"] = {
        "argv": server.argv[2:],
        "startup_s": round(server.startup_s, 1),
        "log": str(log_path),
    }

    def save(rows: list[dict[str, Any]], final: bool = False) -> Path:
        """Write the rows so far; ``final``: an answer never checked counts as not identical
        (while running, ``None`` only means its reference answer has not come yet)."""
        checked = [r["outputs_identical"] for r in rows]
        meta["all_outputs_identical"] = all(v is True if final else v is not False for v in checked)
        meta["repeat_summary"] = repeat_summary(rows)
        return write_results(name, rows, meta, out_dir)

    try:
        model = await asyncio.to_thread(server.model_id)
        client = openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=3600.0
        )
        session = Session(cfg, client, server.url, model, base, cpu=server.cpu_seconds)
        meta.update(await measure(session, questions, save))
        meta["questions"] = [{"id": q.qid, "dataset": q.dataset, "text": q.text} for q in questions]
    finally:
        await asyncio.to_thread(server.stop)
    rows = session.rows
    path = save(rows, final=True)
    if cfg.plot and rows:
        docs = kb_info.get("num_docs")
        title = (
            f"RaLM serving, {model_tag}, {f'{docs:,}' if docs else 'default index'} docs, "
            f"max_tokens {cfg.max_tokens}, {machine.tag}"
        )
        plot_serving(rows, path.with_suffix(".png"), title)
    return path, rows


class _Append(argparse.Action):
    """``append`` onto a tuple default (argparse's own cannot)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, (*(getattr(namespace, self.dest) or ()), values))


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in _csv(text))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in _csv(text))


_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--model", "model", {"help": "the server's --model"}),
    ("--concurrency", "concurrency", {"type": _ints, "help": "comma list of in-flight levels"}),
    ("--request-rate", "request_rates", {"type": _floats, "help": "comma list of Poisson req/s"}),
    ("--methods", "methods", {"type": _csv, "help": f"comma list of {','.join(METHODS)}"}),
    ("--requests-per-cell", "requests_per_cell",
     {"type": int, "help": "requests per cell and method (default: max(4, 2c); 16 per rate)"}),
    ("--datasets", "datasets", {"type": _csv, "help": "comma list of nq,triviaqa,webquestions"}),
    ("--questions", "questions_file", {"help": "JSONL file with a 'question' per line"}),
    ("--index", "index", {"help": "knowledge-base folder for the server"}),
    ("--filler", "filler", {"type": int, "help": "grow the index to N docs with filler"}),
    ("--shared-questions", "shared_questions",
     {"action": argparse.BooleanOptionalAction,
      "help": "same questions for every method, server caches reset before each (default); "
              "--no-shared-questions: fresh questions per method, no reset"}),
    ("--repeats", "repeats", {"type": int, "help": "run every cell N times (spread)"}),
    ("--max-tokens", "max_tokens", {"type": int, "help": "max_tokens per request"}),
    ("--warmup", "warmup", {"type": int, "help": "untimed requests per method"}),
    ("--time-budget-s", "time_budget_s", {"type": float, "help": "stop starting requests"}),
    ("--server-arg", "server_args",
     {"action": _Append, "help": "extra serve flag, repeatable (--server-arg=--max-num-seqs=16)"}),
    ("--ready-timeout-s", "ready_timeout_s", {"type": float, "help": "server start-up limit"}),
    ("--seed", "seed", {"type": int, "help": "engine and arrival seed"}),
    *output_flags("serving_<machine>"),
)  # fmt: skip
QUICK: dict[str, Any] = {
    "model": "tiny-llama",
    "concurrency": (1, 2),
    "datasets": ("nq",),
    "requests_per_cell": 2,
    "max_tokens": 16,
    "warmup": 1,
}
"""``--quick``: a smoke run on the tiny random model and the default index."""


def parse_args(argv: Sequence[str] | None = None) -> ServingConfig:
    """Flags, plus everything after a bare ``--`` as server arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    cfg = parse_config(ServingConfig, _FLAGS, QUICK, __doc__, argv)
    for name in ("httpx", "httpx2", "openai"):  # one line per request otherwise
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    return dataclasses.replace(cfg, server_args=(*(cfg.server_args or ()), *extra))


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    start = time.perf_counter()
    path, rows = asyncio.run(run_benchmark(cfg))
    print(format_table(rows, TABLE_COLUMNS))
    print(f"wrote {path} ({len(rows)} rows in {time.perf_counter() - start:.0f} s)")
    bad = [f"{r['cell']}/{r['method']}" for r in rows if r["outputs_identical"] is False]
    if bad:
        print(f"ERROR: outputs differ from the baseline's in {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
