"""``bench_retrieval``'s output: the result file rewritten as cells finish, and its plot.

``Results`` holds the index-open records and the timed rows so far; every ``add_build`` /
``add_row`` rewrites ``{out_dir}/{name}.json`` through ``common.write_results`` with
``meta.complete`` false and ``meta.cells_done`` of ``meta.cells_total``, and the run's last
``write(complete=True)`` marks it finished, so a run stopped by ``timeout`` keeps every
finished cell. ``cell_row`` turns one timed cell into a row; ``plot_rows`` draws p50 latency
against batch size per corpus size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import Series, Writer, plot_panels, thread_settings, write_results

Row = dict[str, Any]


@dataclass
class Results:
    """The rows and index builds so far, rewritten to ``{out_dir}/{name}.json`` after every
    change (``meta.complete`` false) and once more at the end (``write(complete=True)``)."""

    name: str
    meta: dict[str, Any]
    """Run metadata; ``builds``, ``threads`` and the progress fields are added per write."""
    out_dir: str
    cells_total: int
    """Cells the run plans (corpora x variants x transports x batch sizes)."""
    builds: list[Row] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    on_write: Writer | None = None

    def add_build(self, record: Row) -> None:
        self.builds.append(record)
        self.write()

    def add_row(self, row: Row) -> None:
        self.rows.append(row)
        self.write()

    def write(self, complete: bool = False) -> Path:
        meta = {
            **self.meta,
            "threads": thread_settings(),  # live pool sizes, once torch / faiss are loaded
            "builds": self.builds,
            "complete": complete,
            "cells_done": len(self.rows),
            "cells_total": self.cells_total,
        }
        path = write_results(self.name, self.rows, meta, self.out_dir)
        if self.on_write is not None:
            self.on_write(path)
        return path


def cell_row(base: Row, transport: str, batch_size: int, cell: Row) -> Row:
    row = {**base, "transport": transport, "batch_size": batch_size, **cell}
    row["per_query_ms_p50"] = round(row["latency_ms_p50"] / batch_size, 3)
    return row


def _series(label: str, points: list[tuple[int, float]], style: str) -> Series:
    points = sorted(points)
    return Series(label, [x for x, _ in points], [y for _, y in points], style)


def plot_rows(rows: Sequence[Row], path: Path, machine_tag: str) -> Path:
    """p50 latency vs batch size: one panel per corpus size, one line per backend/transport
    (solid: in-process, dashed: gRPC, dotted: the query encoder alone)."""
    panels: dict[str, list[Series]] = {}
    for size, real in sorted({(r["corpus_size"], r["num_real_docs"]) for r in rows}):
        mine = [r for r in rows if r["corpus_size"] == size]
        series = []
        for backend, transport in sorted({(r["backend"], r["transport"]) for r in mine}):
            points = [
                (r["batch_size"], r["latency_ms_p50"])
                for r in mine
                if (r["backend"], r["transport"]) == (backend, transport)
            ]
            style = "-" if transport == "inproc" else "--"
            series.append(_series(f"{backend} {transport}", points, style))
        encode = [
            (r["batch_size"], r["encode_ms_p50"])
            for r in mine
            if (r["backend"], r["transport"]) == ("flat", "inproc") and "encode_ms_p50" in r
        ]
        if encode:
            series.append(_series("encode-only (MiniLM)", encode, ":"))
        panels[f"{size:,} docs ({real:,} real)"] = series
    return plot_panels(
        path,
        panels,
        xlabel="batch size (queries per call)",
        ylabel="latency p50 (ms)",
        title=f"Retrieval latency per call, {machine_tag}",
    )


TABLE_COLUMNS = (
    "corpus_size", "backend", "transport", "batch_size",
    "latency_ms_p50", "latency_ms_p99", "encode_ms_p50", "n",
)  # fmt: skip
