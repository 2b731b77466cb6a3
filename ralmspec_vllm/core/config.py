"""Typed configuration of iterative RaLM (``RaLMConfig``) and of RaLMSpec (``SpeculationConfig``).

``RaLMConfig`` fixes *what* is generated (the baseline's semantics: retrieval stride, query
window, document cap, length limit); every mode must produce the same tokens under it.
``SpeculationConfig`` only changes *how fast*: speculation stride (or the OS3 scheduler),
prefetching, asynchronous verification, and the per-request speculation cache. ``PRESETS``
holds the paper's ablation rows (B, P, S, A, PS, SA, PA, PSA).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

from ralmspec_vllm.core.stop import StopCondition

Eviction = Literal["lru", "fifo"]
Mode = Literal["baseline", "ralmspec", "oracle"]
MODES: tuple[Mode, ...] = ("baseline", "ralmspec", "oracle")


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class RaLMConfig:
    """Iterative retrieval-augmented generation (In-Context RALM style), greedy."""

    retrieval_stride: int = 4
    """Tokens generated between two retrievals."""
    query_window: int = 32
    """The query is the decoded last ``query_window`` tokens of question + generated text."""
    max_doc_tokens: int = 256
    """Document tokens (title + text) kept in front of the prompt."""
    max_new_tokens: int = 128
    """Generation stops after this many tokens (or at EOS)."""
    separator: str = "\n\n"
    """Text between the document and the question (tokenized on its own)."""
    stop: StopCondition = field(default_factory=StopCondition)
    """Stop strings and stop token ids that end the answer early (per request)."""
    ignore_eos: bool = False
    """Generate past EOS, to ``max_new_tokens`` or a stop (per request; e.g. benchmarks)."""

    def __post_init__(self) -> None:
        _positive("retrieval_stride", self.retrieval_stride)
        _positive("query_window", self.query_window)
        _positive("max_doc_tokens", self.max_doc_tokens)
        _positive("max_new_tokens", self.max_new_tokens)
        if not isinstance(self.separator, str):
            raise ValueError(f"separator must be a string, got {self.separator!r}")
        if not isinstance(self.stop, StopCondition):
            raise ValueError(f"stop must be a StopCondition, got {self.stop!r}")


@dataclass(frozen=True, slots=True)
class SpeculationConfig:
    """RaLMSpec switches. The default is the plain row B (fixed stride 3, no P, S or A)."""

    speculation_stride: int | Literal["auto"] = 3
    """Retrieval points speculated per verification; ``"auto"`` turns on OS3 (S)."""
    prefetch_k: int = 1
    """Documents inserted into the cache per verified query (P when > 1; paper: 20)."""
    exact_k: int = 0
    """Not in the paper: how many of the ``prefetch_k`` documents must be the knowledge
    base's exact top ranks (at least 1: the verified top-1); the others are the best further
    documents the retriever's search came across (``Retriever.search``'s ``prefetch``).
    0: all of them (the paper's). An exact top-256 costs ~30% more than a top-20 on the
    21M-document CPU scan, whose top-20 already proposes ~200 near candidates."""
    async_verification: bool = False
    """A: speculate the next step while the batched verification is in flight."""
    overlap_depth: int | Literal["stride", "fill", "pipeline"] = 1
    """A: steps speculated ahead while a verification is in flight. 1 is the paper's (one
    step); ``"stride"`` (not in the paper) keeps speculating while the verification runs, up
    to the stride planned for the next round, so a round whose speculations all hold finds
    the next round already generated (pipelined verification: when a verification costs
    25 LM steps, the paper's overlap leaves the LM idle for 24 of them).

    ``"fill"`` (not in the paper) keeps speculating while the verification runs, up to
    ``max_speculation_stride`` steps ahead, and the next round verifies every step pending
    at once (at most ``max_speculation_stride``): the verifier never waits. Where a
    verification costs many LM steps and a few more queries cost little (the exact CPU scan
    at 21M: 0.25 s for one query, ~0.4 s for 8, 20-27 ms an LM step), the planned stride
    leaves the LM idle for most of each round and takes a round per ~6 steps.
    ``benchmarks/simulate_pipeline.py`` gives 2.40 s an answer against 2.69 s at stride 6
    there. A round that starts from nothing (the first, and the one after a rollback) is
    ``OptimalStrideScheduler.fill_restart`` steps (b(1) / 3a), or the fixed stride.

    ``"pipeline"`` (not in the paper) has no rounds: every speculated step is verified by
    its own search, sent the moment the step exists, with up to ``max_speculation_stride``
    (or the fixed stride) steps unverified at once; results settle in step order. Meant for
    a retriever whose searches overlap (``FlatRetriever(scan="circular")``), where a step's
    answer comes one scan after the step instead of after the round before it."""
    early_verification: bool = False
    """Not in the paper; ``overlap_depth="pipeline"`` only: a step's search is sent when its
    document is guessed, before the step is generated, instead of after. A hit then costs
    nothing (the search runs under the step's own LM work), and a miss found while the step
    is still generating aborts it at once: the wasted LM work runs in the search's shadow,
    so a miss costs about what a plain retrieval step does (search, then the step with the
    true document). Speculation therefore never loses to plain steps, and OS3's plain-step
    rule (``prefers_plain_step``) is skipped. Where a search is cheaper than an LM step
    (approximate dense, BM25), this is what hides retrieval behind generation."""
    plain_prefetch: bool = False
    """Not in the paper: whether OS3's plain steps still fill the cache with the prefetch
    (``prefetch_k`` hits: a second search beside the step where searches are cheap, see
    ``PREFETCH_BESIDE_RATIO``). ``False`` (the default since session 30): a plain step
    searches and inserts as the baseline does (the exact top-1 only), so the steps the rule
    runs plain cost what the baseline's do; the request's first step still prefetches, and
    so does every verification. ``True`` fills the cache faster while the rule runs plain,
    at a second search a step. Measured on an H100 (session 30, one run each, the same
    questions): IVF-Flat 1M 0.983x against 0.958x with the prefetch (LM 0.453 vs 0.468 s,
    the searches beside it slowing it); HNSW 1M 0.995x against 0.994x with half the
    searches (28 vs 55 an answer), which a shared retriever feels. Never changes an answer."""
    plain_probe_every: int = 1
    """Not in the paper: in a run of plain steps chosen by OS3 (not a hold), only every this
    many-th step, the run's first included, probes: it scores the cache's guess (OS3's
    evidence of the accuracy) and inserts its document into the cache. The steps between
    are the baseline's steps exactly (its search, then the step, nothing beside it); their
    search and LM times still feed OS3 and the measured costs. 1: every plain step probes.
    Larger values make a long plain run cost what the baseline's steps do (session 30: a
    plain step at 1M IVF cost ~0.4 ms more than a baseline step, 0.978x over 98 questions),
    at the price of slower evidence and a cache without the quiet steps' documents when
    speculation resumes. Never changes an answer."""
    route_guesses: bool | Literal["auto"] = "auto"
    """Not in the paper: over an IVF index (``AsyncRetriever.routing``), a guess ranks only
    the cached documents in the lists the query's search will read, so it names a document
    the search can return. The best cached document by the exact score often sits in a list
    the search skips: offline at 1M documents (1,024 lists, 16 probed, 470 guesses) that
    was 22 of the 33 wrong guesses, and ranking within the probed lists made every guess
    right whose answer was cached (accuracy 0.966 against 0.930; session 31,
    ``benchmarks/probe_routing.py``). The filler's near-duplicates make that common; over
    the 4,645 real passages alone (64 lists, 4 probed) 0.986 against 0.981.

    Finding the query's lists costs a product with every centroid on the step's critical
    path. At 21M documents (4,096 lists, 64 probed, H100, session 32, 68 questions) no
    guess changed (accuracy 0.930 either way) and that product made guesses 39 ms an answer
    dearer: 1.095x against 1.130x unrouted. ``"auto"`` (the default) routes while the
    guesses it would change are worth its cost (``cache.RoutingGate``: the share of
    guesses whose exact best is unreachable, times an LM step, against the product's
    measured time; sampled on 1 guess in 16 while off). ``True``: every guess; ``False``:
    none, and no lists are fetched. Other backends: no effect. Never changes an answer."""
    cache_capacity: int = 512
    """Documents held in one request's speculation cache."""
    score_recent: int | None = None
    """Not in the paper: rank only this many of the cache's most recently used documents
    when the retriever scores the cache (``RetrieverCacheScorer``, BM25's ``Score``), whose
    cost grows with the ids sent (5.3 ms for ~7,700 cached ids at 3M docs on 2 cores, on
    the step's critical path); ``None``: every cached document. Only the speculated
    document can change, never the answer."""
    eviction: Eviction = "lru"
    """``lru``: evict the document least recently inserted, re-verified or speculated;
    ``fifo``: evict the one inserted first."""
    window: int = 5
    """OS3: verifications over which the speculation accuracy gamma is estimated."""
    gamma_max: float = 0.6
    """OS3: cap on the estimated gamma (the paper's guard against a lucky window)."""
    gamma_confidence_z: float | None = 1.28
    """OS3, not in the paper: gamma may exceed ``gamma_max`` up to the Wilson lower bound,
    at this many standard errors (1.28: one-sided 90%), of the accuracy measured over the
    last ``gamma_evidence_window`` verifications; ``None``: the paper's cap only."""
    gamma_evidence_window: int = 20
    """OS3: verifications behind the lower bound (at least ``window``)."""
    max_speculation_stride: int = 16
    """OS3: largest stride the scheduler may choose (an exact CPU scan of 2-16 queries
    costs about the same, so longer rounds are free where the accuracy supports them)."""

    def __post_init__(self) -> None:
        if self.speculation_stride != "auto":
            _positive("speculation_stride", self.speculation_stride)  # type: ignore[arg-type]
        _positive("prefetch_k", self.prefetch_k)
        if isinstance(self.exact_k, bool) or not isinstance(self.exact_k, int) or self.exact_k < 0:
            raise ValueError(f"exact_k must be a non-negative integer, got {self.exact_k!r}")
        if not isinstance(self.async_verification, bool):
            raise ValueError(f"async_verification must be a bool, got {self.async_verification!r}")
        if self.overlap_depth not in ("stride", "fill", "pipeline"):
            _positive("overlap_depth", self.overlap_depth)  # type: ignore[arg-type]
        if not isinstance(self.early_verification, bool):
            raise ValueError(f"early_verification must be a bool, got {self.early_verification!r}")
        if self.early_verification and not (
            self.async_verification and self.overlap_depth == "pipeline"
        ):
            raise ValueError(
                "early_verification needs async_verification and overlap_depth='pipeline'"
            )
        _positive("plain_probe_every", self.plain_probe_every)
        if not isinstance(self.route_guesses, bool) and self.route_guesses != "auto":
            raise ValueError(f"route_guesses must be a bool or 'auto', got {self.route_guesses!r}")
        _positive("cache_capacity", self.cache_capacity)
        if self.score_recent is not None:
            _positive("score_recent", self.score_recent)
        if self.eviction not in ("lru", "fifo"):
            raise ValueError(f"eviction must be 'lru' or 'fifo', got {self.eviction!r}")
        _positive("window", self.window)
        if not 0.0 <= self.gamma_max < 1.0:
            raise ValueError(f"gamma_max must be in [0, 1), got {self.gamma_max!r}")
        z = self.gamma_confidence_z
        if z is not None and not (isinstance(z, int | float) and z > 0):
            raise ValueError(f"gamma_confidence_z must be positive or None, got {z!r}")
        if self.gamma_evidence_window < self.window:
            raise ValueError(
                f"gamma_evidence_window must be >= window ({self.window}), "
                f"got {self.gamma_evidence_window!r}"
            )
        _positive("max_speculation_stride", self.max_speculation_stride)

    @property
    def adaptive(self) -> bool:
        """S: the OS3 scheduler chooses the stride."""
        return self.speculation_stride == "auto"

    @property
    def search_k(self) -> int:
        """The exact top-k each retrieval asks for (``exact_k`` within ``prefetch_k``)."""
        return min(self.exact_k, self.prefetch_k) if self.exact_k else self.prefetch_k

    @property
    def search_prefetch(self) -> int:
        """The further hits each retrieval asks for after its exact top-k."""
        return self.prefetch_k - self.search_k

    @property
    def prefetch(self) -> bool:
        """P: more than the top-1 document is cached per verified query."""
        return self.prefetch_k > 1

    @property
    def label(self) -> str:
        """The paper's ablation name: B, P, S, A, PS, SA, PA or PSA."""
        letters = ("P" if self.prefetch else "") + ("S" if self.adaptive else "")
        letters += "A" if self.async_verification else ""
        return letters or "B"

    def describe(self) -> str:
        """This configuration as one word that ``parse`` reads back: its ``label``'s preset
        and the fields that differ from it (``PSA:overlap_depth=pipeline``), for logs."""
        base = PRESETS[self.label]
        changed = [f"{f.name}={_word(getattr(self, f.name))}" for f in fields(self)
                   if getattr(self, f.name) != getattr(base, f.name)]  # fmt: skip
        return ":".join([self.label, *changed])

    @classmethod
    def preset(cls, name: str, **overrides: object) -> SpeculationConfig:
        """One of the paper's ablation rows, optionally with fields overridden."""
        try:
            base = PRESETS[name.upper()]
        except KeyError:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}") from None
        return replace(base, **overrides)  # type: ignore[arg-type]

    @classmethod
    def parse(cls, text: str) -> SpeculationConfig:
        """A preset row with fields overridden, as one word (benchmark method names):
        ``PSA``, ``PSA:overlap_depth=1``, ``PSA:prefetch_k=64:max_speculation_stride=32``.
        Values read as bool (``true``/``false``), ``none``, int, float, else text."""
        name, *pairs = text.split(":")
        overrides: dict[str, object] = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
                raise ValueError(f"{text!r}: {pair!r} is not FIELD=VALUE of SpeculationConfig")
            overrides[key] = _literal(raw)
        return cls.preset(name, **overrides)


