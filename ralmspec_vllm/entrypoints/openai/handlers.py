"""``/v1/completions`` and ``/v1/chat/completions``: OpenAI request in, RaLM job, OpenAI out.

Flow of one request: the JSON body is validated by the protocol models (400 on failure);
unsupported sampling features are rejected (400: only greedy decoding is served, the mode in
which ``ralmspec`` is guaranteed to return the baseline's tokens); the prompt (or the chat
messages rendered with the tokenizer's chat template) becomes the RaLM question;
``RaLMService.plan`` applies defaults and limits (400 naming the field); then either the
whole answer is returned, or verified tokens are streamed as server-sent events. ``stop`` and
``stop_token_ids`` end the answer in the core (``core/stop.py``); here the text shown ends
before the stop (``StopText``), the same whether streamed or not.

A non-streaming request runs while a watcher waits for the client's ``http.disconnect``; a
disconnect cancels the job (its in-flight LM and retrieval work is aborted). A streaming one
is cancelled the same way by Starlette's ``StreamingResponse``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ralmspec_vllm.core.stop import StopCondition, StopText
from ralmspec_vllm.entrypoints.openai import protocol as p
from ralmspec_vllm.entrypoints.openai.errors import APIError, bad_request
from ralmspec_vllm.entrypoints.openai.sources import build_sources
from ralmspec_vllm.entrypoints.openai.streaming import DONE, IncrementalDecoder, sse
from ralmspec_vllm.service import JobError, JobResult, RaLMJob, RaLMService, RequestOptions

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Request fields that change sampling or output shape; any non-default value -> 400.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v not in (None, 1),
    "best_of": lambda v: v not in (None, 1),
    "use_beam_search": bool,
    "logprobs": lambda v: bool(v),
    "top_logprobs": lambda v: bool(v),
    "prompt_logprobs": lambda v: v is not None,
    "echo": bool,
    "suffix": lambda v: v is not None,
    "presence_penalty": lambda v: v not in (None, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0.0),
    "repetition_penalty": lambda v: v not in (None, 1.0),
    "logit_bias": lambda v: bool(v),
    "min_tokens": lambda v: bool(v),
    "ignore_eos": bool,
    "tools": lambda v: bool(v),
    "response_format": lambda v: v is not None and getattr(v, "type", "text") != "text",
    "structured_outputs": lambda v: v is not None,
    "allowed_token_ids": lambda v: v is not None,
    "bad_words": lambda v: bool(v),
    "prompt_embeds": lambda v: v is not None,
    "skip_special_tokens": lambda v: v is False,
}
_DEFAULT_ONLY = (
    "add_special_tokens",  # the prompt layout places the special prefix itself
    "truncate_prompt_tokens",
    "truncation_side",
    "documents",  # the retriever chooses the documents
    "chat_template",  # vLLM also refuses request templates unless told to trust them
    "cache_salt",
    "priority",
    "kv_transfer_params",
    "ec_transfer_params",
    "vllm_xargs",
    "repetition_detection",
    "reasoning_effort",
    "thinking_token_budget",
    "media_io_kwargs",
    "mm_processor_kwargs",
    "logprob_token_ids",
    "return_token_offsets",
    "return_prompt_text",
    "return_assistant_tokens_mask",
)
"""vLLM extensions this server does not implement: a value other than the default -> 400."""
_IGNORED = frozenset({"metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})
"""OpenAI bookkeeping fields outside vLLM's schema that do not change an answer."""
_TEMPLATE_RESERVED = frozenset(
    {"tokenize", "add_generation_prompt", "continue_final_message", "chat_template",
     "conversation", "tools", "documents", "return_dict", "return_assistant_tokens_mask"}
)  # fmt: skip
"""``chat_template_kwargs`` keys the server sets itself."""
MAX_STOP_STRINGS = 64


@dataclass(frozen=True, slots=True)
class _Prepared:
    job: RaLMJob
    stream: bool
    include_usage: bool
    return_sources: bool
    prompt_tokens: int
    stop: StopCondition
    include_stop: bool
    """``include_stop_str_in_output``: the stop string or token's text stays in the answer."""

    def answer_text(self) -> StopText:
        """The filter that ends the shown text at the first stop string."""
        return StopText(self.stop.strings, self.include_stop)

    def shown_ids(self, token_ids: Sequence[int]) -> Sequence[int]:
        """Tokens whose text is shown: a stop token id's own text is left out (it is always
        the answer's last token: the answer ends at the first one)."""
        if self.include_stop or not self.stop.token_ids:
            return token_ids
        return [t for t in token_ids if t not in self.stop.token_ids]


