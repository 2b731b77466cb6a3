"""``LanguageModel`` on paused vLLM sessions: resume, rewind or open one per chunk.

The alternative to resubmitting every retrieval step as a new request (``lm.py``). Each LM
call of the core is one *chunk* of a vLLM streaming-input session (``AsyncLLM.generate`` fed
by an async generator); after its ``max_tokens`` the session pauses in the engine with its KV
blocks held. The scheduler hook (``scheduler.py``, required) lets a resume keep any prefix
of the session's tokens.

Data flow of :meth:`SessionLanguageModel.generate` (prompt, max_tokens, request id):

1. The *group* is the RaLM request: the request id without its ``#<n>`` call suffix
   (``core/request.py`` names LM calls ``<ralm id>#<n>``).
2. Among the group's idle sessions, take the one whose KV tokens share the longest prefix
   with the prompt (at most ``len(prompt) - 1``: the last prompt token is always computed
   to sample from). If that prefix is at least ``min_reuse_tokens``, resume it with
   ``ralm_keep`` = the prefix and the rest of the prompt as the chunk; otherwise open a
   new session (vLLM's prefix cache serves what it can, as for resubmission).
3. Collect the chunk's tokens. A session's KV tokens are its prompt plus all but the last
   sampled token (vLLM never computes that one's KV); a chunk that ended any other way
   than by ``max_tokens`` (EOS, abort, error) closes its session.

Bounds: at most ``max_sessions_per_group`` sessions per group and ``max_sessions`` in all
(least recently used idle ones are closed). Paused sessions hold engine request slots
(``max_num_seqs``) and KV blocks; under KV pressure the scheduler hook spills their KV
(see ``scheduler.py``), so they can slow a resume but never deadlock the cache.
:meth:`release` closes a group's sessions when its RaLM request ends (``RaLMEngine`` calls
it when the LM has it); :meth:`abort` ends the session serving an in-flight chunk.
:func:`create_language_model` starts the LM that ``EngineConfig.lm_path`` asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ralmspec_vllm import metrics
from ralmspec_vllm.core.lm import Generation, Tokenizer
from ralmspec_vllm.engine.lm import CacheStats, VllmLanguageModel
from ralmspec_vllm.engine.settings import (
    RALM_KEEP_KEY,
    RALM_SCHEDULER_CLS,
    RALM_SESSION_KEY,
    EngineConfig,
)

logger = logging.getLogger(__name__)

_END = object()
"""Put on a session's output queue when its vLLM stream has ended."""


@dataclass(frozen=True)
class SessionConfig:
    """Bounds and reuse policy of :class:`SessionLanguageModel`."""

    max_sessions_per_group: int = 2
    """Sessions kept per RaLM request (2: the current one and the one before a document
    change, which a rollback often returns to)."""
    max_sessions: int = 32
    """Sessions in all; keep it below the engine's ``max_num_seqs`` (paused sessions hold
    request slots)."""
    min_reuse_tokens: int | None = None
    """Shortest shared prefix worth resuming a session for; default: one KV block."""

    def __post_init__(self) -> None:
        if self.max_sessions_per_group < 1:
            raise ValueError(
                f"max_sessions_per_group must be positive, got {self.max_sessions_per_group}"
            )
        if self.max_sessions < self.max_sessions_per_group:
            raise ValueError(
                f"max_sessions must be at least max_sessions_per_group, got {self.max_sessions}"
            )
        if self.min_reuse_tokens is not None and self.min_reuse_tokens < 1:
            raise ValueError(f"min_reuse_tokens must be positive, got {self.min_reuse_tokens}")


@dataclass(frozen=True, slots=True)
class SessionStats:
    """What the sessions did, summed over every chunk."""

    opened: int
    resumed: int
    rewound: int
    """Resumes that dropped tokens of the session (rollbacks)."""
    closed: int


class _Session:
    """One vLLM streaming-input request and what the front end knows of it."""

    def __init__(self, session_id: str, group: str) -> None:
        self.id = session_id
        self.group = group
        self.tokens: list[int] = []
        """Tokens whose KV the engine holds for this session."""
        self.inputs: asyncio.Queue[Any] = asyncio.Queue()
        self.outputs: asyncio.Queue[Any] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.busy_with: str | None = None
        """The core's request id of the chunk in flight, if any."""
        self.alive = True

    async def input_stream(self) -> AsyncGenerator[Any, None]:
        while (chunk := await self.inputs.get()) is not None:
            yield chunk


