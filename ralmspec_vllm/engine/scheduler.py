"""The scheduler hook: vLLM streaming-input sessions that can be rewound (truncated).

vLLM 0.26 already pauses a *streaming-input* request after each chunk (status
``WAITING_FOR_STREAMING_REQ``, KV blocks kept) and resumes it when the next chunk arrives
(``Scheduler._update_request_as_session``). RaLM needs one thing more: on a rollback, resume
a paused sequence from an *earlier* position. This module adds that, selected with
``EngineConfig(scheduler_cls=SCHEDULER_CLS)``; it runs in the engine-core process, so
instructions travel inside the chunk's ``SamplingParams.extra_args``:

- ``ralm_session``: marks a RaLM session (other streaming requests keep vLLM's behaviour).
- ``ralm_keep``: on a resume, the number of the session's tokens to keep before the chunk's
  new tokens are appended (``<=`` the tokens whose KV was computed; the front end always
  sends it, see ``sessions.py``).

Rewinding a paused session to ``keep`` tokens (:meth:`RaLMSchedulerMixin._rewind`):

1. Token lists are cut to ``keep`` and all become prompt (as vLLM does on resume).
2. Block hashes are cut to the full blocks of the kept tokens; new ones are computed for
   the appended chunk by vLLM's own hasher.
3. KV blocks past the kept tokens are freed. The *stale-hash hazard*: a block that was
   full is registered in the prefix cache under the hash of its old tokens (and may be
   shared with other requests); writing different tokens into it would make that hash serve
   wrong KV. So when ``keep`` ends inside a block that was cached, that block is dropped
   too and its kept tokens are recomputed from the block boundary. Only the never-hashed
   partial tail block is written into again.
4. If nothing is left, the session has no blocks and ``num_computed_tokens == 0``: vLLM's
   waiting path then looks its prompt up in the prefix cache like a new request's.

Memory pressure: a paused session is in neither ``running`` nor the preemption path, so
paused sessions could hold the KV cache that running requests need. The KV manager's
``allocate_slots`` is wrapped: when an allocation fails, the least recently paused RaLM
session is *spilled* (blocks freed, hashed ones stay in the prefix cache) and the
allocation is retried. A spilled session resumes through the prefix cache.

Async scheduling (vLLM's default on GPUs; the step after the current one is scheduled
before the current one's tokens are known): a chunk that stops on EOS or a stop token has its
next step in flight. vLLM 0.26 would apply that stale step to the paused session (its token
leaked into the chunk, and a second stop condition paused the session twice, leaving the
engine one unfinished request short: the next lone request was never scheduled). Here a
session that pauses with output placeholders drops those frames when they come back
(``async_tokens_to_discard``, vLLM's own mechanism for requests preempted mid-step).

Also fixed for RaLM sessions: vLLM keeps the first chunk's ``max_tokens`` for every later
chunk, and reports no cached-token count for resumed chunks; here each chunk's
``max_tokens`` applies and ``num_cached_tokens`` is the KV the resume reused.

Supported: one KV cache group of full attention, no KV connector, no multimodal input.
``SCHEDULER_CLS`` picks the ``Scheduler`` or ``AsyncScheduler`` twin per engine config
(async scheduling is off on CPU, on for GPUs). vLLM's classes come from the version gate
(``version.load_scheduler_api``), which checks the installed release on import.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, TypeAlias

from ralmspec_vllm.engine.settings import RALM_KEEP_KEY, RALM_SCHEDULER_CLS, RALM_SESSION_KEY
from ralmspec_vllm.engine.version import load_scheduler_api

logger = logging.getLogger(__name__)

_api = load_scheduler_api()  # version check; the base classes are needed right here
Scheduler: Any = _api.Scheduler
AsyncScheduler: Any = _api.AsyncScheduler
RequestStatus: Any = _api.RequestStatus
Request: TypeAlias = Any
"""``vllm.v1.request.Request`` (vLLM classes are typed ``Any`` here, as in ``version``)."""
StreamingUpdate: TypeAlias = Any
"""``vllm.v1.request.StreamingUpdate``."""

SCHEDULER_CLS = RALM_SCHEDULER_CLS
"""Qualified name for ``EngineConfig.scheduler_cls`` / ``--scheduler-cls``."""
SESSION_KEY = RALM_SESSION_KEY
KEEP_KEY = RALM_KEEP_KEY


def _extra(params: Any) -> dict[str, Any]:
    return dict(getattr(params, "extra_args", None) or {})


def is_ralm_session(request: Request) -> bool:
    return bool(_extra(request.sampling_params).get(SESSION_KEY))


def _in_flight(request: Request) -> bool:
    """Whether an async-scheduling step of ``request`` has not come back yet."""
    return bool(request.num_output_placeholders > 0 or request.async_tokens_to_discard > 0)


class RaLMSchedulerMixin:
    """Rewind on resume, spill under memory pressure; mixed into vLLM's schedulers."""

    # Attributes of vLLM's Scheduler used here (for readers and type checkers).
    requests: dict[str, Request]
    kv_cache_manager: Any
    connector: Any
    block_size: int
    num_waiting_for_streaming_input: int
    log_stats: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        managers = self.kv_cache_manager.coordinator.single_type_managers
        if self.connector is not None or len(managers) != 1:
            raise ValueError("the RaLM scheduler needs one full-attention KV group, no connector")
        if type(managers[0]) is not _api.FullAttentionManager:
            raise ValueError(f"the RaLM scheduler needs full attention, got {type(managers[0])}")
        if managers[0].block_pool.hash_block_size != managers[0].block_size:
            raise ValueError("the RaLM scheduler needs prefix-cache hashes per KV block")
        self._manager = managers[0]
        self._paused: OrderedDict[str, Request] = OrderedDict()
        """RaLM sessions in pause order (entries may be stale; checked when used)."""
        self.rewinds = self.spills = 0
        # Wrap the KV manager's allocation (the one place a step can run out of blocks).
        allocate = self.kv_cache_manager.allocate_slots

        def allocate_slots(request: Request, *args: Any, **kwargs: Any) -> Any:
            while (blocks := allocate(request, *args, **kwargs)) is None:
                if not self._spill_one(request):
                    return None
            return blocks

        self.kv_cache_manager.allocate_slots = allocate_slots

    # -- pause / resume ---------------------------------------------------------------------

    def _handle_stopped_request(self, request: Request) -> bool:
        finished: bool = super()._handle_stopped_request(request)  # type: ignore[misc]
        if not finished and request.num_output_placeholders > 0:
            # Async scheduling: the session stopped (EOS, stop token) while its next step
            # was already scheduled. That step's output is stale; left as is, it would be
            # appended to the paused (or resumed) session, and if it also met a stop
            # condition the session would be paused twice, counting it twice in
            # num_waiting_for_streaming_input: the engine then undercounts its unfinished
            # requests and stops scheduling (a hang). Drop it as vLLM drops the stale
            # frames of requests preempted by reset_prefix_cache.
            request.async_tokens_to_discard += request.num_output_placeholders
            request.num_output_placeholders = 0
        if (
            not finished
            and request.status == RequestStatus.WAITING_FOR_STREAMING_REQ
            and is_ralm_session(request)
        ):
            self._paused[request.request_id] = request
            self._paused.move_to_end(request.request_id)
        return finished

    def _update_request_as_session(self, session: Request, update: StreamingUpdate) -> None:
        params = update.sampling_params
        keep = _extra(params).get(KEEP_KEY)
        if keep is None or update.mm_features:
            super()._update_request_as_session(session, update)  # type: ignore[misc]
            return
        self._paused.pop(session.request_id, None)
        self._rewind(session, int(keep))
        new_tokens = list(update.prompt_token_ids or ())
        session._all_token_ids.extend(new_tokens)
        session.prompt_token_ids = list(session._all_token_ids)
        session.num_prompt_tokens = len(session.prompt_token_ids)
        session.update_block_hashes()
        session.max_tokens = update.max_tokens  # vLLM keeps the first chunk's limit
        session.sampling_params = params
        session.arrival_time = update.arrival_time
        # Report the KV this resume reuses as the chunk's cached tokens. With no KV left,
        # the waiting path fills these stats from its prefix-cache lookup instead.
        session.prefill_stats = _api.PrefillStats()
        if session.num_computed_tokens:
            session.prefill_stats.set(session.num_prompt_tokens, session.num_computed_tokens, 0)
        if session.status == RequestStatus.WAITING_FOR_STREAMING_REQ:
            self.num_waiting_for_streaming_input -= 1
        session.status = RequestStatus.WAITING
        if self.log_stats:
            session.record_event(_api.EngineCoreEventType.QUEUED)

    # -- rewinding ----------------------------------------------------------------------------

    def _rewind(self, request: Request, keep: int) -> None:
        """Cut a paused session to its first ``keep`` tokens (see the module docstring)."""
        computed = request.num_computed_tokens
        if _in_flight(request):
            # Async scheduling: a step is still in flight for this request; its KV position
            # is uncertain, so keep no KV at all (recomputed through the prefix cache).
            logger.warning("%s resumed with a step in flight", request.request_id)
            computed = 0
        if not 0 <= keep <= len(request._all_token_ids) or keep > computed > 0:
            logger.error(
                "%s: cannot keep %d tokens (%d computed of %d); recomputing",
                request.request_id,
                keep,
                computed,
                len(request._all_token_ids),
            )
            keep = min(keep, len(request._all_token_ids))
            computed = 0
        del request._all_token_ids[keep:]
        request._output_token_ids.clear()
        request.prompt_token_ids = list(request._all_token_ids)
        request.num_prompt_tokens = keep
        bs = self._manager.block_size
        del request.block_hashes[keep // bs :]
        self._free_tail(request, min(computed, keep))
        self.rewinds += 1

    def _free_tail(self, request: Request, valid: int) -> None:
        """Keep KV for the first ``valid`` tokens at most, never reusing a hashed block."""
        req_id = request.request_id
        manager = self._manager
        bs = manager.block_size
        blocks = manager.req_to_blocks.get(req_id, [])
        num_cached = manager.num_cached_block.get(req_id, 0)
        if valid % bs and valid // bs < num_cached:
            valid -= valid % bs  # the block holding position `valid` is hashed: drop it
        if valid == 0:
            self.kv_cache_manager.free(request)  # no blocks: the prefix cache takes over
        else:
            num_blocks = -(-valid // bs)
            tail = blocks[num_blocks:]
            del blocks[num_blocks:]
            manager.block_pool.free_blocks(reversed(tail))  # hashed blocks stay cached
            manager.num_cached_block[req_id] = min(num_cached, valid // bs)
        request.num_computed_tokens = valid

    # -- memory pressure ----------------------------------------------------------------------

    def _spill_one(self, needy: Request) -> bool:
        """Free the KV of the least recently paused RaLM session; False if there is none."""
        while self._paused:
            req_id, request = self._paused.popitem(last=False)
            if (
                request is needy
                or req_id not in self.requests  # finished since it paused
                or self.requests[req_id] is not request
                or request.status != RequestStatus.WAITING_FOR_STREAMING_REQ
                or _in_flight(request)
            ):
                continue
            computed = request.num_computed_tokens
            if computed == 0:
                continue
            # Same normal form as a rewind to the computed tokens, then no KV at all.
            self._rewind(request, computed)
            self._free_tail(request, 0)
            self.spills += 1
            logger.debug("spilled paused session %s (%d tokens)", req_id, computed)
            return True
        return False


class RaLMSyncScheduler(RaLMSchedulerMixin, Scheduler):
    """The hook on vLLM's ``Scheduler`` (async scheduling off: CPU)."""


class RaLMAsyncScheduler(RaLMSchedulerMixin, AsyncScheduler):
    """The hook on vLLM's ``AsyncScheduler`` (async scheduling on: GPU)."""


class RaLMScheduler:
    """What ``scheduler_cls`` names: builds the twin matching the engine's scheduling mode.

    vLLM instantiates ``scheduler_cls`` whatever ``async_scheduling`` says, so a single class
    could not be right for both modes.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        vllm_config = kwargs["vllm_config"] if "vllm_config" in kwargs else args[0]
        asynchronous = bool(vllm_config.scheduler_config.async_scheduling)
        target = RaLMAsyncScheduler if asynchronous else RaLMSyncScheduler
        logger.info("RaLM scheduler hook: %s", target.__name__)
        return target(*args, **kwargs)
