"""Request and response bodies: vLLM's OpenAI protocol models plus the RaLM extension.

Requests reuse vLLM's ``CompletionRequest`` / ``ChatCompletionRequest`` (OpenAI's schema,
with vLLM's own validation), adding one field, ``ralm`` (``RaLMOptions``: strict, unknown keys
rejected). With the official client: ``extra_body={"ralm": {"mode": "ralmspec", ...}}``.

Responses reuse vLLM's response models and add two top-level fields:

- ``sources``: when ``ralm.return_sources`` is true, one ``Source`` per answer span produced
  with one document in front (token span and character span in the answer text);
- ``ralm``: a ``RaLMUsage`` summary of the request (mode, retrievals, speculation outcome).

Streams carry both on their final chunk (the one with ``finish_reason``). A completion of
several prompts (a batch) has them on each choice instead (``RaLMCompletionChoice``), one
answer per prompt.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
)
from vllm.entrypoints.openai.engine.protocol import (
    DeltaMessage,
    ModelCard,
    ModelList,
    UsageInfo,
)

__all__ = [
    "ChatCompletionResponseChoice",
    "ChatCompletionResponseStreamChoice",
    "ChatMessage",
    "CompletionResponseChoice",
    "CompletionResponseStreamChoice",
    "DeltaMessage",
    "ModelCard",
    "ModelList",
    "RaLMChatCompletionRequest",
    "RaLMChatCompletionResponse",
    "RaLMChatCompletionStreamResponse",
    "RaLMCompletionChoice",
    "RaLMCompletionRequest",
    "RaLMCompletionResponse",
    "RaLMCompletionStreamChoice",
    "RaLMCompletionStreamResponse",
    "RaLMOptions",
    "RaLMUsage",
    "Source",
    "UsageInfo",
]

StrictPositiveInt = Annotated[int, Field(strict=True, ge=1)]


class RaLMOptions(BaseModel):
    """Per-request RaLM controls (the ``ralm`` field); unset fields take the server's flags."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["baseline", "ralmspec"] | None = None
    """``baseline``: retrieve every stride; ``ralmspec``: speculate and verify in batches.
    Both return the same tokens (greedy)."""
    retrieval_stride: StrictPositiveInt | None = None
    """Tokens generated between two retrievals."""
    speculation_stride: StrictPositiveInt | Literal["auto"] | None = None
    """Retrieval points speculated per verification, or ``"auto"`` (OS3 scheduler)."""
    prefetch_k: StrictPositiveInt | None = None
    """Documents cached per verified query (1 = no prefetching)."""
    async_verification: Annotated[bool, Field(strict=True)] | None = None
    """Speculate the next step while the verification is in flight."""
    return_sources: Annotated[bool, Field(strict=True)] = False
    """List which document produced which span of the answer (``sources``)."""


class RaLMCompletionRequest(CompletionRequest):
    ralm: RaLMOptions | None = None


class RaLMChatCompletionRequest(ChatCompletionRequest):
    ralm: RaLMOptions | None = None


class Source(BaseModel):
    """Answer tokens ``[token_start, token_end)`` (characters ``[char_start, char_end)`` of
    the answer text) were generated with document ``doc_id`` in front of the prompt."""

    doc_id: int | None
    """``None`` when the retriever returned nothing for that step (no document in front)."""
    title: str
    token_start: int
    token_end: int
    char_start: int
    char_end: int


class RaLMUsage(BaseModel):
    """What the request cost on the RaLM side."""

    mode: str
    retrieval_stride: int
    speculation_stride: int | str | None = None
    retrieval_calls: int
    verifications: int
    speculation_hits: int
    speculation_misses: int
    rollbacks: int
    tokens_discarded: int
    mean_stride: float | None = None
    lm_time_s: float
    retrieval_time_s: float
    wall_time_s: float
    prefix_cached_tokens: int
    prompt_tokens_sent: int
    load_fallback: bool = False
    """Asked for ``ralmspec`` but ran as the baseline: the server was at its
    ``--max-speculating``, its ``--max-retriever-utilization`` or its ``--max-loop-cpu``
    (the answer is the same)."""
    held_steps: int = 0
    """Steps of a speculating request run as plain retrieval because the retriever turned
    busier than ``--max-retriever-utilization``, or this server's event loop than
    ``--max-loop-cpu``, while it ran (the answer is the same)."""
    measured_plain_steps: int = 0
    """Steps run as plain retrieval because speculation measured slower per token than
    plain steps on this server lately, or too close to tell (the answer is the same)."""
    quiet_steps: int = 0
    """Plain steps run as the baseline's, between two probes of a plain run
    (``--plain-probe-every``; the answer is the same)."""
    routed_guesses: int = 0
    """Guesses ranked only among the cached documents the IVF search can reach
    (``--route-guesses``); ``rerouted_guesses`` of them changed by it."""
    rerouted_guesses: int = 0
    lm_wait_s: dict[str, float] | None = None
    """Seconds the request had no LM call in flight, by what ran meanwhile: ``guess``
    (ranking the speculation cache), else ``retrieval`` (a retriever call), else ``other``:
    where the answer's time went beside the LM."""


class RaLMCompletionChoice(CompletionResponseChoice):
    """A choice of a batched completion (several prompts) carries its own RaLM fields."""

    sources: list[Source] | None = None
    ralm: RaLMUsage | None = None


class RaLMCompletionStreamChoice(CompletionResponseStreamChoice):
    sources: list[Source] | None = None
    ralm: RaLMUsage | None = None


class RaLMCompletionResponse(CompletionResponse):
    choices: list[RaLMCompletionChoice]  # type: ignore[assignment]
    sources: list[Source] | None = None
    ralm: RaLMUsage | None = None


class RaLMCompletionStreamResponse(CompletionStreamResponse):
    choices: list[RaLMCompletionStreamChoice]  # type: ignore[assignment]
    sources: list[Source] | None = None
    ralm: RaLMUsage | None = None


class RaLMChatCompletionResponse(ChatCompletionResponse):
    sources: list[Source] | None = None
    ralm: RaLMUsage | None = None


class RaLMChatCompletionStreamResponse(ChatCompletionStreamResponse):
    sources: list[Source] | None = None
    ralm: RaLMUsage | None = None


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict without the RaLM fields where they are unset (plain OpenAI shape)."""
    data = model.model_dump(mode="json")
    for part in [data, *data.get("choices", [])]:
        for key in ("sources", "ralm"):
            if part.get(key) is None:
                part.pop(key, None)
    return data