def _word(value: object) -> str:
    """``value`` as ``_literal`` reads it back."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return str(value)


def _literal(raw: str) -> object:
    """``raw`` as bool, None, int or float where it reads as one, else the text itself."""
    words: dict[str, object] = {"true": True, "false": False, "none": None}
    if raw.lower() in words:
        return words[raw.lower()]
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


PREFETCH_K = 20
"""The paper's prefetch size (256 was mostly worse)."""

PSA_PREFETCH_K = 256
"""Our PSA's prefetch size. The paper found 256 mostly worse, but its retriever paid for
every extra document; here a single-query top-256 search costs ~3% more than a top-20 one
(torch bf16 flat, 3M docs) and the speculation accuracy rises: 0.87 (k=20), 0.91 (64), 0.95
(256) on a 2-core CPU run of SmolLM2 over 3M docs (12 NQ/TriviaQA/WebQuestions questions,
``benchmarks/results/latency_cpu-2c_smollm2-135m_flat-torch-bf16-3m_prefetch.json``): 1.4
misses per answer instead of 3.3, so less than half the rounds that end in a rollback."""
PSA_EXACT_K = 20
"""Of our PSA's 256 prefetched documents, those that are the exact top ranks; the other 236
are the best further documents the search came across (``Retriever.search``'s
``prefetch``). Same invocation on an H200 host, 21M docs, exact bf16 CPU scan, SmolLM2, 62
NQ/TriviaQA/WebQuestions questions: 2.18x the baseline against 2.02x for an exact top-256,
at the same speculation accuracy (0.90), because a 4-query verification then costs what a
top-20 one does (309 against 436 ms;
``benchmarks/results/gpu/latency_gpu-nvidia-h200_smollm2-135m_flat-torch-cpu-bf16-21m_s7.json``)."""
PSA_CACHE_CAPACITY = 8192
"""Cached documents per request with ``PSA_PREFETCH_K`` (each verified query inserts up to
256; the dense cache's vectors grow on demand, at most 12 MiB a request at 384 dims)."""