class OpenAIHandlers:
    """Request handlers bound to one ``RaLMService`` and one served model name."""

    def __init__(self, service: RaLMService, model_name: str) -> None:
        self.service = service
        self.model_name = model_name
        self.tokenizer = service.tokenizer

    # -- entry points ---------------------------------------------------------------------

    async def completions(self, raw: Request) -> Response:
        body = await _json_body(raw)
        request = p.RaLMCompletionRequest.model_validate(body)
        prompt = request.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            question_ids = self.service.question_ids(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            question_ids = list(prompt)  # type: ignore[arg-type]
        else:
            raise bad_request("prompt must be one string or one list of token ids", "prompt")
        prep = self._prepare(request, body, question_ids, body.get("max_tokens"))
        if prep.stream:
            return _sse_response(self._stream_completion(prep))
        result = await _until_disconnect(raw, self.service.run(prep.job))
        text = self._text(prep, result)
        response = p.RaLMCompletionResponse(
            id=f"cmpl-{prep.job.request_id}",
            model=self.model_name,
            choices=[
                p.CompletionResponseChoice(
                    index=0,
                    text=text,
                    finish_reason=_finish(result),
                    stop_reason=result.stop_reason,
                    token_ids=list(result.token_ids) if request.return_token_ids else None,
                )
            ],
            usage=_usage(prep, result),
            sources=await self._sources(prep, result) if prep.return_sources else None,
            ralm=_ralm_usage(prep.job, result),
        )
        return JSONResponse(p.dump(response))

    async def chat(self, raw: Request) -> Response:
        body = await _json_body(raw)
        request = p.RaLMChatCompletionRequest.model_validate(body)
        question = self._render_chat(body.get("messages"), request)
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        prep = self._prepare(request, body, self.service.question_ids(question), max_tokens)
        if prep.stream:
            return _sse_response(self._stream_chat(prep))
        result = await _until_disconnect(raw, self.service.run(prep.job))
        text = self._text(prep, result)
        response = p.RaLMChatCompletionResponse(
            id=f"chatcmpl-{prep.job.request_id}",
            model=self.model_name,
            choices=[
                p.ChatCompletionResponseChoice(
                    index=0,
                    message=p.ChatMessage(role="assistant", content=text),
                    finish_reason=_finish(result),
                    stop_reason=result.stop_reason,
                    token_ids=list(result.token_ids) if request.return_token_ids else None,
                )
            ],
            usage=_usage(prep, result),
            sources=await self._sources(prep, result) if prep.return_sources else None,
            ralm=_ralm_usage(prep.job, result),
        )
        return JSONResponse(p.dump(response))

    # -- request preparation --------------------------------------------------------------

    def _prepare(
        self,
        request: p.RaLMCompletionRequest | p.RaLMChatCompletionRequest,
        body: dict[str, Any],
        question_ids: list[int],
        max_tokens: Any,
    ) -> _Prepared:
        if request.model is not None and request.model != self.model_name:
            raise APIError(
                f"The model '{request.model}' does not exist; this server serves "
                f"'{self.model_name}'.",
                status=404,
                param="model",
                code="model_not_found",
            )
        if request.temperature is not None and request.temperature > 0:
            raise bad_request(
                "temperature must be 0 or unset: the RaLM server decodes greedily, the mode in "
                "which ralmspec's output is guaranteed identical to the baseline's (seeded "
                "sampling is not supported)",
                "temperature",
            )
        fields = type(request).model_fields
        for field in body:
            if field not in fields and field not in _IGNORED:
                raise bad_request(f"Unrecognized request argument supplied: {field}", field)
        for field, unsupported in _UNSUPPORTED.items():
            if field in body and unsupported(getattr(request, field, body[field])):
                raise bad_request(f"{field} is not supported by the RaLM server", field)
        for field in _DEFAULT_ONLY:
            if field in body and getattr(request, field) != fields[field].get_default(
                call_default_factory=True
            ):
                raise bad_request(f"{field} is not supported by the RaLM server", field)
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
        ):
            raise bad_request(f"max_tokens must be an integer, got {max_tokens!r}", "max_tokens")
        options = request.ralm or p.RaLMOptions()
        stop = _stop_condition(request.stop, request.stop_token_ids)
        try:
            job = self.service.plan(
                question_ids,
                max_tokens,
                RequestOptions(
                    mode=options.mode,
                    retrieval_stride=options.retrieval_stride,
                    speculation_stride=options.speculation_stride,
                    prefetch_k=options.prefetch_k,
                    async_verification=options.async_verification,
                ),
                request_id=uuid.uuid4().hex,
                stop=stop,
            )
        except JobError as err:
            raise bad_request(str(err), err.param) from None
        stream_options = request.stream_options
        return _Prepared(
            job=job,
            stream=bool(request.stream),
            include_usage=bool(stream_options and stream_options.include_usage),
            return_sources=options.return_sources,
            prompt_tokens=len(question_ids),
            stop=stop,
            include_stop=request.include_stop_str_in_output,
        )

    def _render_chat(self, messages: Any, request: p.RaLMChatCompletionRequest) -> str:
        """The question text: the conversation through the tokenizer's chat template."""
        plain: list[dict[str, str]] = []
        for i, message in enumerate(messages or []):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # text parts only
                texts = [part.get("text") for part in content if isinstance(part, dict)]
                if any(part.get("type") != "text" for part in content) or None in texts:
                    raise bad_request("only text content is supported", f"messages.{i}.content")
                content = "".join(texts)  # type: ignore[arg-type]
            if not isinstance(content, str):
                raise bad_request("message content must be text", f"messages.{i}.content")
            plain.append({"role": str(message.get("role")), "content": content})
        if not plain:
            raise bad_request("messages must not be empty", "messages")
        extra = dict(request.chat_template_kwargs or {})
        if reserved := sorted(_TEMPLATE_RESERVED & extra.keys()):
            raise bad_request(
                f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs"
            )
        apply = getattr(self.tokenizer, "apply_chat_template", None)
        if apply is None or not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions", "messages")
        try:
            text = apply(
                plain,
                tokenize=False,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                **extra,
            )
        except Exception as err:  # template errors (e.g. roles it rejects) are client errors
            raise bad_request(f"chat template failed: {err}", "messages") from None
        return str(text)

    # -- streaming ------------------------------------------------------------------------

    async def _stream_completion(self, prep: _Prepared) -> AsyncIterator[str]:
        rid, created = f"cmpl-{prep.job.request_id}", int(time.time())

        def chunk(text: str, **extra: Any) -> str:
            finish, reason = extra.pop("finish_reason", None), extra.pop("stop_reason", None)
            choice = p.CompletionResponseStreamChoice(
                index=0, text=text, finish_reason=finish, stop_reason=reason
            )
            body = p.RaLMCompletionStreamResponse(
                id=rid, created=created, model=self.model_name, choices=[choice], **extra
            )
            return sse(p.dump(body))

        async for kind, value, result in self._deltas(prep):
            if kind == "text":
                yield chunk(value)
            elif kind == "end":
                assert result is not None
                yield chunk(value, **await self._final_fields(prep, result))
                if prep.include_usage:
                    usage = p.RaLMCompletionStreamResponse(
                        id=rid, created=created, model=self.model_name, choices=[],
                        usage=_usage(prep, result),
                    )  # fmt: skip
                    yield sse(p.dump(usage))
            else:
                yield value
        yield DONE

    async def _stream_chat(self, prep: _Prepared) -> AsyncIterator[str]:
        rid, created = f"chatcmpl-{prep.job.request_id}", int(time.time())

        def chunk(delta: p.DeltaMessage, **extra: Any) -> str:
            finish, reason = extra.pop("finish_reason", None), extra.pop("stop_reason", None)
            choice = p.ChatCompletionResponseStreamChoice(
                index=0, delta=delta, finish_reason=finish, stop_reason=reason
            )
            body = p.RaLMChatCompletionStreamResponse(
                id=rid, created=created, model=self.model_name, choices=[choice], **extra
            )
            return sse(p.dump(body))

        yield chunk(p.DeltaMessage(role="assistant", content=""))
        async for kind, value, result in self._deltas(prep):
            if kind == "text":
                yield chunk(p.DeltaMessage(content=value))
            elif kind == "end":
                assert result is not None
                delta = p.DeltaMessage(content=value) if value else p.DeltaMessage()
                yield chunk(delta, **await self._final_fields(prep, result))
                if prep.include_usage:
                    usage = p.RaLMChatCompletionStreamResponse(
                        id=rid, created=created, model=self.model_name, choices=[],
                        usage=_usage(prep, result),
                    )  # fmt: skip
                    yield sse(p.dump(usage))
            else:
                yield value
        yield DONE

    async def _deltas(self, prep: _Prepared) -> AsyncIterator[tuple[str, str, JobResult | None]]:
        """("text", delta, None) per verified chunk, then ("end", tail, result); a failure
        mid-stream becomes ("error", sse frame, None)."""
        decoder, shown = IncrementalDecoder(self.tokenizer), prep.answer_text()
        try:
            async for item in self.service.stream(prep.job):
                if isinstance(item, JobResult):
                    yield "end", shown.push(decoder.flush()) + shown.flush(), item
                    return
                if delta := shown.push(decoder.push(prep.shown_ids(item.token_ids))):
                    yield "text", delta, None
        except Exception as err:  # headers are sent: report in-band like vLLM does
            logger.exception("request %s failed mid-stream", prep.job.request_id)
            error = APIError(f"{type(err).__name__}: {err}", status=500, type="server_error")
            yield "error", sse(error.body()), None

    async def _final_fields(self, prep: _Prepared, result: JobResult) -> dict[str, Any]:
        return {
            "finish_reason": _finish(result),
            "stop_reason": result.stop_reason,
            "sources": await self._sources(prep, result) if prep.return_sources else None,
            "ralm": _ralm_usage(prep.job, result),
        }

    # -- sources ------------------------------------------------------------------------------

    async def _sources(self, prep: _Prepared, result: JobResult) -> list[p.Source]:
        """Character spans end where the shown text ends (before a stop string)."""
        shown = len(self._text(prep, result))
        return await build_sources(
            result.spans, result.token_ids, self.tokenizer, self.service.titles, shown
        )

    def _text(self, prep: _Prepared, result: JobResult) -> str:
        """The answer text of a non-streamed response (what a stream shows, at once)."""
        shown = prep.answer_text()
        ids = list(prep.shown_ids(result.token_ids))
        return shown.push(self.tokenizer.decode(ids, skip_special_tokens=True)) + shown.flush()


