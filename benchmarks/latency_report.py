"""Condense ``bench_latency`` runs into result rows, a text table and a PNG.

Input: one ``RunRecord`` per timed (backend, method, question) run, each holding the
``RequestTrace.summary()`` numbers and whether its token ids equal the baseline's. Output:
one row per (backend, method) with the mean latency, the speed-up against the baseline
(baseline mean / method mean), the oracle ceiling (baseline mean / oracle mean), the fraction
of that ceiling reached (oracle mean / method mean), ``outputs_identical`` (every question),
the mean time split (LM, retrieval, speculation, other), pooled speculation statistics and
the rounds taken against the fewest the run's own hits and misses allow (``fewest_rounds``);
each row also lists its per-question records. ``plot_latency`` draws speed-up bars and
stacked time-split bars per backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from benchmarks.common import percentile, save_png
from ralmspec_vllm.core.config import SpeculationConfig

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One timed answer: which question, which method, what its trace says."""

    backend: str
    method: str
    question_id: str
    dataset: str
    wall_time_s: float
    lm_time_s: float
    retrieval_time_s: float
    speculation_time_s: float
    other_time_s: float
    num_tokens: int
    steps: int
    retrieval_calls: int
    verifications: int
    speculation_hits: int
    speculation_misses: int
    strides: tuple[int, ...]
    rollbacks: int
    tokens_discarded: int
    lm_calls: int
    identical: bool
    """Token ids equal the baseline's for this question (baseline: trivially true)."""
    same_documents: bool
    """Per-step document ids equal the baseline's."""
    plain_steps: int = 0
    """Steps OS3 ran as plain retrieval (sync, stride 1)."""
    measured_plain_steps: int = 0
    """Of ``plain_steps``: those the measured costs chose (speculation measured slower)."""
    quiet_steps: int = 0
    """Of ``plain_steps``: the baseline's steps between two probes of a plain run."""
    routed_guesses: int = 0
    """Guesses ranked within the query's probed IVF lists (``route_guesses``)."""
    rerouted_guesses: int = 0
    """Of ``routed_guesses``: those routing changed (the exact best was unreachable)."""
    cache_peak: int = 0
    """The most documents the speculation cache held (a guess's scoring grows with it)."""
    lm_aborts: int = 0
    """LM calls aborted mid-step (a miss found while its step, or one ahead, generated)."""
    lm_wait_guess_s: float | None = None
    """The critical path (``RequestTrace.lm_wait_guess_s``): seconds with no LM call in
    flight while a guess ran; the next two split the rest of those seconds. ``None`` in
    records written before session 33 (a merged row averages the records that have it)."""
    lm_wait_retrieval_s: float | None = None
    lm_wait_other_s: float | None = None
    searches: tuple[tuple[int, float], ...] = ()
    """(queries, seconds) of every knowledge-base search: the verification cost b(s)."""
    scores: tuple[tuple[int, float], ...] = ()
    """(doc ids, seconds) of every retriever ``Score`` of the cache (BM25's speculation
    waits for it before each speculated step)."""
    fetches: tuple[tuple[int, float], ...] = ()
    """(doc ids, seconds) of every fetch of what the cache ranks by for documents new to it
    (dense: their vectors; BM25 scored here: their term weights), once per verification."""
    loop_lag_ms: tuple[tuple[str, float], ...] = ()
    """How late the event loop woke a sleeper during this run (p50, p99, max in ms;
    ``--loop-lag-ms``): long lags mean long GIL holds that in-process searches wait for."""
    doc_ids: tuple[int | None, ...] = ()
    """The baseline's document per step (other methods: empty; theirs equal it where
    ``same_documents``). How often a step repeats the one before is what a guess that needs
    no fresh query embedding (the last step's document) would score (``repeat_rate``)."""
    kb_phases: tuple[tuple[str, float], ...] = ()
    """Seconds inside the dense retriever during this run (``PhaseTimes``: searches,
    abandoned, scan_s, rank_s, vectors_s, documents_s, encode_s; for a circular scan also its
    walk's ``scan_*`` counters: chunks, rows, cohorts, abandoned, and seconds busy, in
    products and in threshold ops); the awaited ``searches`` minus encode, scan and rank is
    time spent waiting outside it (thread hand-off, a busy event loop)."""

    @classmethod
    def from_summary(
        cls,
        backend: str,
        method: str,
        question_id: str,
        dataset: str,
        summary: Mapping[str, Any],
        *,
        strides: Sequence[int],
        num_tokens: int,
        identical: bool,
        same_documents: bool,
        searches: Sequence[tuple[int, float]] = (),
        scores: Sequence[tuple[int, float]] = (),
        fetches: Sequence[tuple[int, float]] = (),
        kb_phases: Mapping[str, float] | None = None,
        loop_lag_ms: Mapping[str, float] | None = None,
        doc_ids: Sequence[int | None] = (),
    ) -> RunRecord:
        return cls(
            backend=backend,
            method=method,
            question_id=question_id,
            dataset=dataset,
            wall_time_s=summary["wall_time_s"],
            lm_time_s=summary["lm_time_s"],
            retrieval_time_s=summary["retrieval_time_s"],
            speculation_time_s=summary["speculation_time_s"],
            other_time_s=summary["other_time_s"],
            num_tokens=num_tokens,
            steps=summary["steps"],
            retrieval_calls=sum(summary["retrieval_calls"].values()),
            verifications=summary["verifications"],
            speculation_hits=summary["speculation_hits"],
            speculation_misses=summary["speculation_misses"],
            strides=tuple(strides),
            rollbacks=summary["rollbacks"],
            tokens_discarded=summary["tokens_discarded"],
            lm_calls=summary["lm_calls"],
            plain_steps=summary.get("plain_steps", 0),
            measured_plain_steps=summary.get("measured_plain_steps", 0),
            quiet_steps=summary.get("quiet_steps", 0),
            routed_guesses=summary.get("routed_guesses", 0),
            rerouted_guesses=summary.get("rerouted_guesses", 0),
            cache_peak=summary.get("cache_peak", 0),
            lm_aborts=summary.get("lm_aborts", 0),
            lm_wait_guess_s=summary.get("lm_wait_guess_s"),
            lm_wait_retrieval_s=summary.get("lm_wait_retrieval_s"),
            lm_wait_other_s=summary.get("lm_wait_other_s"),
            identical=identical,
            same_documents=same_documents,
            searches=tuple(searches),
            scores=tuple(scores),
            fetches=tuple(fetches),
            doc_ids=tuple(doc_ids),
            kb_phases=tuple((kb_phases or {}).items()),
            loop_lag_ms=tuple((loop_lag_ms or {}).items()),
        )

    def brief(self) -> dict[str, Any]:
        """The per-question record stored inside a row: every field but backend and method
        (``from_brief`` rebuilds the record), plus the mean stride."""
        out = asdict(self)
        del out["backend"], out["method"]
        out["strides"] = list(self.strides)
        out["doc_ids"] = list(self.doc_ids)
        out["searches"] = [[n, round(seconds, 6)] for n, seconds in self.searches]
        out["scores"] = [[n, round(seconds, 6)] for n, seconds in self.scores]
        out["fetches"] = [[n, round(seconds, 6)] for n, seconds in self.fetches]
        out["kb_phases"] = {name: round(value, 6) for name, value in self.kb_phases}
        out["loop_lag_ms"] = {name: round(value, 3) for name, value in self.loop_lag_ms}
        out["mean_stride"] = _mean(self.strides)
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = round(value, 4)
        return out

    @classmethod
    def from_brief(cls, backend: str, method: str, brief: Mapping[str, Any]) -> RunRecord:
        """The record a row's ``per_question`` entry was written from (``brief``)."""
        fields = {k: v for k, v in brief.items() if k in cls.__dataclass_fields__}
        if "strides" not in fields:
            raise ValueError("per-question record without strides (written before merging)")
        fields["strides"] = tuple(fields["strides"])
        fields["doc_ids"] = tuple(fields.get("doc_ids", ()))
        for name in ("searches", "scores", "fetches"):
            fields[name] = tuple((int(n), float(s)) for n, s in fields.get(name, ()))
        for name in ("kb_phases", "loop_lag_ms"):
            pairs = fields.get(name, {})
            fields[name] = tuple((str(key), float(value)) for key, value in pairs.items())
        return cls(backend=backend, method=method, **fields)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


