"""What the core needs from a language model and a tokenizer.

The core never imports vLLM: ``ralmspec_vllm.engine`` implements ``LanguageModel`` on vLLM's
async engine, and tests implement it with a deterministic fake. A call generates a short chunk
(one retrieval stride) greedily from a full prompt; the implementation is expected to reuse the
KV cache for whatever prefix it has already seen (vLLM prefix caching), and reports how many
prompt tokens it served from cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Generation:
    """The result of one greedy chunk."""

    token_ids: tuple[int, ...]
    """New tokens, at most ``max_tokens``; ends with EOS when the model stopped."""
    finished: bool
    """True when the model emitted EOS (the request is complete; never with ``ignore_eos``)."""
    num_prompt_tokens: int
    num_cached_tokens: int
    """Prompt tokens served from the KV/prefix cache instead of recomputed."""
    lm_time_s: float


class LanguageModel(Protocol):
    """Greedy chunked generation. Concurrent calls with distinct ``request_id`` are allowed."""

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        request_id: str,
        *,
        ignore_eos: bool = False,
    ) -> Generation:
        """``ignore_eos``: EOS (and any token the LM treats like it) does not end the chunk;
        generation runs on to ``max_tokens``."""
        ...

    async def abort(self, request_id: str) -> None:
        """Cancel an in-flight ``generate`` (speculative work that became useless)."""
        ...


class Tokenizer(Protocol):
    """The subset of a Hugging Face tokenizer the core uses."""

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...