PRESETS: dict[str, SpeculationConfig] = {
    "B": SpeculationConfig(),
    "P": SpeculationConfig(prefetch_k=PREFETCH_K),
    "S": SpeculationConfig(speculation_stride="auto"),
    "A": SpeculationConfig(async_verification=True),
    "PS": SpeculationConfig(prefetch_k=PREFETCH_K, speculation_stride="auto"),
    "SA": SpeculationConfig(speculation_stride="auto", async_verification=True),
    "PA": SpeculationConfig(prefetch_k=PREFETCH_K, async_verification=True),
    "PSA": SpeculationConfig(
        prefetch_k=PSA_PREFETCH_K,
        exact_k=PSA_EXACT_K,
        cache_capacity=PSA_CACHE_CAPACITY,
        speculation_stride="auto",
        async_verification=True,
        overlap_depth="stride",
    ),
    "PSA-PAPER": SpeculationConfig(
        prefetch_k=PREFETCH_K,
        speculation_stride="auto",
        async_verification=True,
        gamma_confidence_z=None,
        max_speculation_stride=10,
    ),
}
"""The paper's ablation rows; ``B`` is plain RaLMSpec with a fixed stride of 3. The S rows use
OS3 with the evidence bound on gamma; ``PSA`` also speculates ahead for the whole next round
while a verification is in flight (``overlap_depth="stride"``) and prefetches 256 documents
(``PSA_PREFETCH_K``), the top 20 of them exact (``PSA_EXACT_K``); ``PSA-PAPER`` is the
paper's PSA (top-20 prefetch, gamma capped at 0.6, stride at most 10, one overlapped step),
to measure what ours add."""
