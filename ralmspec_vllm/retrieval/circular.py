"""A shared scan that never restarts: queries board it at any chunk and leave after one turn.

A batch scan makes a search that arrives while another runs wait for it (or run beside it,
splitting the memory bandwidth both need). ``CircularScan`` instead keeps ONE thread walking
the document matrix chunk after chunk, round and round, while any query is on board. A search
boards at the next chunk boundary with its queries (a "cohort", with its own
``flat._ThresholdScan`` state), rides along in the same matmul as every other cohort on board, and
is done once it has seen every chunk: a full turn, started wherever the walk was. The order
in which a cohort sees the chunks does not change its result (the threshold scan keeps every
doc that can reach its top-k whatever the order), so the hits are those of a batch scan.

What it buys: a search's latency is one turn, whenever it arrives, and concurrent searches
share the reads of the matrix. It is meant for the pipelined verification
(``overlap_depth="pipeline"``) that submits each speculation step's query the moment it
exists; with a batch scan that query would queue behind the round in flight.
The walk stops when nobody is on board. A search whose caller gave up (``abandon``: a
pipelined verification cancelled by a rollback) leaves the walk at the next chunk instead of
riding out its turn, which at 21M documents made every other search on board slower.

One matmul per chunk covers every cohort on board (and, with ``add_all``, one set of
threshold ops); chunks of 1M docs (the default) let a
cohort board within ~15 ms at 21M docs on 12 CPU threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from ralmspec_vllm.retrieval import abandon

logger = logging.getLogger(__name__)


class ChunkScan(Protocol):
    """One search's running state (``flat._ThresholdScan``)."""

    def add(self, block: Any, start: int) -> None: ...


@dataclass
class _Cohort:
    queries: Any  # (rows, dim) tensor on the matrix's device and dtype
    scan: ChunkScan
    future: Future[ChunkScan]
    left: int  # chunks still to see
    abandoned: threading.Event | None = None  # set: the caller gave up (``abandon``)

    def given_up(self) -> bool:
        return self.abandoned is not None and self.abandoned.is_set()


