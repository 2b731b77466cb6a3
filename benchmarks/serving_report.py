"""Rows, identity checks, table and plot of ``bench_serving``.

``cell_row`` joins a cell's client-side summary (``serving_load.summarize``), its server-side
batching numbers (``serving_server.batch_stats``) and its identity check into one result row;
``check_identity`` compares every answer with the baseline's answer to the same question;
``add_ratios`` adds each row's throughput and p50 relative to the baseline row of its cell
(and repeat); ``repeat_summary`` condenses repeated cells per (cell, method);
``plot_serving`` draws throughput, latency, TTFT and retriever batch size against concurrency
(or request rate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import save_png
from benchmarks.serving_load import RequestRecord

TABLE_COLUMNS = (
    "cell", "method", "num_requests", "requests_per_s", "throughput_tok_s", "speedup_vs_baseline",
    "ttft_p50_s", "tpot_p50_s", "p50_s", "p99_s", "batch_queries_mean", "batch_callers_mean",
    "search_latency_mean_s", "index_search_mean_s", "retriever_queries", "speculation_accuracy",
    "load_fallbacks", "held_steps", "measured_plain_steps", "outputs_identical",
)  # fmt: skip


def check_identity(
    records: Sequence[RequestRecord], reference: Mapping[str, str]
) -> tuple[bool | None, list[str]]:
    """(all answers equal the reference (``None`` when none could be checked), the ids of
    questions whose answer differs)."""
    checked = [r for r in records if not r.error and r.job.qid in reference]
    bad = [r.job.qid for r in checked if r.text != reference[r.job.qid]]
    if not checked:
        return None, []
    return not bad, bad


def cell_label(concurrency: int | None, rate: float | None) -> str:
    return f"c={concurrency}" if concurrency is not None else f"rate={rate:g}/s"


def cell_row(
    base: Mapping[str, Any],
    concurrency: int | None,
    rate: float | None,
    method: str,
    ralm: Mapping[str, Any],
    summary: Mapping[str, Any],
    batching: Mapping[str, Any],
) -> dict[str, Any]:
    """One result row (identity fields are filled in by ``finish_rows``)."""
    return {
        **base,
        "cell": cell_label(concurrency, rate),
        "concurrency": concurrency,
        "request_rate": rate,
        "method": method,
        "ralm": dict(ralm),
        **summary,
        **batching,
        "outputs_identical": None,
        "mismatched_questions": [],
    }


def load_columns(samples: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """A cell's retriever utilization as the server's load signal saw it, from
    ``(seconds into the cell, ralmspec_retriever_utilization)`` samples: quantiles and the
    whole timeline (where a hold flickers, the timeline shows it crossing the limit)."""
    values = sorted(u for _, u in samples)
    return {
        "utilization_p10": _quantile(values, 0.1),
        "utilization_p50": _quantile(values, 0.5),
        "utilization_p90": _quantile(values, 0.9),
        "utilization_max": round(values[-1], 3) if values else None,
        "utilization_timeline": [[round(t, 1), round(u, 3)] for t, u in samples],
    }


def gauge_columns(signals: Mapping[str, Sequence[float]]) -> dict[str, float | None]:
    """p50 and p90 of each load-signal gauge sampled in a cell (``encoder_busy``,
    ``loop_cpu``; ``None`` where the server has none or nothing was sampled)."""
    out: dict[str, float | None] = {}
    for name in ("encoder_busy", "loop_cpu"):
        values = sorted(signals.get(name, ()))
        out[f"{name}_p50"] = _quantile(values, 0.5)
        out[f"{name}_p90"] = _quantile(values, 0.9)
    return out


def _quantile(ordered: Sequence[float], q: float) -> float | None:
    """The sample at quantile ``q`` of ``ordered`` (ascending), to 3 decimals; None if empty."""
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None


def cpu_columns(
    before: Mapping[str, float], after: Mapping[str, float], wall_s: float
) -> dict[str, Any]:
    """CPU cores each process kept busy during a cell (CPU seconds / wall seconds), by role
    (``ServerProcess.cpu_seconds`` plus ``client``, the load generator)."""
    if wall_s <= 0:
        return {"cpu_cores": {}}
    return {
        "cpu_cores": {
            role: round((after[role] - before.get(role, 0.0)) / wall_s, 2) for role in sorted(after)
        }
    }


def finish_rows(
    rows: list[dict[str, Any]],
    records: Mapping[int, Sequence[RequestRecord]],
    reference: Mapping[str, str],
) -> None:
    """Fill each row's identity check (``records`` by row index) and baseline ratios."""
    for i, row in enumerate(rows):
        same, bad = check_identity(records.get(i, ()), reference)
        row["outputs_identical"] = same
        row["mismatched_questions"] = bad
        row["num_checked"] = sum(
            1 for r in records.get(i, ()) if not r.error and r.job.qid in reference
        )
    add_ratios(rows)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``speedup_vs_baseline`` (throughput ratio) and ``p50_vs_baseline`` per cell."""
    base = {(r["cell"], r.get("repeat", 0)): r for r in rows if r["method"] == "baseline"}
    for row in rows:
        ref = base.get((row["cell"], row.get("repeat", 0)))
        row["speedup_vs_baseline"] = (
            round(row["throughput_tok_s"] / ref["throughput_tok_s"], 3)
            if ref and ref["throughput_tok_s"]
            else None
        )
        row["p50_vs_baseline"] = (
            round(row["p50_s"] / ref["p50_s"], 3) if ref and ref["p50_s"] and row["p50_s"] else None
        )


def repeat_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (cell, method): how many repeats, and the mean, min and max of throughput and of
    the speedup over the same repeat's baseline."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["cell"], row["method"]), []).append(row)
    out = []
    for (cell, method), group in groups.items():
        entry: dict[str, Any] = {"cell": cell, "method": method, "repeats": len(group)}
        for key in ("throughput_tok_s", "speedup_vs_baseline"):
            values = [float(r[key]) for r in group if r.get(key) is not None]
            if values:
                entry[key] = {
                    "mean": round(sum(values) / len(values), 3),
                    "min": min(values),
                    "max": max(values),
                }
        out.append(entry)
    return out


PANELS = (
    ("throughput_tok_s", "output tokens/s"),
    ("p50_s", "end-to-end p50 (s)"),
    ("ttft_p50_s", "TTFT p50 (s)"),
    ("batch_queries_mean", "queries per retriever RPC (mean)"),
)


def plot_serving(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """A 2x2 PNG: each panel one metric against concurrency (closed-loop rows, solid) and
    request rate (Poisson rows, dashed, on the same log axis), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes.flat, PANELS, strict=True):
        for i, method in enumerate(methods):
            for x_key, style, suffix in (
                ("concurrency", "-", ""),
                ("request_rate", "--", " (rate)"),
            ):
                pts = sorted(
                    (r[x_key], r[key])
                    for r in rows
                    if r["method"] == method and r.get(x_key) is not None and r.get(key) is not None
                )
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, style, marker="o", color=cycle[i % len(cycle)],
                            label=method + suffix)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (solid) / requests per s (dashed)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path