INLINE = "@inline"
"""A RaLMSpec method's suffix (``PSA:overlap_depth=pipeline@inline``): its engine embeds a
guess's query on the event loop's thread (``RaLMEngine(encode_in_thread=False)``) instead of
in a worker thread, the shipped default. Dense, in process, local cache scoring only. At
batch 1 the LM waits for the guess either way; the thread's round trip is what it saves
(``benchmarks/gpu/probe_guess.py``). As a method, it runs paired with the others on every
question of one invocation, so the host's drift between runs does not enter the A/B."""


def speculation_spec(method: str) -> SpeculationConfig:
    """A RaLMSpec method's ``SpeculationConfig`` (``INLINE`` aside)."""
    return SpeculationConfig.parse(method.removesuffix(INLINE))


def encodes_inline(method: str) -> bool:
    return method.endswith(INLINE)


def max_stride(method: str) -> int | None:
    """The most steps one verification of ``method`` may hold (None: not speculative)."""
    if method in ("baseline", "oracle"):
        return None
    spec = speculation_spec(method)
    return spec.max_speculation_stride if spec.adaptive else int(spec.speculation_stride)


def fewest_rounds(record: RunRecord, stride: int) -> int:
    """The fewest verification rounds (plain retrieval steps included) that the run's own
    outcomes allow: every miss ends a round, and a round holds at most ``stride`` steps."""
    misses = record.speculation_misses
    steps = record.speculation_hits + misses + record.plain_steps
    return max(misses, -(-steps // stride))


def speedup_interval(
    records: Sequence[RunRecord], method: str, resamples: int = 2000, seed: int = 0
) -> list[float] | None:
    """95% bootstrap interval of ``method``'s speed-up over the baseline (total baseline time
    over total method time), resampling the questions both ran with their pairing kept:
    how far the question sample alone could move the ratio. It does not cover drift within
    a run (an LM that slows for a while), so a row whose interval holds 1.0 is not shown
    different from the baseline, and one whose interval excludes it is. ``None`` below 5
    paired questions."""
    return ratio_interval(records, "baseline", method, resamples, seed)


def ratio_interval(
    records: Sequence[RunRecord], over: str, method: str, resamples: int = 2000, seed: int = 0
) -> list[float] | None:
    """95% bootstrap interval of total ``over`` time over total ``method`` time, resampling
    the questions both ran with their pairing kept (``speedup_interval``; with ``over``
    the oracle: the fraction of the ceiling reached, ``oracle_fraction_ci95``). ``None``
    below 5 paired questions."""
    base = {r.question_id: r.wall_time_s for r in records if r.method == over}
    pairs = [
        (base[r.question_id], r.wall_time_s)
        for r in records
        if r.method == method and r.question_id in base
    ]
    return _bootstrap_ratio(pairs, resamples, seed)


def _bootstrap_ratio(
    pairs: Sequence[tuple[float, float]], resamples: int, seed: int
) -> list[float] | None:
    """95% interval of sum(first) / sum(second) over resampled pairs; ``None`` below 5."""
    if len(pairs) < 5:
        return None
    times = np.asarray(pairs, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(times), (resamples, len(times)))
    sums = times[picks].sum(axis=1)  # (resamples, 2): numerator, denominator
    ratios = np.sort(sums[:, 0] / np.maximum(sums[:, 1], 1e-12))
    low, high = ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]
    return [round(float(low), 3), round(float(high), 3)]


EQUAL_LM_MAX_CALLS = 1.1
"""``oracle_fraction_equal_lm`` is left out where a method made more than this many times
the oracle's LM calls: its extra calls (rollbacks) need not cost an oracle call each."""


def equal_lm_fraction(
    records: Sequence[RunRecord], method: str, resamples: int = 2000, seed: int = 0
) -> tuple[float | None, list[float] | None]:
    """The fraction of the ceiling with the method's LM running at the oracle's speed on
    each question, and its 95% bootstrap interval; (None, None) without an oracle, below 5
    paired questions, or past ``EQUAL_LM_MAX_CALLS``.

    A method's time on a question is its time with no LM call in flight (guesses, searches,
    waits: ``wall - lm``) plus its LM calls at the oracle's mean call on that question
    (``oracle lm / oracle calls * calls``). Both runs make the same calls where the method
    guesses right, yet a batch-1 step of a small model follows the host's speed, which
    moved by up to 2x between runs a second apart (H100, session 43: 0.47-1.01 s for the
    same 32 calls). That jitter widens the plain fraction's interval (81-102% over 31
    questions) and can flatter or sink its mean; this one measures what RaLMSpec adds
    around the LM. It also credits away an LM slowed by the method's own work (searches on
    cores vLLM needs), so it complements ``oracle_fraction``, which stays the measure."""
    oracle = {r.question_id: r for r in records if r.method == "oracle" and r.lm_calls > 0}
    runs = [r for r in records if r.method == method and r.question_id in oracle]
    if len(runs) < 5:
        return None, None
    calls = sum(r.lm_calls for r in runs) / sum(oracle[r.question_id].lm_calls for r in runs)
    if calls > EQUAL_LM_MAX_CALLS:
        return None, None
    pairs = []
    for run in runs:
        o = oracle[run.question_id]
        at_oracle_speed = run.wall_time_s - run.lm_time_s + o.lm_time_s * run.lm_calls / o.lm_calls
        pairs.append((o.wall_time_s, at_oracle_speed))
    value = _ratio(sum(o for o, _ in pairs), sum(m for _, m in pairs))
    return _round(value), _bootstrap_ratio(pairs, resamples, seed)


def summarize(
    records: Sequence[RunRecord], base: Mapping[str, Any], methods: Sequence[str]
) -> list[Row]:
    """One row per (backend, method) in ``methods`` order; ``base`` fields go in every row."""
    rows: list[Row] = []
    for backend in dict.fromkeys(r.backend for r in records):
        mine = [r for r in records if r.backend == backend]
        means = {m: _mean([r.wall_time_s for r in mine if r.method == m]) for m in methods}
        for method in methods:
            runs = [r for r in mine if r.method == method]
            if not runs:
                continue
            hits = sum(r.speculation_hits for r in runs)
            misses = sum(r.speculation_misses for r in runs)
            strides = [s for r in runs for s in r.strides]
            mean = means[method]
            equal_lm, equal_lm_ci = equal_lm_fraction(mine, method)
            row: Row = {
                **base,
                "retriever": backend,
                "method": method,
                "num_questions": len(runs),
                "mean_latency_s": _round(mean),
                "speedup_vs_baseline": _round(_ratio(means.get("baseline"), mean)),
                "speedup_ci95": speedup_interval(mine, method),
                "oracle_speedup": _round(_ratio(means.get("baseline"), means.get("oracle"))),
                "oracle_fraction": _round(_ratio(means.get("oracle"), mean)),
                "oracle_fraction_ci95": ratio_interval(mine, "oracle", method),
                "oracle_fraction_equal_lm": equal_lm,
                "oracle_fraction_equal_lm_ci95": equal_lm_ci,
                "outputs_identical": all(r.identical for r in runs),
                "documents_identical": all(r.same_documents for r in runs),
                "mismatched_questions": [r.question_id for r in runs if not r.identical],
            }
            for part in ("lm", "retrieval", "speculation", "other"):
                row[f"{part}_time_s"] = _round(_mean([getattr(r, f"{part}_time_s") for r in runs]))
            # the critical path: seconds an answer the LM waited, by what ran meanwhile
            waited = [r for r in runs if r.lm_wait_guess_s is not None]
            row["lm_wait_s"] = {
                part: _round(_mean([getattr(r, f"lm_wait_{part}_s") for r in waited]))
                for part in ("guess", "retrieval", "other")
            }
            row.update(
                speculation_accuracy=_round(_ratio(hits, hits + misses)),
                mean_stride=_round(_mean(strides)),
                mean_rollbacks=_round(_mean([r.rollbacks for r in runs])),
                mean_tokens_discarded=_round(_mean([r.tokens_discarded for r in runs])),
                mean_retrieval_calls=_round(_mean([r.retrieval_calls for r in runs])),
                mean_verifications=_round(_mean([r.verifications for r in runs])),
                mean_lm_calls=_round(_mean([r.lm_calls for r in runs])),
                mean_plain_steps=_round(_mean([r.plain_steps for r in runs])),
                mean_measured_plain_steps=_round(_mean([r.measured_plain_steps for r in runs])),
                mean_quiet_steps=_round(_mean([r.quiet_steps for r in runs])),
                mean_routed_guesses=_round(_mean([r.routed_guesses for r in runs])),
                mean_rerouted_guesses=_round(_mean([r.rerouted_guesses for r in runs])),
                mean_cache_peak=_round(_mean([r.cache_peak for r in runs])),
                mean_lm_aborts=_round(_mean([r.lm_aborts for r in runs])),
                **_rounds(runs, max_stride(method), _pipelined(method)),
                search_ms_by_queries=_search_ms(runs),
                score_ms=_calls_ms(runs, "scores"),
                fetch_ms=_calls_ms(runs, "fetches"),
                kb_phases_s=_kb_phases(runs),
                loop_lag_ms=_loop_lag(runs),
                lm_step_ms=lm_step_ms(runs),
                mean_tokens=_round(_mean([r.num_tokens for r in runs])),
                repeat_rate=repeat_rate(runs),
                per_question=[r.brief() for r in runs],
            )
            rows.append(row)
    return rows


STEADY_CALLS = 8
"""Answers of fewer LM calls are left out of ``lm_step_ms``."""


def lm_step_ms(runs: Sequence[RunRecord]) -> Row | None:
    """The spread of a question's mean LM call (``lm_time_s / lm_calls``, ms) over the
    row's questions of at least ``STEADY_CALLS`` calls (a shorter answer's mean is mostly
    its prompt's prefill): p10, p50, p90. A batch-1 step of a small model is CPU-bound in
    vLLM's scheduling, so it follows the host: session 34 saw one H100 host hold 14.6 ms
    through a run and another drift from 15 to ~26 ms mid-run. A wide spread says absolute
    times (and ratios between runs) moved with the host; the methods, interleaved per
    question, still compare."""
    ms = [1000 * r.lm_time_s / r.lm_calls for r in runs if r.lm_calls >= STEADY_CALLS]
    if not ms:
        return None
    return {f"p{q}": _round(percentile(ms, q), 2) for q in (10, 50, 90)}


def host_drift(rows: Sequence[Row], limit: float = 1.3) -> str | None:
    """A warning where the oracle's LM step (else the baseline's) spread over the questions
    by more than ``limit`` (p90 / p10); None otherwise, or where neither ran."""
    measured = {row["method"]: row for row in rows if row.get("lm_step_ms")}
    row = measured.get("oracle") or measured.get("baseline")
    if row is None:
        return None
    spread = row["lm_step_ms"]
    if not spread["p10"] or spread["p90"] / spread["p10"] <= limit:
        return None
    return (
        f"{row['retriever']}: the {row['method']}'s LM step ranged {spread['p10']:.1f}-"
        f"{spread['p90']:.1f} ms over the questions (p10-p90): the host's speed moved during "
        "the run, so compare methods within this run only"
    )


def repeat_rate(runs: Sequence[RunRecord]) -> float | None:
    """Of the steps after a question's first (over ``runs`` that recorded their documents:
    the baseline's), the fraction whose document is the step before's: the accuracy of a
    guess that takes the last step's document and so needs no query embedding."""
    pairs = [(a, b) for r in runs for a, b in zip(r.doc_ids, r.doc_ids[1:], strict=False)]
    return _round(sum(a == b for a, b in pairs) / len(pairs)) if pairs else None


def _pipelined(method: str) -> bool:
    if method in ("baseline", "oracle"):
        return False
    spec = speculation_spec(method)
    return spec.async_verification and spec.overlap_depth == "pipeline"


def _rounds(runs: Sequence[RunRecord], stride: int | None, pipelined: bool = False) -> Row:
    """Rounds taken (verifications + plain steps) vs the fewest the outcomes allow. A
    pipelined verification has no rounds (one search per step, overlapping): what it waits
    for serially is a search after each restart (the first, and one per miss), so its
    "rounds" are those restarts plus its plain steps."""
    if stride is None:
        return {"mean_rounds": None, "mean_fewest_rounds": None}
    if pipelined:
        taken = [1 + r.speculation_misses + r.plain_steps for r in runs]
    else:
        taken = [r.verifications + r.plain_steps for r in runs]
    return {
        "mean_rounds": _round(_mean(taken)),
        "mean_fewest_rounds": _round(_mean([fewest_rounds(r, stride) for r in runs])),
    }


def _loop_lag(runs: Sequence[RunRecord]) -> Row | None:
    """Event-loop lag over the row's runs: mean of their p50 and p99, the largest max."""
    lags = [dict(r.loop_lag_ms) for r in runs if r.loop_lag_ms]
    if not lags:
        return None
    return {
        "p50": _round(_mean([lag["p50"] for lag in lags]), 3),
        "p99": _round(_mean([lag["p99"] for lag in lags]), 3),
        "max": _round(max(lag["max"] for lag in lags), 3),
    }


_SEARCH_PHASES = ("encode_s", "scan_s", "rank_s")
"""The phases inside an awaited search (``PhaseTimes``)."""


def _kb_phases(runs: Sequence[RunRecord]) -> Row | None:
    """Per answer (means): the dense retriever's own seconds by phase, next to the awaited
    search seconds; ``search_wait_s`` is the difference (None where nothing was recorded)."""
    recorded = [dict(r.kb_phases) for r in runs if r.kb_phases]
    if not recorded:
        return None
    out: Row = {name: _round(_mean([p.get(name, 0.0) for p in recorded])) for name in recorded[0]}
    awaited = _mean([sum(s for _, s in r.searches) for r in runs if r.kb_phases])
    inside = _mean([sum(p.get(name, 0.0) for name in _SEARCH_PHASES) for p in recorded])
    out["awaited_search_s"] = _round(awaited)
    out["search_wait_s"] = _round((awaited or 0.0) - (inside or 0.0))
    return out


def _search_ms(runs: Sequence[RunRecord]) -> dict[str, Row]:
    """Per search size (queries in one call): how many calls and their mean and p50 ms."""
    by_size: dict[int, list[float]] = {}
    for run in runs:
        for queries, seconds in run.searches:
            by_size.setdefault(queries, []).append(seconds * 1000)
    return {
        str(n): {
            "calls": len(ms),
            "mean_ms": _round(_mean(ms), 2),
            "p50_ms": _round(sorted(ms)[len(ms) // 2], 2),
        }
        for n, ms in sorted(by_size.items())
    }


def _calls_ms(runs: Sequence[RunRecord], name: Literal["scores", "fetches"]) -> Row:
    """The cache's ``Score`` calls (``scores``) or fetches of new documents' vectors or
    term weights (``fetches``): how many, their mean and p50 ms, the mean ids per call."""
    calls = [(n, seconds * 1000) for run in runs for n, seconds in getattr(run, name)]
    if not calls:
        return {"calls": 0}
    ms = sorted(m for _, m in calls)
    return {
        "calls": len(calls),
        "mean_ms": _round(_mean(ms), 2),
        "p50_ms": _round(ms[len(ms) // 2], 2),
        "mean_ids": _round(_mean([n for n, _ in calls]), 1),
    }


TABLE_COLUMNS = (
    "retriever", "method", "mean_latency_s", "speedup_vs_baseline", "oracle_fraction",
    "oracle_fraction_equal_lm", "lm_time_s", "retrieval_time_s", "speculation_time_s",
    "other_time_s", "speculation_accuracy", "mean_stride", "mean_rollbacks", "mean_rounds",
    "mean_fewest_rounds", "outputs_identical",
)  # fmt: skip


def _label(method: str) -> str:
    """A method's axis label: its name, then one parameter per line (``PSA:k=v:k=v``)."""
    return "\n".join(method.split(":"))


def plot_latency(rows: Sequence[Row], path: Path, title: str) -> Path:
    """Per backend: speed-up vs baseline per method (left), mean time split (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r["retriever"] for r in rows))
    fig, axes = plt.subplots(len(backends), 2, figsize=(13, 4.2 * len(backends)), squeeze=False)
    parts = (("lm", "LM"), ("retrieval", "retrieval"), ("speculation", "cache"), ("other", "other"))
    for (ax_speed, ax_split), backend in zip(axes, backends, strict=True):
        mine = [r for r in rows if r["retriever"] == backend]
        names = [_label(r["method"]) for r in mine]
        speedups = [r["speedup_vs_baseline"] or 0.0 for r in mine]
        colors = ["tab:green" if r["outputs_identical"] else "tab:red" for r in mine]
        bars = ax_speed.bar(names, speedups, color=colors)
        ax_speed.bar_label(bars, fmt="%.2fx", fontsize=8)
        ax_speed.axhline(1.0, color="black", linewidth=0.8)
        ax_speed.set_ylabel("speed-up vs baseline")
        ax_speed.set_title(f"{backend}: speed-up (red = outputs differ)")
        bottom = [0.0] * len(mine)
        for key, label in parts:
            values = [r[f"{key}_time_s"] or 0.0 for r in mine]
            ax_split.bar(names, values, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax_split.plot(names, [r["mean_latency_s"] for r in mine], "k_", markersize=18,
                      label="wall (mean)")  # fmt: skip
        ax_split.set_ylabel("seconds per question (mean)")
        ax_split.set_title(f"{backend}: time split (async parts overlap)")
        ax_split.legend(fontsize=8)
        for ax in (ax_speed, ax_split):
            ax.tick_params(axis="x", labelsize=8)
            ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path)
    plt.close(fig)
    return path
