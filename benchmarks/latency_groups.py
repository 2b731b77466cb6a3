"""Where a RaLMSpec row's time went, per group of questions: those that speculated
throughout, those the measured-cost rule ran as plain steps throughout, and the mixed ones.

Reads a ``bench_latency`` JSON (its rows' ``per_question`` records) and, for each
speculative method, compares every group with the baseline on the same questions: speed-up,
searches an answer, a search's mean time, searches in flight (their summed time over the
wall time), LM time and rollbacks. Session 25 used it to tell retriever contention
(searches in flight slowing each other) from plain-step overhead.

    tar -xJf benchmarks/results/gpu/archive_latency_s25_bm25-21m.tar.xz
    python3 benchmarks/latency_groups.py \
        benchmarks/results/gpu/latency_gpu-nvidia-h100_smollm2-135m_bm25-21m-process_s25.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Record = Mapping[str, Any]


def group_of(record: Record, slack: int = 2) -> str:
    """``plain`` (all steps but ``slack`` plain), ``speculated`` (at most ``slack`` plain
    steps) or ``mixed``."""
    plain, steps = record["plain_steps"], record["steps"]
    if plain >= max(1, steps - slack):
        return "plain"
    return "speculated" if plain <= slack else "mixed"


def summarize_groups(rows: Sequence[Record]) -> list[dict[str, Any]]:
    """One entry per (speculative method, group), in row order then group order."""
    by_method = {row["method"]: row for row in rows}
    baseline = {q["question_id"]: q for q in by_method["baseline"]["per_question"]}
    out = []
    for method, row in by_method.items():
        if method in ("baseline", "oracle"):
            continue
        groups: dict[str, list[tuple[Record, Record]]] = {}
        for q in row["per_question"]:
            groups.setdefault(group_of(q), []).append((q, baseline[q["question_id"]]))
        for name in ("speculated", "mixed", "plain"):
            pairs = groups.get(name)
            if not pairs:
                continue
            n = len(pairs)
            wall = sum(q["wall_time_s"] for q, _ in pairs)
            base_wall = sum(b["wall_time_s"] for _, b in pairs)
            searches = [s[1] for q, _ in pairs for s in q["searches"]]
            base_searches = [s[1] for _, b in pairs for s in b["searches"]]
            out.append(
                {
                    "method": method,
                    "group": name,
                    "questions": n,
                    "speedup": round(base_wall / wall, 3),
                    "searches_per_answer": round(len(searches) / n, 1),
                    "baseline_searches_per_answer": round(len(base_searches) / n, 1),
                    "search_ms": round(1000 * sum(searches) / max(len(searches), 1), 1),
                    "baseline_search_ms": round(
                        1000 * sum(base_searches) / max(len(base_searches), 1), 1
                    ),
                    "searches_in_flight": round(sum(searches) / wall, 2),
                    "lm_s": round(sum(q["lm_time_s"] for q, _ in pairs) / n, 3),
                    "baseline_lm_s": round(sum(b["lm_time_s"] for _, b in pairs) / n, 3),
                    "rollbacks": round(sum(q["rollbacks"] for q, _ in pairs) / n, 2),
                }
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="bench_latency JSON files")
    args = parser.parse_args(argv)
    for path in args.results:
        print(f"== {path}")
        for g in summarize_groups(json.loads(Path(path).read_text())["rows"]):
            print(
                f"{g['method'][:64]:64} {g['group']:10} {g['questions']:3} q  {g['speedup']:.2f}x"
                f"  searches {g['searches_per_answer']:.1f} (baseline"
                f" {g['baseline_searches_per_answer']:.1f}), {g['search_ms']:.0f} ms each"
                f" (baseline {g['baseline_search_ms']:.0f}), {g['searches_in_flight']:.2f} in"
                f" flight, LM {g['lm_s']:.2f} s (baseline {g['baseline_lm_s']:.2f}),"
                f" rollbacks {g['rollbacks']:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
