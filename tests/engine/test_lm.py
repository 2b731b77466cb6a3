"""VllmLanguageModel on the shared tiny-model engine: prefix reuse, chunk identity, batching.

Each test draws its prompts from its own seed so prefix-cache counts are not disturbed by
other tests using the same session engine.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from ralmspec_vllm.engine.lm import VllmLanguageModel

pytestmark = pytest.mark.vllm


def random_prompt(seed: int, length: int) -> list[int]:
    """Ordinary (non-special) token ids of SmolLM2's vocabulary."""
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(length)]


def expected_cached(lm: VllmLanguageModel, prompt_len: int, shared: int | None = None) -> int:
    """vLLM serves whole blocks of the shared prefix, and always recomputes the last token."""
    shared = prompt_len if shared is None else shared
    return (min(shared, prompt_len - 1) // lm.block_size) * lm.block_size


async def test_resubmission_is_served_from_prefix_cache(vllm_lm: VllmLanguageModel) -> None:
    prompt = random_prompt(1, 289)
    first = await vllm_lm.generate(prompt, 4, "resubmit")
    assert first.num_prompt_tokens == 289
    assert first.num_cached_tokens == 0
    assert len(first.token_ids) == 4

    again = await vllm_lm.generate(prompt + list(first.token_ids), 4, "resubmit")
    assert again.num_prompt_tokens == 293
    assert again.num_cached_tokens == expected_cached(vllm_lm, 293) == 288


async def test_chunks_give_the_tokens_of_one_long_generation(vllm_lm: VllmLanguageModel) -> None:
    prompt = random_prompt(2, 150)
    whole = await vllm_lm.generate(prompt, 12, "whole")
    assert len(whole.token_ids) == 12

    context = list(prompt)
    chunked: list[int] = []
    for i in range(3):
        chunk = await vllm_lm.generate(context, 4, f"chunk-{i}")
        assert chunk.num_cached_tokens == expected_cached(vllm_lm, len(context))
        chunked += chunk.token_ids
        context += chunk.token_ids
    assert chunked == list(whole.token_ids)


async def test_rollback_reuses_the_shared_full_blocks(vllm_lm: VllmLanguageModel) -> None:
    prompt = random_prompt(3, 60)
    out = await vllm_lm.generate(prompt, 12, "rollback")
    generated = list(out.token_ids)
    assert len(generated) == 12

    # Roll back into the middle of the prompt: blocks before position 50 are reused.
    other = random_prompt(30, 20)
    rolled = await vllm_lm.generate(prompt[:50] + other, 4, "rollback")
    assert rolled.num_cached_tokens == expected_cached(vllm_lm, 70, shared=50) == 32

    # Roll back into the generated tokens: their KV (a block filled during decoding) is kept.
    kept = prompt + generated[:8]
    diverged = [*kept, generated[8] + 1 if generated[8] < 48999 else 100]
    after = await vllm_lm.generate(diverged, 4, "rollback")
    assert after.num_cached_tokens == expected_cached(vllm_lm, len(diverged), shared=68) == 64


async def test_concurrent_requests_match_sequential_ones(vllm_lm: VllmLanguageModel) -> None:
    prompts = [random_prompt(100 + i, 20 + 37 * i) for i in range(8)]
    sequential = [await vllm_lm.generate(p, 16, f"seq-{i}") for i, p in enumerate(prompts)]
    concurrent = await asyncio.gather(
        *(vllm_lm.generate(p, 16, f"con-{i}") for i, p in enumerate(prompts))
    )
    assert [g.token_ids for g in concurrent] == [g.token_ids for g in sequential]
    assert all(len(g.token_ids) == 16 for g in concurrent)
    assert vllm_lm.in_flight() == 0


async def test_same_request_id_twice_at_once(vllm_lm: VllmLanguageModel) -> None:
    a, b = random_prompt(5, 40), random_prompt(6, 40)
    ga, gb = await asyncio.gather(vllm_lm.generate(a, 8, "dup"), vllm_lm.generate(b, 8, "dup"))
    alone = await vllm_lm.generate(b, 8, "other")
    assert gb.token_ids == alone.token_ids
    assert len(ga.token_ids) == 8


async def test_abort_stops_generation_early(vllm_lm: VllmLanguageModel) -> None:
    prompt = random_prompt(7, 30)
    budget = vllm_lm.max_model_len - len(prompt)
    task = asyncio.create_task(vllm_lm.generate(prompt, budget, "to-abort"))
    while vllm_lm.in_flight() == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    await vllm_lm.abort("to-abort")
    result = await asyncio.wait_for(task, timeout=60)
    assert not result.finished
    assert len(result.token_ids) < budget
    assert vllm_lm.in_flight() == 0
    await vllm_lm.abort("to-abort")  # aborting again is a no-op
    follow = await vllm_lm.generate(prompt, 4, "after-abort")
    assert len(follow.token_ids) == 4


async def test_cancelling_the_task_aborts_the_request(vllm_lm: VllmLanguageModel) -> None:
    prompt = random_prompt(8, 30)
    task = asyncio.create_task(vllm_lm.generate(prompt, 1500, "cancel-me"))
    while vllm_lm.in_flight() == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert vllm_lm.in_flight() == 0


async def test_stop_token_finishes_and_is_included(vllm_lm: VllmLanguageModel) -> None:
    prompt = random_prompt(9, 64)
    free = (await vllm_lm.generate(prompt, 12, "free")).token_ids
    stop_at = next(i for i in range(3, 12) if free[i] not in free[:i])
    stopping = vllm_lm.with_stop_token_ids([free[stop_at]])
    out = await stopping.generate(prompt, 12, "stops")
    assert out.token_ids == free[: stop_at + 1]
    assert out.finished
    past = await stopping.generate(prompt, 12, "ignores", ignore_eos=True)
    assert past.token_ids == free and not past.finished  # the stop token is treated like EOS
    await stopping.shutdown()  # a view: the shared engine keeps running
    assert len((await vllm_lm.generate(prompt, 2, "still-alive")).token_ids) == 2


async def test_chunk_is_clipped_to_the_context_window(vllm_lm: VllmLanguageModel) -> None:
    prompt = random_prompt(10, vllm_lm.max_model_len - 3)
    out = await vllm_lm.generate(prompt, 16, "near-limit")
    assert len(out.token_ids) == 3
    assert not out.finished


async def test_bad_requests_raise_value_error(vllm_lm: VllmLanguageModel) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        await vllm_lm.generate([5, 6, 7], 0, "bad")
    with pytest.raises(ValueError, match="prompt"):
        await vllm_lm.generate([], 4, "bad")
    with pytest.raises(ValueError, match="prompt"):
        await vllm_lm.generate([5] * vllm_lm.max_model_len, 4, "bad")


async def test_tokenizer_and_cache_stats(vllm_lm: VllmLanguageModel) -> None:
    tok = vllm_lm.tokenizer
    assert tok.eos_token_id == 2
    ids = tok.encode("The capital of France is", add_special_tokens=False)
    assert tok.decode(ids) == "The capital of France is"
    stats = vllm_lm.cache_stats
    assert stats.requests >= 1
    assert 0.0 <= stats.hit_rate <= 1.0
    assert vllm_lm.block_size == 32
    assert vllm_lm.config.dtype == "float32"
