"""``/v1/completions`` and ``/v1/chat/completions``: OpenAI request in, RaLM job, OpenAI out.

Flow of one request: the JSON body is validated by the protocol models (400 on failure);
fields the server would not honour are rejected (``checks.py``: only greedy decoding is
served, the mode in which ``ralmspec`` is guaranteed to return the baseline's tokens); each
prompt (or the chat messages rendered with the tokenizer's chat template) becomes a RaLM
question; ``RaLMService.plan`` applies defaults and limits (400 naming the field); then
either the whole answer is returned, or verified tokens are streamed as server-sent events.
A completion may batch several prompts: one job each, run concurrently, one choice each (a
stream interleaves their chunks, told apart by ``index``). ``stop`` and
``stop_token_ids`` end the answer in the core (``core/stop.py``); here the text shown ends
before the stop (``StopText``), the same whether streamed or not.

A non-streaming request runs while a watcher waits for the client's ``http.disconnect``; a
disconnect cancels the job (its in-flight LM and retrieval work is aborted). A streaming one
is cancelled the same way by Starlette's ``StreamingResponse``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ralmspec_vllm.core.prompt import NoChatTemplate, chat_query_text, render_chat
from ralmspec_vllm.core.stop import StopCondition, StopText
from ralmspec_vllm.entrypoints.openai import protocol as p
from ralmspec_vllm.entrypoints.openai.checks import check_fields, stop_condition, template_kwargs
from ralmspec_vllm.entrypoints.openai.errors import APIError, bad_request
from ralmspec_vllm.entrypoints.openai.sources import build_sources
from ralmspec_vllm.entrypoints.openai.streaming import DONE, IncrementalDecoder, sse
from ralmspec_vllm.service import JobError, JobResult, RaLMJob, RaLMService, RequestOptions

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PROMPTS = 256
"""Prompts one ``/v1/completions`` request may batch (each is a RaLM job of its own)."""


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One validated request: a job per prompt (chat: one) and how to answer it."""

    request_id: str
    jobs: tuple[RaLMJob, ...]
    prompt_tokens: tuple[int, ...]
    stream: bool
    include_usage: bool
    return_sources: bool
    return_token_ids: bool
    stop: StopCondition
    include_stop: bool
    """``include_stop_str_in_output``: the stop string or token's text stays in the answer."""

    @property
    def batched(self) -> bool:
        """Several prompts: each choice carries its own ``sources`` and ``ralm``."""
        return len(self.jobs) > 1

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
        prompts = self._prompts(request.prompt)
        prep = self._prepare(request, body, prompts, body.get("max_tokens"))
        if prep.stream:
            return _sse_response(self._stream(prep, chat=False))
        results = await _until_disconnect(raw, self._run_all(prep))
        choices = []
        for i, result in enumerate(results):
            choices.append(
                p.RaLMCompletionChoice(
                    index=i,
                    text=self._text(prep, result),
                    finish_reason=_finish(result),
                    stop_reason=result.stop_reason,
                    token_ids=list(result.token_ids) if prep.return_token_ids else None,
                    **(await self._extension(prep, i, result) if prep.batched else {}),
                )
            )
        response = p.RaLMCompletionResponse(
            id=f"cmpl-{prep.request_id}",
            model=self.model_name,
            choices=choices,
            usage=_usage(prep, results),
            **({} if prep.batched else await self._extension(prep, 0, results[0])),
        )
        return JSONResponse(p.dump(response))

    async def chat(self, raw: Request) -> Response:
        body = await _json_body(raw)
        request = p.RaLMChatCompletionRequest.model_validate(body)
        question, query = self._render_chat(body.get("messages"), request)
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        prep = self._prepare(
            request,
            body,
            [self.service.question_ids(question)],
            max_tokens,
            # a conversation of system messages alone has no text to query: the prompt's
            query_ids=self.service.question_ids(query) or None,
        )
        if prep.stream:
            return _sse_response(self._stream(prep, chat=True))
        (result,) = await _until_disconnect(raw, self._run_all(prep))
        response = p.RaLMChatCompletionResponse(
            id=f"chatcmpl-{prep.request_id}",
            model=self.model_name,
            choices=[
                p.ChatCompletionResponseChoice(
                    index=0,
                    message=p.ChatMessage(role="assistant", content=self._text(prep, result)),
                    finish_reason=_finish(result),
                    stop_reason=result.stop_reason,
                    token_ids=list(result.token_ids) if prep.return_token_ids else None,
                )
            ],
            usage=_usage(prep, [result]),
            **await self._extension(prep, 0, result),
        )
        return JSONResponse(p.dump(response))

    # -- request preparation --------------------------------------------------------------

    def _prompts(self, prompt: Any) -> list[list[int]]:
        """The question tokens of each prompt: a string, a list of token ids, or a list of
        either (a batch: one answer per prompt, in order)."""
        if isinstance(prompt, str):
            return [self.service.question_ids(prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(t, int) for t in prompt):
                return [list(prompt)]
            if len(prompt) > MAX_PROMPTS:
                raise bad_request(f"at most {MAX_PROMPTS} prompts per request", "prompt")
            if all(isinstance(x, str) for x in prompt):
                return [self.service.question_ids(x) for x in prompt]
            if all(
                isinstance(x, list) and x and all(isinstance(t, int) for t in x) for x in prompt
            ):
                return [list(x) for x in prompt]
        raise bad_request(
            "prompt must be a string, a list of token ids, or a non-empty list of strings or "
            "of token-id lists",
            "prompt",
        )

    def _prepare(
        self,
        request: p.RaLMCompletionRequest | p.RaLMChatCompletionRequest,
        body: dict[str, Any],
        prompts: list[list[int]],
        max_tokens: Any,
        query_ids: list[int] | None = None,
    ) -> _Prepared:
        """One job per prompt; ``query_ids`` (a chat request's, which has one prompt): what
        its retrieval queries read before the answer (``RaLMJob.query_ids``)."""
        if request.model is not None and request.model != self.model_name:
            raise APIError(
                f"The model '{request.model}' does not exist; this server serves "
                f"'{self.model_name}'.",
                status=404,
                param="model",
                code="model_not_found",
            )
        check_fields(request, body)
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
        ):
            raise bad_request(f"max_tokens must be an integer, got {max_tokens!r}", "max_tokens")
        options = request.ralm or p.RaLMOptions()
        stop = stop_condition(request.stop, request.stop_token_ids)
        request_id = uuid.uuid4().hex
        jobs = []
        for i, question_ids in enumerate(prompts):
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
                    request_id=request_id if len(prompts) == 1 else f"{request_id}-{i}",
                    stop=stop,
                    ignore_eos=request.ignore_eos,
                    query_ids=query_ids,
                )
            except JobError as err:
                which = f"prompt {i}: " if len(prompts) > 1 else ""
                raise bad_request(f"{which}{err}", err.param) from None
            jobs.append(job)
        stream_options = request.stream_options
        return _Prepared(
            request_id=request_id,
            jobs=tuple(jobs),
            prompt_tokens=tuple(len(q) for q in prompts),
            stream=bool(request.stream),
            include_usage=bool(stream_options and stream_options.include_usage),
            return_sources=options.return_sources,
            return_token_ids=bool(request.return_token_ids),
            stop=stop,
            include_stop=request.include_stop_str_in_output,
        )

    def _render_chat(self, messages: Any, request: p.RaLMChatCompletionRequest) -> tuple[str, str]:
        """The question text (the conversation through the tokenizer's chat template) and
        the text its retrieval queries read (``chat_query_text``: no template markup)."""
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
        extra = template_kwargs(request.chat_template_kwargs)
        try:
            question = render_chat(
                self.tokenizer,
                plain,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                **extra,
            )
        except NoChatTemplate:
            raise bad_request(
                "this model has no chat template; use /v1/completions", "messages"
            ) from None
        except Exception as err:  # template errors (e.g. roles it rejects) are client errors
            raise bad_request(f"chat template failed: {err}", "messages") from None
        return question, chat_query_text(plain)

    # -- running ----------------------------------------------------------------------------

    async def _run_all(self, prep: _Prepared) -> list[JobResult]:
        """Every job's whole answer; the first failure cancels the others."""
        tasks = [asyncio.ensure_future(self.service.run(job)) for job in prep.jobs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- streaming ------------------------------------------------------------------------

    async def _stream(self, prep: _Prepared, chat: bool) -> AsyncIterator[str]:
        """Server-sent events: each choice's verified text as it comes (choices interleave
        when several prompts stream), its last chunk with ``finish_reason``, then usage."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{prep.request_id}"
        created = int(time.time())

        def frame(index: int, text: str, role: str | None = None, **extra: Any) -> str:
            finish, reason = extra.pop("finish_reason", None), extra.pop("stop_reason", None)
            per_choice = {
                k: extra.pop(k) for k in ("sources", "ralm") if prep.batched and k in extra
            }
            body: p.RaLMCompletionStreamResponse | p.RaLMChatCompletionStreamResponse
            if chat:
                delta = (
                    p.DeltaMessage(role=role, content=text) if text or role else p.DeltaMessage()
                )
                chat_choice = p.ChatCompletionResponseStreamChoice(
                    index=index, delta=delta, finish_reason=finish, stop_reason=reason
                )
                body = p.RaLMChatCompletionStreamResponse(
                    id=rid, created=created, model=self.model_name, choices=[chat_choice], **extra
                )
            else:
                choice = p.RaLMCompletionStreamChoice(
                    index=index, text=text, finish_reason=finish, stop_reason=reason, **per_choice
                )
                body = p.RaLMCompletionStreamResponse(
                    id=rid, created=created, model=self.model_name, choices=[choice], **extra
                )
            return sse(p.dump(body))

        if chat:
            yield frame(0, "", role="assistant")
        results: dict[int, JobResult] = {}
        async with contextlib.aclosing(self._merged(prep)) as events:
            async for index, kind, value, result in events:
                if kind == "text":
                    yield frame(index, value)
                elif kind == "end":
                    assert result is not None
                    results[index] = result
                    extension = await self._extension(prep, index, result)
                    yield frame(
                        index,
                        value,
                        finish_reason=_finish(result),
                        stop_reason=result.stop_reason,
                        **extension,
                    )
                else:  # a job failed: the others are cancelled as the events close
                    yield value
                    break
        if prep.include_usage and len(results) == len(prep.jobs):
            usage = _usage(prep, [results[i] for i in range(len(prep.jobs))])
            response = (
                p.RaLMChatCompletionStreamResponse if chat else p.RaLMCompletionStreamResponse
            )
            body = response(id=rid, created=created, model=self.model_name, choices=[], usage=usage)
            yield sse(p.dump(body))
        yield DONE

    async def _merged(
        self, prep: _Prepared
    ) -> AsyncGenerator[tuple[int, str, str, JobResult | None], None]:
        """Every job's ``_deltas`` tagged with its prompt's index, in arrival order. Closing
        the iterator (a client gone) cancels every job."""
        queue: asyncio.Queue[tuple[int, str, str, JobResult | None]] = asyncio.Queue()

        async def pump(index: int, job: RaLMJob) -> None:
            async for kind, value, result in self._deltas(prep, job):
                queue.put_nowait((index, kind, value, result))

        tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(prep.jobs)]
        ended = 0
        try:
            while ended < len(tasks):
                item = await queue.get()
                ended += item[1] != "text"
                yield item
        finally:
            for task in tasks:
                task.cancel()
            # Under an anyio cancel scope (Starlette's streaming response) every await in
            # here is cancelled again at once; the tasks are cancelled either way.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _deltas(
        self, prep: _Prepared, job: RaLMJob
    ) -> AsyncIterator[tuple[str, str, JobResult | None]]:
        """("text", delta, None) per verified chunk, then ("end", tail, result); a failure
        mid-stream becomes ("error", sse frame, None)."""
        decoder, shown = IncrementalDecoder(self.tokenizer), prep.answer_text()
        try:
            async for item in self.service.stream(job):
                if isinstance(item, JobResult):
                    yield "end", shown.push(decoder.flush()) + shown.flush(), item
                    return
                if delta := shown.push(decoder.push(prep.shown_ids(item.token_ids))):
                    yield "text", delta, None
        except Exception as err:  # headers are sent: report in-band like vLLM does
            logger.exception("request %s failed mid-stream", job.request_id)
            error = APIError(f"{type(err).__name__}: {err}", status=500, type="server_error")
            yield "error", sse(error.body()), None

    # -- the RaLM fields ----------------------------------------------------------------------

    async def _extension(self, prep: _Prepared, index: int, result: JobResult) -> dict[str, Any]:
        """``sources`` (when asked for) and ``ralm`` of one answer."""
        sources = await self._sources(prep, result) if prep.return_sources else None
        return {"sources": sources, "ralm": _ralm_usage(prep.jobs[index], result)}

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


def _finish(result: JobResult) -> str:
    return "stop" if result.finished else "length"


def _usage(prep: _Prepared, results: Sequence[JobResult]) -> p.UsageInfo:
    prompt = sum(prep.prompt_tokens)
    completion = sum(len(result.token_ids) for result in results)
    return p.UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
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
        measured_plain_steps=trace.measured_plain_steps,
        quiet_steps=trace.quiet_steps,
        routed_guesses=trace.routed_guesses,
        rerouted_guesses=trace.rerouted_guesses,
        lm_wait_s={
            "guess": round(trace.lm_wait_guess_s, 6),
            "retrieval": round(trace.lm_wait_retrieval_s, 6),
            "other": round(trace.lm_wait_other_s, 6),
        },
    )