# -- helpers --------------------------------------------------------------------------------


async def _json_body(raw: Request) -> dict[str, Any]:
    try:
        body = await raw.json()
    except Exception:
        raise bad_request("request body must be valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


async def _until_disconnect(raw: Request, work: Awaitable[T]) -> T:
    """Run ``work``; cancel it if the client disconnects first (body already read)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise APIError("client disconnected", status=499, code="client_closed_request")
    return task.result()


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _stop_condition(strings: str | list[str] | None, token_ids: list[int] | None) -> StopCondition:
    """The request's ``stop`` and ``stop_token_ids``, checked (400 naming the field)."""
    if isinstance(strings, str):
        strings = [strings]
    strings = list(strings or [])
    if len(strings) > MAX_STOP_STRINGS:
        raise bad_request(f"stop takes at most {MAX_STOP_STRINGS} strings", "stop")
    if "" in strings:
        raise bad_request("stop strings must not be empty", "stop")
    if any(t < 0 for t in token_ids or []):
        raise bad_request("stop_token_ids must be non-negative", "stop_token_ids")
    return StopCondition(tuple(dict.fromkeys(strings)), frozenset(token_ids or []))


def _finish(result: JobResult) -> str:
    return "stop" if result.finished else "length"


def _usage(prep: _Prepared, result: JobResult) -> p.UsageInfo:
    completion = len(result.token_ids)
    return p.UsageInfo(
        prompt_tokens=prep.prompt_tokens,
        completion_tokens=completion,
        total_tokens=prep.prompt_tokens + completion,
    )


def _ralm_usage(job: RaLMJob, result: JobResult) -> p.RaLMUsage:
    trace = result.trace
    return p.RaLMUsage(
        mode=trace.mode,
        retrieval_stride=job.config.retrieval_stride,
        speculation_stride=job.speculation.speculation_stride if job.mode == "ralmspec" else None,
        retrieval_calls=len(trace.retrieval_calls),
        verifications=len(trace.verifications),
        speculation_hits=trace.speculation_hits,
        speculation_misses=trace.speculation_misses,
        rollbacks=trace.rollbacks,
        tokens_discarded=trace.tokens_discarded,
        mean_stride=trace.mean_stride,
        lm_time_s=trace.lm_time_s,
        retrieval_time_s=trace.retrieval_time_s,
        wall_time_s=trace.wall_time_s,
        prefix_cached_tokens=trace.num_cached_tokens,
        prompt_tokens_sent=trace.num_prompt_tokens,
        load_fallback=result.load_fallback,
        held_steps=trace.held_steps,
    )
