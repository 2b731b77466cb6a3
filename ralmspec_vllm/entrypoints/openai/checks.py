"""What a request may ask for: the fields this server honours, refuses or ignores.

The request models are vLLM's (OpenAI's schema plus vLLM's extensions), which accept any
extra key and many extensions this server does not implement. ``check_fields`` turns each of
those into a 400 naming the field, so no request gets an answer other than the one it asked
for: sampling that is not greedy decoding, output shapes not served, vLLM extensions unless
sent with their default, and keys neither OpenAI nor vLLM define (OpenAI's API answers those
the same way; vLLM would ignore a typo). ``stop_condition`` and ``template_kwargs`` check the
two supported fields with structure of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ralmspec_vllm.core.stop import StopCondition
from ralmspec_vllm.entrypoints.openai.errors import bad_request
from ralmspec_vllm.entrypoints.openai.protocol import (
    RaLMChatCompletionRequest,
    RaLMCompletionRequest,
)

# Fields that change sampling or the output's shape; any non-default value -> 400.
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


def check_fields(
    request: RaLMCompletionRequest | RaLMChatCompletionRequest, body: dict[str, Any]
) -> None:
    """400 for the first field of ``body`` (the raw JSON) this server would not honour."""
    if request.temperature is not None and request.temperature > 0:
        raise bad_request(
            "temperature must be 0 or unset: the RaLM server decodes greedily, the mode in "
            "which ralmspec's output is guaranteed identical to the baseline's (seeded "
            "sampling is not supported)",
            "temperature",
        )
    fields = type(request).model_fields
    for field in body:  # OpenAI's fields that vLLM's models lack (best_of) are checked below
        if field not in fields and field not in _IGNORED and field not in _UNSUPPORTED:
            raise bad_request(f"Unrecognized request argument supplied: {field}", field)
    for field, unsupported in _UNSUPPORTED.items():
        if field in body and unsupported(getattr(request, field, body[field])):
            raise bad_request(f"{field} is not supported by the RaLM server", field)
    for field in _DEFAULT_ONLY:
        if field not in body:  # (a field of the other endpoint is unrecognized above)
            continue
        if getattr(request, field) != fields[field].get_default(call_default_factory=True):
            raise bad_request(f"{field} is not supported by the RaLM server", field)


def stop_condition(strings: str | list[str] | None, token_ids: list[int] | None) -> StopCondition:
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


def template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``chat_template_kwargs``: extra variables for the chat template, none of the
    arguments the server passes itself."""
    extra = dict(kwargs or {})
    if reserved := sorted(_TEMPLATE_RESERVED & extra.keys()):
        raise bad_request(
            f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs"
        )
    return extra
