"""Verified tokens -> text deltas -> server-sent events.

``IncrementalDecoder`` turns a growing list of verified token ids into text deltas that are
always correct: it decodes the whole verified prefix and emits only the new suffix, holding
back a trailing U+FFFD (a multi-byte character whose remaining bytes are in later tokens)
until the next tokens complete it. The concatenation of all deltas plus ``flush()`` equals
``tokenizer.decode(all_ids)``. Answers are at most a few hundred tokens, so re-decoding the
prefix costs little next to generation.

``sse`` frames one JSON payload; ``DONE`` is the terminating frame OpenAI clients expect.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from ralmspec_vllm.core.lm import Tokenizer

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
_INCOMPLETE = "\ufffd"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class IncrementalDecoder:
    """Text deltas of a token sequence that only ever grows (verified tokens)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        """Text emitted so far."""

    def _decode(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: Sequence[int]) -> str:
        """Append verified tokens; the new text that is safe to show (may be empty)."""
        self.token_ids.extend(token_ids)
        full = self._decode()
        if full.endswith(_INCOMPLETE):  # wait for the rest of the character
            full = full.rstrip(_INCOMPLETE)
        return self._advance(full)

    def flush(self) -> str:
        """At the end: whatever is left, undecodable bytes included (as U+FFFD)."""
        return self._advance(self._decode())

    def _advance(self, full: str) -> str:
        if not full.startswith(self.text):
            # A tokenizer whose decoding of a longer prefix rewrites earlier characters
            # (rare clean-up rules); emitted text cannot be retracted, so continue after it.
            logger.debug("decoded prefix changed: %r -> %r", self.text, full[: len(self.text)])
            if len(full) <= len(self.text):
                return ""
        delta = full[len(self.text) :]
        self.text += delta
        return delta


def char_offsets(
    tokenizer: Tokenizer, token_ids: Sequence[int], positions: Sequence[int]
) -> list[int]:
    """Character offset in ``decode(token_ids)`` at each token position (prefix decoding;
    a position inside a multi-byte character maps to the character's start)."""
    result = []
    for pos in positions:
        prefix = tokenizer.decode(list(token_ids[:pos]), skip_special_tokens=True)
        result.append(len(prefix.rstrip(_INCOMPLETE)))
    return result