class CircularScan:
    """Walks ``num_chunks`` chunks in a circle for the cohorts on board.

    ``product(queries, i)`` returns ``(first row, scores)`` of chunk ``i``; it runs on the
    scan's thread only. ``submit`` returns a future of the cohort's scan state once it has
    seen every chunk. ``add_all(scans, block, start)``, where given, feeds one chunk's block
    (the cohorts' rows stacked in boarding order) to every scan at once; by default each
    cohort's ``add`` gets its rows. One call instead of one per cohort matters in-process:
    each torch op the walk makes re-takes the GIL, which can wait a switch interval."""

    def __init__(
        self,
        num_chunks: int,
        product: Callable[[Any, int], tuple[int, Any]],
        name: str = "circular-scan",
        add_all: Callable[[list[Any], Any, int], None] | None = None,
    ) -> None:
        if num_chunks < 1:
            raise ValueError(f"num_chunks: must be >= 1, got {num_chunks}")
        self.num_chunks = num_chunks
        self._product = product
        self._add_all = add_all
        self._name = name
        self._cond = threading.Condition()
        self._boarding: list[_Cohort] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self.turns = 0.0
        """Chunks walked / num_chunks since start (for tests and benchmarks)."""
        self.max_cohorts = 0
        """Most cohorts that shared one chunk's matmul."""
        self.chunks = 0
        """Chunks walked (one product each) since start."""
        self.rows = 0
        """Query rows on board, summed over the chunks walked."""
        self.cohorts = 0
        """Cohorts on board, summed over the chunks walked."""
        self.abandoned = 0
        """Cohorts dropped before their turn ended because their caller gave up."""
        self.product_s = 0.0
        """Seconds of the walk in the chunk products."""
        self.threshold_s = 0.0
        """Seconds of the walk feeding blocks to the cohorts' scans (the threshold ops)."""
        self.busy_s = 0.0
        """Seconds of the walk from taking a chunk's cohorts to done with it, everything
        included: ``busy_s - product_s - threshold_s`` is boarding, bookkeeping and the waits
        to re-take the GIL between them."""

    def counters(self) -> dict[str, float]:
        """The walk's work since start (``scan_*`` keys of a retriever's ``counters``)."""
        return {
            "scan_chunks": float(self.chunks),
            "scan_rows": float(self.rows),
            "scan_cohorts": float(self.cohorts),
            "scan_abandoned": float(self.abandoned),
            "scan_product_s": self.product_s,
            "scan_threshold_s": self.threshold_s,
            "scan_busy_s": self.busy_s,
        }

    def submit(self, queries: Any, scan: ChunkScan) -> Future[ChunkScan]:
        """Board ``queries`` (a tensor the product accepts) with their fresh ``scan``; the
        future fails with ``SearchAbandoned`` if ``abandon.current()`` is set before the
        cohort has seen every chunk."""
        abandoned = abandon.current()
        abandon.check(abandoned)
        future: Future[ChunkScan] = Future()
        cohort = _Cohort(queries, scan, future, self.num_chunks, abandoned)
        with self._cond:
            if self._closed:
                raise RuntimeError("circular scan is closed")
            self._boarding.append(cohort)
            if self._thread is None:
                self._thread = threading.Thread(target=self._walk, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def close(self) -> None:
        """Stop the walk; searches still on board fail."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _walk(self) -> None:
        import torch

        on_board: list[_Cohort] = []
        chunk = 0
        clock = time.perf_counter
        while True:
            with self._cond:
                while not self._closed and not self._boarding and not on_board:
                    self._cond.wait()
                if self._closed:
                    error = RuntimeError("circular scan closed during a search")
                    for cohort in on_board + self._boarding:
                        cohort.future.set_exception(error)
                    return
                # a future cancelled before boarding is dropped; once on board, it runs
                on_board.extend(
                    c for c in self._boarding if c.future.set_running_or_notify_cancel()
                )
                self._boarding.clear()
            on_board = self._drop_abandoned(on_board)
            if not on_board:
                continue
            began = clock()
            try:
                with torch.inference_mode():
                    queries = (
                        on_board[0].queries
                        if len(on_board) == 1
                        else torch.cat([c.queries for c in on_board])
                    )
                    product_at = clock()
                    start, block = self._product(queries, chunk)
                    threshold_at = clock()
                    self.product_s += threshold_at - product_at
                    if self._add_all is not None:
                        self._add_all([c.scan for c in on_board], block, start)
                    else:
                        row = 0
                        for cohort in on_board:
                            rows = len(cohort.queries)
                            cohort.scan.add(block[row : row + rows], start)
                            row += rows
                    self.threshold_s += clock() - threshold_at
            except Exception as exc:  # a failed chunk fails everyone on board, not the walk
                logger.exception("circular scan: chunk %d failed", chunk)
                for cohort in on_board:
                    cohort.future.set_exception(exc)
                on_board = []
                continue
            self.max_cohorts = max(self.max_cohorts, len(on_board))
            self.chunks += 1
            self.rows += len(queries)
            self.cohorts += len(on_board)
            self.turns += 1.0 / self.num_chunks
            chunk = (chunk + 1) % self.num_chunks
            still: list[_Cohort] = []
            for cohort in on_board:
                cohort.left -= 1
                if cohort.left == 0:
                    cohort.future.set_result(cohort.scan)
                else:
                    still.append(cohort)
            on_board = still
            self.busy_s += clock() - began

    def _drop_abandoned(self, on_board: list[_Cohort]) -> list[_Cohort]:
        """The cohorts still wanted; the others' futures fail with ``SearchAbandoned``."""
        if not any(c.given_up() for c in on_board):
            return on_board
        kept = []
        for cohort in on_board:
            if cohort.given_up():
                self.abandoned += 1
                cohort.future.set_exception(abandon.SearchAbandoned("search given up"))
            else:
                kept.append(cohort)
        return kept
