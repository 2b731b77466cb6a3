"""Helpers shared by the core tests: engines over the fakes and the ablation matrix."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

from ralmspec_vllm.core.config import RaLMConfig, SpeculationConfig
from ralmspec_vllm.core.runner import RaLMEngine, RaLMResult
from ralmspec_vllm.core.trace import RequestTrace

from .fakes import FakeLM, FakeTokenizer, ScriptedRetriever

SHORT_QUESTION = "who wrote moby dick"
LONG_QUESTION = " ".join(f"word{i}" for i in range(50))  # longer than the 32-token window
STRIDES = (1, 2, 3, 8)


Overlap = tuple[bool, int | Literal["stride", "fill", "pipeline"], bool]
"""(async_verification, overlap_depth, early_verification)"""

OVERLAPS: tuple[Overlap, ...] = (
    (False, 1, False),
    (True, 1, False),  # the paper's A: one step overlaps the verification
    (True, "stride", False),  # ours: speculate ahead for the whole next round
    (True, "fill", False),  # ours: speculate ahead up to the largest stride, verify all of it
    (True, "pipeline", False),  # ours: no rounds, every step verified on its own as it appears
    (True, "pipeline", True),  # ours: the same, each search sent before its step is generated
)


def matrix(strides: tuple[int, ...] = STRIDES) -> Iterator[SpeculationConfig]:
    """s x P on/off x S on/off x A off/one step/the next round (with S on, s bounds the
    scheduler)."""
    for s in strides:
        for prefetch_k in (1, 20):
            for adaptive in (False, True):
                for asynchronous, depth, early in OVERLAPS:
                    yield SpeculationConfig(
                        speculation_stride="auto" if adaptive else s,
                        max_speculation_stride=s,
                        prefetch_k=prefetch_k,
                        async_verification=asynchronous,
                        overlap_depth=depth,
                        early_verification=early,
                    )


def forced(steps: set[int] | Callable[[int], bool], fresh: int = 100) -> Callable[[int], int]:
    """A script whose true top-1 is doc 0, except a fresh (never cached) doc at ``steps``:
    speculation must miss exactly there."""
    hit = steps if callable(steps) else steps.__contains__
    return lambda step: fresh + step if hit(step) else 0


async def baseline_and_freeze(
    engine: RaLMEngine, retriever: ScriptedRetriever, question: str
) -> RaLMResult:
    """The baseline run teaches the scripted retriever its queries, then freezes it."""
    result = await engine.generate(question, "baseline")
    retriever.freeze()
    return result


def make_engine(
    retriever: ScriptedRetriever,
    lm: FakeLM | None = None,
    config: RaLMConfig | None = None,
    tokenizer: FakeTokenizer | None = None,
) -> tuple[RaLMEngine, FakeLM]:
    lm = lm or FakeLM()
    return RaLMEngine(lm, tokenizer or FakeTokenizer(), retriever, config), lm


def describe(config: SpeculationConfig) -> str:
    s = config.max_speculation_stride if config.adaptive else config.speculation_stride
    deep = ""
    if config.async_verification and config.overlap_depth != 1:
        names = {"fill": ",fill", "pipeline": ",pipe"}
        deep = names.get(str(config.overlap_depth), ",ahead")
        deep += ",early" if config.early_verification else ""
    return f"{config.label}(s={s}{deep})"


def assert_speculated(trace: RequestTrace, config: SpeculationConfig) -> None:
    """RaLMSpec really used its cache: some speculation was right. OS3 may instead run plain
    retrieval steps wherever its measurements (pooled across an engine's requests) say a
    speculated step costs more than it saves: timing-dependent here, where the fakes' steps
    and searches take next to no time."""
    if config.adaptive:
        assert trace.speculation_hits > 0 or trace.plain_steps > 0
    else:
        assert trace.speculation_hits > 0