def group_of(request_id: str) -> str:
    """The RaLM request an LM request id belongs to (``<ralm id>#<n>`` -> ``<ralm id>``)."""
    return request_id.rsplit("#", 1)[0]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class SessionLanguageModel:
    """Greedy chunked generation on resumable sessions of a ``VllmLanguageModel``'s engine.

    The engine must run the scheduler hook (``EngineConfig.lm_path="sessions"`` sets it).
    """

    def __init__(self, base: VllmLanguageModel, config: SessionConfig | None = None) -> None:
        """Sessions on ``base``'s engine, which must run the hook (``base`` stays usable for
        resubmission: the hook leaves other requests alone)."""
        scheduler = base.engine.vllm_config.scheduler_config.scheduler_cls
        if scheduler != RALM_SCHEDULER_CLS:
            raise ValueError(f"the engine's scheduler {scheduler!r} is not the RaLM hook")
        self.base = base
        self.config = config or SessionConfig()
        self.min_reuse = self.config.min_reuse_tokens or base.block_size
        self._api = base._api
        self._ids = itertools.count()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        """Open sessions, least recently used first."""
        self._inflight: dict[str, _Session] = {}
        self._opened = self._resumed = self._rewound = self._closed_count = 0
        self._requests = self._prompt_tokens = self._cached_tokens = 0

    @classmethod
    async def create(
        cls,
        config: EngineConfig,
        stop_token_ids: Sequence[int] = (),
        sessions: SessionConfig | None = None,
    ) -> SessionLanguageModel:
        """Start an engine with the scheduler hook and wrap it."""
        base = await VllmLanguageModel.create(replace(config, lm_path="sessions"), stop_token_ids)
        return cls(base, sessions)

    # -- the LanguageModel protocol --------------------------------------------------------

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        request_id: str,
        *,
        ignore_eos: bool = False,
    ) -> Generation:
        """Greedily generate up to ``max_tokens`` tokens after ``prompt_token_ids``
        (``ignore_eos``: past EOS; set per chunk)."""
        prompt = [int(t) for t in prompt_token_ids]
        limit = self.base.max_model_len
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if not prompt or len(prompt) >= limit:
            raise ValueError(
                f"prompt has {len(prompt)} tokens; it must have between 1 and {limit - 1} "
                f"(max_model_len {limit})"
            )
        max_tokens = min(max_tokens, limit - len(prompt))
        start = time.perf_counter()
        session, keep = self._choose(group_of(request_id), prompt)
        if session is None:
            session = await self._open(group_of(request_id), prompt, max_tokens, ignore_eos)
        else:
            self._resume(session, prompt, keep, max_tokens, ignore_eos)
        session.busy_with = request_id
        self._inflight[request_id] = session
        try:
            tokens, reason, cached = await self._collect(session)
        except BaseException:
            await self._close(session)
            raise
        finally:
            self._inflight.pop(request_id, None)
            session.busy_with = None
        if reason == "length" and session.alive:
            session.tokens = prompt + tokens[:-1]
        else:
            await self._close(session)
        self._requests += 1
        self._prompt_tokens += len(prompt)
        self._cached_tokens += cached
        return Generation(
            token_ids=tuple(tokens),
            finished=reason == "stop",
            num_prompt_tokens=len(prompt),
            num_cached_tokens=cached,
            lm_time_s=time.perf_counter() - start,
        )

    async def abort(self, request_id: str) -> None:
        """End the session serving ``request_id``'s chunk (no-op if none is in flight)."""
        session = self._inflight.pop(request_id, None)
        if session is not None:
            await self._close(session)

    async def release(self, group: str) -> None:
        """Close every session of RaLM request ``group`` (call when the request ends)."""
        for session in [s for s in self._sessions.values() if s.group == group]:
            await self._close(session)

    async def close_all(self) -> None:
        for session in list(self._sessions.values()):
            await self._close(session)

    # -- choosing and feeding sessions ------------------------------------------------------

    def _choose(self, group: str, prompt: list[int]) -> tuple[_Session | None, int]:
        best, best_keep = None, -1
        for session in self._sessions.values():
            if session.group != group or session.busy_with is not None or not session.alive:
                continue
            keep = min(common_prefix(session.tokens, prompt), len(prompt) - 1)
            if keep > best_keep:
                best, best_keep = session, keep
        if best is None or best_keep < self.min_reuse:
            return None, 0
        return best, best_keep

    def _params(self, max_tokens: int, keep: int | None, ignore_eos: bool) -> Any:
        extra: dict[str, Any] = {RALM_SESSION_KEY: True}
        if keep is not None:
            extra[RALM_KEEP_KEY] = keep
        stop = None if ignore_eos else list(self.base.stop_token_ids) or None
        return self._api.SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            ignore_eos=ignore_eos,
            stop_token_ids=stop,
            output_kind=self._api.RequestOutputKind.DELTA,
            detokenize=False,
            extra_args=extra,
        )

    def _chunk(self, tokens: list[int], max_tokens: int, keep: int | None, ignore_eos: bool) -> Any:
        prompt = self._api.TokensPrompt(prompt_token_ids=tokens)
        return self._api.StreamingInput(prompt, self._params(max_tokens, keep, ignore_eos))

    async def _open(
        self, group: str, prompt: list[int], max_tokens: int, ignore_eos: bool
    ) -> _Session:
        await self._make_room(group)
        session = _Session(f"ralm-session-{next(self._ids)}", group)
        self._sessions[session.id] = session
        session.inputs.put_nowait(self._chunk(prompt, max_tokens, None, ignore_eos))
        stream = self.base.engine.generate(
            session.input_stream(), self._params(max_tokens, None, ignore_eos), session.id
        )
        session.task = asyncio.create_task(self._pump(session, stream))
        self._opened += 1
        metrics.LM_SESSION_EVENTS.labels("opened").inc()
        return session

    def _resume(
        self, session: _Session, prompt: list[int], keep: int, max_tokens: int, ignore_eos: bool
    ) -> None:
        self._sessions.move_to_end(session.id)
        if keep < len(session.tokens):
            self._rewound += 1
            metrics.LM_SESSION_EVENTS.labels("rewound").inc()
        self._resumed += 1
        metrics.LM_SESSION_EVENTS.labels("resumed").inc()
        session.inputs.put_nowait(self._chunk(prompt[keep:], max_tokens, keep, ignore_eos))

    async def _pump(self, session: _Session, stream: AsyncGenerator[Any, None]) -> None:
        """Forward the session's outputs to its queue until the stream ends."""
        try:
            async for output in stream:
                session.outputs.put_nowait(output)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # delivered to the waiting generate() call
            session.outputs.put_nowait(exc)
        finally:
            session.alive = False
            session.outputs.put_nowait(_END)

    async def _collect(self, session: _Session) -> tuple[list[int], str | None, int]:
        """Tokens of the current chunk, its finish reason (None: stream ended), cached."""
        tokens: list[int] = []
        cached = 0
        first = True
        sent = time.perf_counter()
        while True:
            item = await session.outputs.get()
            if item is _END:
                return tokens, None, cached
            if isinstance(item, BaseException):
                raise item
            completion = item.outputs[0]
            if first:
                metrics.LM_CHUNK_FIRST_OUTPUT.observe(time.perf_counter() - sent)
                cached, first = int(item.num_cached_tokens or 0), False
            tokens += completion.token_ids
            if completion.finish_reason is not None:
                return tokens, completion.finish_reason, cached

    # -- closing ----------------------------------------------------------------------------

    async def _make_room(self, group: str) -> None:
        """Close least recently used idle sessions until a new one fits the bounds."""
        cfg = self.config
        while True:
            mine = [s for s in self._sessions.values() if s.group == group]
            victims = mine if len(mine) >= cfg.max_sessions_per_group else []
            if not victims and len(self._sessions) >= cfg.max_sessions:
                victims = list(self._sessions.values())
            idle = [s for s in victims if s.busy_with is None]
            if not idle:
                return
            await self._close(idle[0])

    async def _close(self, session: _Session) -> None:
        """End the session's vLLM request (paused or running) and forget it."""
        if self._sessions.pop(session.id, None) is None:
            return
        self._closed_count += 1
        metrics.LM_SESSION_EVENTS.labels("closed").inc()
        session.alive = False
        task = session.task
        if task is not None and not task.done():
            # Cancelling the consumer makes AsyncLLM.generate abort the request in the
            # engine (freeing its KV) and stop the input stream.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if session.outputs.empty():
            session.outputs.put_nowait(_END)

    # -- introspection ------------------------------------------------------------------------

    @property
    def stats(self) -> SessionStats:
        return SessionStats(self._opened, self._resumed, self._rewound, self._closed_count)

    @property
    def cache_stats(self) -> CacheStats:
        """Prompt tokens served from KV (the session's own or the prefix cache's)."""
        return CacheStats(self._requests, self._prompt_tokens, self._cached_tokens)

    @property
    def engine(self) -> Any:
        """The underlying vLLM ``AsyncLLM`` (as ``VllmLanguageModel.engine``)."""
        return self.base.engine

    def with_stop_token_ids(self, stop_token_ids: Sequence[int]) -> SessionLanguageModel:
        """Sessions on the same engine that also stop at ``stop_token_ids`` (own session
        table; its :meth:`shutdown` closes its sessions and leaves the engine running)."""
        return SessionLanguageModel(self.base.with_stop_token_ids(stop_token_ids), self.config)

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.base.tokenizer

    @property
    def block_size(self) -> int:
        return self.base.block_size

    @property
    def max_model_len(self) -> int:
        return self.base.max_model_len

    def in_flight(self) -> int:
        return len(self._inflight)

    async def shutdown(self, timeout_s: float | None = None) -> None:
        """Close every session, then shut the base model down (a no-op for a view)."""
        await self.close_all()
        await self.base.shutdown(timeout_s)


async def create_language_model(
    config: EngineConfig, stop_token_ids: Sequence[int] = (), sessions: SessionConfig | None = None
) -> VllmLanguageModel | SessionLanguageModel:
    """The LM for ``config.lm_path``: resubmission (``VllmLanguageModel``) or sessions."""
    if config.lm_path == "sessions":
        return await SessionLanguageModel.create(config, stop_token_ids, sessions)
    return await VllmLanguageModel.create(config, stop_token_ids)
