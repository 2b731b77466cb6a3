"""Where an answer ends before EOS or its length limit: stop strings and stop token ids.

OpenAI's ``stop`` and vLLM's ``stop_token_ids``. The check is a pure function of the
generated tokens, applied to every step as it is appended (``RequestContext.generate_step``)
in every mode, so a speculated step that runs into a stop ends the answer exactly where the
baseline's does, and a rollback behind it forgets it.

The answer keeps the token that completes the stop (a stop token id, or the token whose text
completes a stop string), as vLLM does; the *text* shown to a client ends before the stop
string or token (``StopText``), unless the request asks to include it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ralmspec_vllm.core.lm import Tokenizer

StopReason = str | int
"""The stop string that matched, or the stop token id generated."""


@dataclass(frozen=True, slots=True)
class StopCondition:
    """Stop strings (matched in the decoded answer) and stop token ids; empty: never stops."""

    strings: tuple[str, ...] = ()
    token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.strings, tuple) or not all(
            isinstance(s, str) and s for s in self.strings
        ):
            raise ValueError(f"stop strings must be non-empty strings, got {self.strings!r}")
        if not isinstance(self.token_ids, frozenset) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.token_ids
        ):
            raise ValueError(f"stop token ids must be non-negative ints, got {self.token_ids!r}")

    def __bool__(self) -> bool:
        return bool(self.strings or self.token_ids)

    def find(
        self, tokenizer: Tokenizer, generated: Sequence[int], begin: int
    ) -> tuple[int, StopReason] | None:
        """The shortest answer length in ``(begin, len(generated)]`` at which the answer
        stops, and why; ``None`` if it does not. ``generated[:begin]`` has been checked."""
        end = len(generated)
        for i in range(begin, end):
            if generated[i] in self.token_ids:
                end = i + 1
                reason: StopReason | None = generated[i]
                break
        else:
            reason = None
        if self.strings and earliest_stop(_decode(tokenizer, generated[:end]), self.strings):
            # Some prefix ending in (begin, end] is the first to contain a stop string.
            for length in range(begin + 1, end + 1):
                found = earliest_stop(_decode(tokenizer, generated[:length]), self.strings)
                if found is not None:
                    return length, found[1]
        return None if reason is None else (end, reason)


def earliest_stop(text: str, strings: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """(position, string) of the stop string that is completed first in ``text[start:]``
    (the occurrence ending first; of two ending together, the one starting first), or
    ``None``. Completed first, as text arrives: the choice does not depend on how the text
    was split into deltas, nor on the order the strings were given in."""
    best: tuple[int, int, str] | None = None
    for s in strings:
        pos = text.find(s, start)
        if pos >= 0 and (best is None or (pos + len(s), pos) < best[:2]):
            best = (pos + len(s), pos, s)
    return None if best is None else (best[1], best[2])


def _decode(tokenizer: Tokenizer, token_ids: Sequence[int]) -> str:
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)


class StopText:
    """The text a client is shown, fed as it grows: it ends before the first stop string
    (or just after it with ``include``), and a tail that may be the start of a stop string
    is held back until the text after it decides. Non-streamed answers go through the same
    filter (``push`` all, then ``flush``), so both show the same text."""

    def __init__(self, strings: Sequence[str], include: bool = False) -> None:
        self.strings = tuple(strings)
        self.include = include
        self.text = ""
        """Everything pushed."""
        self.shown = 0
        """Characters of ``text`` released."""
        self.stopped = False
        self._longest = max((len(s) for s in self.strings), default=0)

    def push(self, delta: str) -> str:
        """Append decoded text; the part now safe to show (may be empty)."""
        if self.stopped or not delta:
            return ""
        self.text += delta
        found = earliest_stop(self.text, self.strings, max(0, self.shown - self._longest + 1))
        if found is not None:
            pos, s = found
            self.stopped = True
            return self._release(pos + len(s) if self.include else pos)
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        """At the end of the answer: whatever was held back."""
        return "" if self.stopped else self._release(len(self.text))

    def _held(self) -> int:
        """The longest tail of the text that a stop string starts with."""
        for n in range(min(self._longest - 1, len(self.text) - self.shown), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.strings):
                return n
        return 0

    def _release(self, upto: int) -> str:
        out = self.text[self.shown : upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return out
