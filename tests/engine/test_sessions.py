"""The scheduler hook (``engine.scheduler``) through ``SessionLanguageModel`` on real vLLM.

One engine for this module: the tiny random-weight Llama with the hook and a small KV cache
(128 blocks of 32 tokens), so that paused sessions can fill it. The same engine serves
resubmitted requests (``base``: the hook leaves them alone), which are the reference.
Session groups follow the core's request-id scheme (``<group>#<n>``). Every test uses
prompts from its own seed so prefix-cache counts are not disturbed by other tests.

A second engine runs the hook under *async scheduling* (``RaLMAsyncScheduler``), vLLM's
default on GPUs: vLLM's CPU platform turns it off, so that engine's config is built with the
platform's override undone (vLLM's uniprocess executor supports it on CPU).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from core.fakes import ScriptedRetriever
from core.world import forced

from ralmspec_vllm.core.config import RaLMConfig, SpeculationConfig
from ralmspec_vllm.core.runner import RaLMEngine
from ralmspec_vllm.engine.lm import VllmLanguageModel
from ralmspec_vllm.engine.sessions import SessionConfig, SessionLanguageModel
from ralmspec_vllm.engine.settings import EngineConfig

pytestmark = pytest.mark.vllm

NUM_BLOCKS = 128
BLOCK = 32


def random_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(length)]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def hooked(tiny_model_dir: Path) -> AsyncIterator[SessionLanguageModel]:
    config = EngineConfig(
        model=str(tiny_model_dir), seed=0, extra={"num_gpu_blocks_override": NUM_BLOCKS}
    )
    lm = await SessionLanguageModel.create(config, sessions=SessionConfig(max_sessions=16))
    assert lm.block_size == BLOCK
    try:
        yield lm
    finally:
        await lm.shutdown()


@pytest.fixture
def base(hooked: SessionLanguageModel) -> VllmLanguageModel:
    return hooked.base


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def async_hooked(tiny_model_dir: Path) -> AsyncIterator[SessionLanguageModel]:
    """The hook on an engine with async scheduling (one step of lookahead, as on GPUs)."""
    from vllm.platforms.cpu import CpuPlatform

    cpu_defaults = CpuPlatform.check_and_update_config

    def keep_async_scheduling(cls: type, vllm_config: Any) -> None:
        cpu_defaults(vllm_config)
        vllm_config.scheduler_config.async_scheduling = True

    config = EngineConfig(
        model=str(tiny_model_dir), seed=0, extra={"num_gpu_blocks_override": NUM_BLOCKS}
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CpuPlatform, "check_and_update_config", classmethod(keep_async_scheduling))
        lm = await SessionLanguageModel.create(config, sessions=SessionConfig(max_sessions=16))
    assert lm.engine.vllm_config.scheduler_config.async_scheduling
    try:
        yield lm
    finally:
        await lm.shutdown(30)


async def test_continuation_matches_one_generation_and_reuses_all_kv(
    hooked: SessionLanguageModel, base: VllmLanguageModel
) -> None:
    prompt = random_prompt(1, 70)
    whole = await base.generate(prompt, 12, "whole")
    before = hooked.stats
    context = list(prompt)
    chunks: list[int] = []
    for i in range(3):
        chunk = await hooked.generate(context, 4, f"cont#{i}")
        if i:
            # Everything but the re-sent last token is the paused sequence's own KV; a
            # resubmission would recompute the partial last block.
            assert chunk.num_cached_tokens == len(context) - 1
        chunks += chunk.token_ids
        context += chunk.token_ids
    assert chunks == list(whole.token_ids)
    assert hooked.stats.opened == before.opened + 1
    assert hooked.stats.resumed == before.resumed + 2
    resubmitted = await base.generate(context, 4, "resubmitted")
    assert resubmitted.num_cached_tokens == (len(context) - 1) // BLOCK * BLOCK
    await hooked.release("cont")
    assert hooked.open_sessions == 0


@pytest.mark.parametrize(("keep", "cached"), [(75, 75), (50, 32)])
async def test_rewind_then_other_tokens_match_a_fresh_request(
    hooked: SessionLanguageModel, base: VllmLanguageModel, keep: int, cached: int
) -> None:
    """keep=75 ends in the never-hashed tail block (its KV is kept up to 75); keep=50 ends
    inside a full, hashed block, which must be dropped (KV kept up to 32)."""
    prompt = random_prompt(2 + keep, 70)
    first = await hooked.generate(prompt, 12, f"rew{keep}#1")
    seq = prompt + list(first.token_ids)  # the session holds KV for seq[:81]
    new_prompt = seq[:keep] + random_prompt(300 + keep, 9)
    rewound_before = hooked.stats.rewound
    again = await hooked.generate(new_prompt, 8, f"rew{keep}#2")
    assert hooked.stats.rewound == rewound_before + 1
    assert again.num_cached_tokens == cached
    fresh = await base.generate(new_prompt, 8, f"fresh{keep}")
    assert again.token_ids == fresh.token_ids
    await hooked.release(f"rew{keep}")


async def test_rewind_never_rewrites_a_hashed_block(
    hooked: SessionLanguageModel, base: VllmLanguageModel
) -> None:
    """Stale-hash hazard: rewind into a full, hashed block and write other tokens there.
    A new request with the OLD tokens then hits that block's hash in the prefix cache and
    must still get the old output (it would not if the block had been overwritten)."""
    old = random_prompt(4, 100)  # blocks 0-2 full and hashed after the first chunk
    first = await hooked.generate(old, 8, "stale#1")
    other = old[:80] + random_prompt(40, 30)  # diverges inside block 2 (tokens 64..95)
    await hooked.generate(other, 8, "stale#2")
    await hooked.generate(other + random_prompt(41, 20), 4, "stale#3")
    check = await base.generate(old, 8, "stale-check")
    assert check.num_cached_tokens == 96  # the old block 2 was served by its hash
    assert check.token_ids == first.token_ids
    await hooked.release("stale")


async def test_abort_ends_the_chunk_and_its_session(hooked: SessionLanguageModel) -> None:
    prompt = random_prompt(5, 40)
    await hooked.generate(prompt, 4, "ab#1")
    assert hooked.open_sessions == 1
    task = asyncio.create_task(hooked.generate(prompt + [7] * 3, 1500, "ab#2"))  # resumes
    while hooked.in_flight() == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    await hooked.abort("ab#2")
    result = await asyncio.wait_for(task, timeout=60)
    assert not result.finished
    assert len(result.token_ids) < 1500
    assert hooked.in_flight() == 0
    assert hooked.open_sessions == 0
    follow = await hooked.generate(prompt, 4, "ab#3")
    assert len(follow.token_ids) == 4
    await hooked.release("ab")


async def test_paused_sessions_are_spilled_under_kv_pressure(
    hooked: SessionLanguageModel, base: VllmLanguageModel
) -> None:
    """Paused sessions holding most of the KV cache must not block a request that needs it:
    the hook spills them, and they still resume with the right tokens."""
    prompts = [random_prompt(600 + g, 400) for g in range(8)]  # 13 blocks each, 104 in all
    firsts = [await hooked.generate(p, 4, f"press{g}#1") for g, p in enumerate(prompts)]
    assert hooked.open_sessions == 8
    big = random_prompt(700, 1500)  # 47 blocks: more than are free
    out = await asyncio.wait_for(base.generate(big, 4, "big"), timeout=120)
    assert len(out.token_ids) == 4
    for g, (p, first) in enumerate(zip(prompts, firsts, strict=True)):
        context = p + list(first.token_ids)
        resumed = await hooked.generate(context, 4, f"press{g}#2")
        reference = await base.generate(context, 4, f"press-ref{g}")
        assert resumed.token_ids == reference.token_ids
        await hooked.release(f"press{g}")


CONFIG = RaLMConfig(max_new_tokens=30)
CONFIGS = [
    SpeculationConfig(speculation_stride=3),
    SpeculationConfig(speculation_stride=2, prefetch_k=20),
    SpeculationConfig(speculation_stride=1, async_verification=True),
    SpeculationConfig.preset("PSA", max_speculation_stride=8),
]


async def test_ralm_identity_with_forced_rollbacks(
    hooked: SessionLanguageModel, base: VllmLanguageModel
) -> None:
    retriever = ScriptedRetriever(forced(lambda step: step % 3 == 2), doc_length=40)
    question = "who wrote the novel about the white whale"
    reference = RaLMEngine(base, base.tokenizer, retriever, CONFIG)
    expected = await reference.generate(question, "baseline")
    retriever.freeze()
    engine = RaLMEngine(hooked, base.tokenizer, retriever, CONFIG)
    baseline = await engine.generate(question, "baseline")
    assert baseline.token_ids == expected.token_ids
    before = hooked.stats
    cached = 0
    for spec in CONFIGS:
        result = await engine.generate(question, "ralmspec", speculation=spec)
        assert result.token_ids == expected.token_ids, spec.label
        if spec.speculation_stride != "auto":  # OS3 may take plain (unspeculated) steps
            assert result.trace.rollbacks >= 2
        assert hooked.open_sessions == 0  # released when the request ended
        cached += result.trace.num_cached_tokens
        resubmitted = await reference.generate(question, "ralmspec", speculation=spec)
        assert resubmitted.token_ids == expected.token_ids
        cached -= resubmitted.trace.num_cached_tokens
    assert cached > 0  # the sessions recomputed less than resubmission
    assert hooked.stats.resumed > before.resumed
    assert hooked.stats.rewound > before.rewound  # rollbacks resumed an earlier session


def test_lm_path_selects_the_hook(tiny_model_dir: Path) -> None:
    from ralmspec_vllm.engine.sessions import group_of
    from ralmspec_vllm.engine.settings import RALM_SCHEDULER_CLS

    sessions = EngineConfig(model=str(tiny_model_dir), lm_path="sessions")
    assert sessions.engine_kwargs()["scheduler_cls"] == RALM_SCHEDULER_CLS
    assert "scheduler_cls" not in EngineConfig(model=str(tiny_model_dir)).engine_kwargs()
    with pytest.raises(ValueError, match="lm_path"):
        EngineConfig(model="m", lm_path="streaming")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheduler_cls"):
        EngineConfig(model="m", lm_path="sessions", scheduler_cls="x.Y")
    assert group_of("ralm-3#12") == "ralm-3"
    assert group_of("a#b#2") == "a#b"


async def test_stop_token_finishes_and_closes_the_session(
    hooked: SessionLanguageModel, base: VllmLanguageModel
) -> None:
    prompt = random_prompt(9, 64)
    free = (await base.generate(prompt, 12, "free")).token_ids
    stop_at = next(i for i in range(3, 12) if free[i] not in free[:i])
    stopping = hooked.with_stop_token_ids([free[stop_at]])
    first = await stopping.generate(prompt, 2, "stop#1")
    out = await stopping.generate(prompt + list(first.token_ids), 12, "stop#2")
    assert list(first.token_ids) + list(out.token_ids) == list(free[: stop_at + 1])
    assert out.finished
    assert stopping.open_sessions == 0  # a chunk that ended with EOS closes its session
    # ignore_eos is set per chunk: a resumed session runs past the token it stopped at before
    first = await stopping.generate(prompt, 2, "past#1", ignore_eos=True)
    out = await stopping.generate(prompt + list(first.token_ids), 10, "past#2", ignore_eos=True)
    assert list(first.token_ids) + list(out.token_ids) == list(free) and not out.finished
    assert stopping.open_sessions == 1
    await stopping.release("past")
    await stopping.shutdown()  # a view: the engine keeps running
    assert len((await hooked.generate(prompt, 2, "alive#1")).token_ids) == 2
    await hooked.release("alive")


async def test_async_scheduling_stop_one_token_before_the_limit(
    async_hooked: SessionLanguageModel,
) -> None:
    """Async scheduling: when a chunk stops on a stop token, its next step is already in
    flight. With the stop one token before ``max_tokens``, that stale step used to reach
    the limit: its token leaked into the chunk (which then looked length-capped, so RaLM
    went on past the stop) and the session was paused twice. Once closed, vLLM counted one
    unfinished request too few and never scheduled a lone request again (the GPU hang)."""
    lm = async_hooked
    prompt = random_prompt(11, 64)
    free = (await lm.base.generate(prompt, 12, "async-free")).token_ids
    stop_at = next(i for i in range(3, 11) if free[i] not in free[:i])
    stopping = lm.with_stop_token_ids([free[stop_at]])
    out = await asyncio.wait_for(stopping.generate(prompt, stop_at + 2, "astop#1"), 60)
    assert list(out.token_ids) == list(free[: stop_at + 1])
    assert out.finished
    await stopping.shutdown()  # closes the session if it is still open
    for g in range(2):  # each request alone in the engine: a new session, then a resume
        context = random_prompt(12 + g, 50)
        first = await asyncio.wait_for(lm.generate(context, 4, f"alone{g}#1"), 60)
        context += first.token_ids
        resumed = await asyncio.wait_for(lm.generate(context, 4, f"alone{g}#2"), 60)
        reference = await asyncio.wait_for(lm.base.generate(context, 4, f"alone-ref{g}"), 60)
        assert resumed.token_ids == reference.token_ids
        await lm.release(f"alone{g}")


async def test_async_scheduling_concurrent_ralm_requests_match_the_baseline(
    async_hooked: SessionLanguageModel,
) -> None:
    """Two RaLM requests at once on the async-scheduling hook (sessions paused, resumed and
    rewound side by side) give the resubmission baseline's tokens."""
    lm = async_hooked
    retriever = ScriptedRetriever(forced(lambda step: step % 3 == 2), doc_length=40)
    questions = ["who wrote the novel about the white whale", "where do the whales sing"]
    reference = RaLMEngine(lm.base, lm.tokenizer, retriever, CONFIG)
    expected = [await reference.generate(q, "baseline") for q in questions]
    retriever.freeze()
    engine = RaLMEngine(lm, lm.tokenizer, retriever, CONFIG)
    before = lm.stats
    for spec in CONFIGS[:2]:
        runs = [engine.generate(q, "ralmspec", speculation=spec) for q in questions]
        results = await asyncio.wait_for(asyncio.gather(*runs), 120)
        for result, want in zip(results, expected, strict=True):
            assert result.token_ids == want.token_ids, spec.label
        assert sum(r.trace.rollbacks for r in results) >= 2
    assert lm.open_sessions == 0
    assert lm.stats.rewound > before.rewound
