"""Join ``bench_latency`` result files of one run cut into shards (``--skip-questions``).

A batch-1 run at 21M documents costs ~13 s per question (the baseline alone ~9 s), so 100
questions do not fit one 10-minute device call. Each shard runs the same command on the same
machine and commit, with its own questions (``--skip-questions N``), and writes its own
JSON; this rebuilds every shard's per-question records and summarizes them together with
the same ``summarize`` as one run would (ratios of means over all questions):

    python benchmarks/merge_latency.py A.json B.json --name latency_..._merged

Keeps the methods every shard ran (a shard may add rows of its own, e.g. an A/B); refuses
shards that differ in what they measure (commit, machine, model, retriever, corpus size,
engine settings), that share a question or that lack a common baseline (``--any-commit``
lets shards of different commits through). The merged file's ``meta.shards`` lists each
shard's commit, command, date and question count; a PNG is drawn next to it. One file
alone is summarized again by today's ``summarize``: an older run gains the fields added
since (e.g. ``oracle_fraction_equal_lm``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/merge_latency.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import format_table, read_results, write_results
from benchmarks.latency_report import TABLE_COLUMNS, RunRecord, plot_latency, summarize

# Params that may differ between shards: which questions, how long, where results go, and
# which other backends the invocation ran (a file holds one backend's rows; they must match).
SHARD_PARAMS = frozenset(
    {"skip_questions", "time_budget_s", "name", "plot", "log_level", "methods", "backends"}
)
BASE_FIELDS = ("machine", "model", "corpus_size", "transport")


def _same(shards: Sequence[dict[str, Any]], what: str, get: Any) -> Any:
    values = [get(shard) for shard in shards]
    if any(v != values[0] for v in values[1:]):
        raise ValueError(f"shards differ in {what}: {values}")
    return values[0]


def merge(
    shards: Sequence[dict[str, Any]], paths: Sequence[str], any_commit: bool = False
) -> tuple[list[dict], dict]:
    """(rows, meta) of the shards joined; raises ``ValueError`` where they do not match.
    ``any_commit`` joins shards of different commits, for a caller who has checked that
    nothing between them changes what a run measures; each shard's commit is kept."""
    if not shards:
        raise ValueError("merge needs a shard")
    if not any_commit:
        _same(shards, "commit", lambda s: s["meta"]["git_sha"])
    _same(shards, "machine", lambda s: s["meta"]["machine_tag"])
    _same(shards, "corpus size", lambda s: s["meta"]["knowledge_base"]["num_docs"])
    _same(shards, "params", lambda s: {
        k: v for k, v in s["meta"]["params"].items() if k not in SHARD_PARAMS
    })  # fmt: skip
    # A shard may carry extra rows (an A/B of its own); the merge keeps the common methods.
    per_shard = [[r["method"] for r in s["rows"]] for s in shards]
    methods = [m for m in per_shard[0] if all(m in mine for mine in per_shard[1:])]
    if "baseline" not in methods:
        raise ValueError(f"shards share no baseline row: methods {per_shard}")
    _same(shards, "retriever", lambda s: sorted({r["retriever"] for r in s["rows"]}))
    records: list[RunRecord] = []
    seen: dict[str, str] = {}
    for shard, path in zip(shards, paths, strict=True):
        for row in (r for r in shard["rows"] if r["method"] in methods):
            for brief in row["per_question"]:
                if row["method"] == "baseline":
                    if brief["question_id"] in seen:
                        raise ValueError(
                            f"question {brief['question_id']} is in {seen[brief['question_id']]} "
                            f"and {path}"
                        )
                    seen[brief["question_id"]] = path
                records.append(RunRecord.from_brief(row["retriever"], row["method"], brief))
    base = {k: shards[0]["rows"][0][k] for k in BASE_FIELDS}
    rows = summarize(records, base, methods)
    # the distinct questions the shards were offered, in order: shards of one question list
    # (--skip-questions) overlap, so their lists repeat and their totals' sum would too
    offered = {q["id"]: q for s in shards for q in s["meta"]["questions"]}
    meta = dict(shards[0]["meta"])
    meta.update(
        # shards of several commits (--any-commit) name them all, in shard order
        git_sha="+".join(dict.fromkeys(s["meta"]["git_sha"] for s in shards)),
        command="merge_latency.py " + " ".join(paths),
        questions=[q for qid, q in offered.items() if qid in seen],
        complete=all(s["meta"]["complete"] for s in shards),
        questions_timed=min((r["num_questions"] for r in rows), default=0),
        questions_total=len(offered),
        all_outputs_identical=all(r["outputs_identical"] for r in rows),
        methods_left_out=sorted({m for mine in per_shard for m in mine} - set(methods)),
        shards=[
            {
                "file": Path(p).name,
                "commit": s["meta"]["git_sha"],
                "date": s["meta"]["date"],
                "command": s["meta"]["command"],
                "questions_timed": s["meta"]["questions_timed"],
                "complete": s["meta"]["complete"],
            }
            for s, p in zip(shards, paths, strict=True)
        ],
    )
    return rows, meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="+", help="bench_latency result JSON files")
    parser.add_argument("--name", required=True, help="merged result file stem")
    parser.add_argument("--out-dir", default=None, help="default: the first shard's folder")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    parser.add_argument(
        "--any-commit",
        action="store_true",
        help="join shards of different commits (check first that the diff between them "
        "leaves the measured path alone, and say so where the result is reported)",
    )
    args = parser.parse_args(argv)
    shards = [read_results(p) for p in args.shards]
    try:
        rows, meta = merge(shards, args.shards, any_commit=args.any_commit)
    except ValueError as exc:
        print(f"merge_latency: {exc}", file=sys.stderr)
        return 2
    out_dir = args.out_dir or str(Path(args.shards[0]).parent)
    path = write_results(args.name, rows, meta, out_dir)
    if args.plot:
        title = (
            f"Batch-1 RaLM latency, {rows[0]['model']}, {rows[0]['retriever']} over "
            f"{rows[0]['corpus_size']:,} docs, {meta['questions_timed']} questions "
            f"({len(shards)} shards), {rows[0]['machine']}"
        )
        plot_latency(rows, path.with_suffix(".png"), title)
    print(format_table(rows, TABLE_COLUMNS))
    print(f"wrote {path}")
    return 0 if meta["all_outputs_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
