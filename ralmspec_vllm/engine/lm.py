"""``LanguageModel`` on vLLM's v1 ``AsyncLLM``: greedy chunks from token-id prompts.

Data flow: the core calls :meth:`VllmLanguageModel.generate` with a full prompt (document +
question + tokens generated so far) and a chunk length; it becomes one vLLM request
(``TokensPrompt``, temperature 0, ``max_tokens`` = the chunk, final output only). vLLM's
prefix cache serves every full KV block of the prompt it has seen before, so resubmitting
``prompt + generated`` or rolling back to a shorter prompt recomputes only the tail; the
:class:`~ralmspec_vllm.core.lm.Generation` returned carries vLLM's per-request
``num_cached_tokens`` so callers (and tests) can check that. Many ``generate`` calls may be in
flight at once: vLLM batches them (continuous batching).

The engine core runs in a child process that vLLM starts (on CPU vLLM forces ``spawn``); the
front end (this object) lives in the caller's event loop. Create it inside a running loop with
:meth:`VllmLanguageModel.create` and close it with :meth:`shutdown`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralmspec_vllm.core.lm import Generation, Tokenizer
from ralmspec_vllm.engine.models import resolve_model
from ralmspec_vllm.engine.settings import EngineConfig
from ralmspec_vllm.engine.version import VllmApi, load_vllm

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Prefix-cache use summed over every finished ``generate`` call of one model."""

    requests: int
    prompt_tokens: int
    cached_tokens: int

    @property
    def hit_rate(self) -> float:
        """Fraction of prompt tokens served from the KV cache."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class VllmLanguageModel:
    """Greedy chunked generation on one in-process vLLM ``AsyncLLM`` engine."""

    def __init__(
        self,
        engine: Any,
        config: EngineConfig,
        api: VllmApi,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        """Wrap a started ``AsyncLLM``; use :meth:`create` rather than calling this."""
        self._engine = engine
        self._api = api
        self.config = config.resolved()
        self.stop_token_ids = tuple(stop_token_ids)
        self._ids = itertools.count()
        self._inflight: dict[str, set[str]] = {}
        self._requests = self._prompt_tokens = self._cached_tokens = 0
        self._closed = False
        self._owns_engine = True
        self.startup_s = 0.0

    @classmethod
    async def create(
        cls, config: EngineConfig, stop_token_ids: Sequence[int] = ()
    ) -> VllmLanguageModel:
        """Start an engine for ``config``; the event loop keeps running meanwhile.

        ``stop_token_ids`` are treated like EOS (generation stops after emitting one and
        ``finished`` is True), e.g. to make a random-weight test model stop.
        """
        api = await asyncio.to_thread(load_vllm)
        engine_args = config.to_engine_args()
        start = time.perf_counter()
        # The engine start (child process, weights, warm-up) takes 10-60 s on CPU: do it in a
        # thread. AsyncLLM supports construction outside the loop; its output handler then
        # starts on the first request, so start it now, in the loop, to see engine failures
        # early.
        engine = await asyncio.to_thread(api.AsyncLLM.from_engine_args, engine_args)
        engine._run_output_handler()
        lm = cls(engine, config, api, stop_token_ids)
        lm.startup_s = time.perf_counter() - start
        logger.info(
            "vLLM %s engine for %s started in %.1f s", api.version, config.model, lm.startup_s
        )
        return lm

    @classmethod
    async def from_pretrained(
        cls, model: str | Path, stop_token_ids: Sequence[int] = (), **overrides: Any
    ) -> VllmLanguageModel:
        """Start an engine for a built-in model name or a model directory."""
        path = await asyncio.to_thread(resolve_model, model)
        return await cls.create(EngineConfig(model=str(path), **overrides), stop_token_ids)

    def with_stop_token_ids(self, stop_token_ids: Sequence[int]) -> VllmLanguageModel:
        """A view on the same engine that also stops at ``stop_token_ids``.

        The view shares the in-flight request table (either can abort the other's calls)
        but counts its own :attr:`cache_stats`; its :meth:`shutdown` leaves the engine
        running.
        """
        view = VllmLanguageModel(self._engine, self.config, self._api, stop_token_ids)
        view._owns_engine = False
        view._ids = self._ids  # request ids stay unique, and abort() sees the view's calls
        view._inflight = self._inflight
        view.startup_s = self.startup_s
        return view

    @property
    def engine(self) -> Any:
        """The underlying vLLM ``AsyncLLM`` (for the OpenAI server and the scheduler hook)."""
        return self._engine

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's Hugging Face tokenizer (as loaded by vLLM)."""
        tokenizer: Tokenizer = self._engine.get_tokenizer()
        return tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self._engine.model_config.max_model_len)

    @property
    def block_size(self) -> int:
        """KV block size: prefix-cache hits are whole blocks of this many tokens."""
        return int(self._engine.vllm_config.cache_config.block_size)

    @property
    def cache_stats(self) -> CacheStats:
        return CacheStats(self._requests, self._prompt_tokens, self._cached_tokens)

    def _sampling_params(self, max_tokens: int, ignore_eos: bool) -> Any:
        return self._api.SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            ignore_eos=ignore_eos,
            stop_token_ids=None if ignore_eos else list(self.stop_token_ids) or None,
            output_kind=self._api.RequestOutputKind.FINAL_ONLY,
            detokenize=False,
        )

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        request_id: str,
        *,
        ignore_eos: bool = False,
    ) -> Generation:
        """Greedily generate up to ``max_tokens`` tokens after ``prompt_token_ids``
        (``ignore_eos``: past EOS and the ``stop_token_ids`` treated like it).

        ``max_tokens`` is clipped to the room left in ``max_model_len``. An aborted call
        returns the tokens generated so far with ``finished=False``.
        """
        if self._closed:
            raise RuntimeError("generate() after shutdown()")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        prompt = [int(t) for t in prompt_token_ids]
        room = self.max_model_len - len(prompt)
        if not prompt or room < 1:
            raise ValueError(
                f"prompt has {len(prompt)} tokens; it must have between 1 and "
                f"{self.max_model_len - 1} (max_model_len {self.max_model_len})"
            )
        vllm_id = f"{request_id}#{next(self._ids)}"
        self._inflight.setdefault(request_id, set()).add(vllm_id)
        start = time.perf_counter()
        final = None
        try:
            async for output in self._engine.generate(
                self._api.TokensPrompt(prompt_token_ids=prompt),
                self._sampling_params(min(max_tokens, room), ignore_eos),
                vllm_id,
            ):
                final = output
        finally:
            ids = self._inflight.get(request_id)
            if ids is not None:
                ids.discard(vllm_id)
                if not ids:
                    del self._inflight[request_id]
        elapsed = time.perf_counter() - start
        if final is None:
            raise RuntimeError(f"vLLM returned no output for request {vllm_id}")
        return self._to_generation(final, len(prompt), elapsed)

    def _to_generation(self, output: Any, num_prompt_tokens: int, elapsed: float) -> Generation:
        completion = output.outputs[0]
        cached = int(output.num_cached_tokens or 0)
        self._requests += 1
        self._prompt_tokens += num_prompt_tokens
        self._cached_tokens += cached
        return Generation(
            token_ids=tuple(completion.token_ids),
            finished=completion.finish_reason == "stop",
            num_prompt_tokens=num_prompt_tokens,
            num_cached_tokens=cached,
            lm_time_s=elapsed,
        )

    async def abort(self, request_id: str) -> None:
        """Abort every in-flight ``generate`` call made with ``request_id`` (no-op if none)."""
        vllm_ids = self._inflight.pop(request_id, set())
        if vllm_ids:
            await self._engine.abort(sorted(vllm_ids))

    def in_flight(self) -> int:
        """Number of ``generate`` calls currently running."""
        return sum(len(ids) for ids in self._inflight.values())

    async def shutdown(self, timeout_s: float | None = None) -> None:
        """Stop the engine and its child process (idempotent).

        vLLM waits ``timeout_s`` (default 5 s) for the engine process to exit, then kills it;
        in 0.26 the process usually spends that time in a final ``gc.collect()``.
        """
        if self._closed:
            return
        self._closed = True
        if not self._owns_engine:
            return
        self._engine.shutdown(timeout=timeout_s)
        logger.info("vLLM engine for %s shut down", self.config.model)
