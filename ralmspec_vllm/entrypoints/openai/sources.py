"""The ``sources`` of an answer: which document produced which span of it.

From the job's step spans (``TokenSpan``: answer tokens ``[start, end)`` generated with one
document in front), adjacent steps with the same document are merged into one ``Source``; its
character span is where those tokens' text sits in the decoded answer (prefix decoding, see
``streaming.char_offsets``), and its title comes from the retriever (one ``documents`` call).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from ralmspec_vllm.core.lm import Tokenizer
from ralmspec_vllm.core.trace import TokenSpan
from ralmspec_vllm.entrypoints.openai.protocol import Source
from ralmspec_vllm.entrypoints.openai.streaming import char_offsets

TitleLookup = Callable[[Sequence[int]], Awaitable[dict[int, str]]]


def merge_spans(spans: Sequence[TokenSpan]) -> list[tuple[int | None, int, int]]:
    """(doc id, start, end) runs: adjacent non-empty spans of one document joined."""
    merged: list[tuple[int | None, int, int]] = []
    for span in spans:
        if span.end <= span.start:
            continue
        if merged and merged[-1][0] == span.doc_id and merged[-1][2] == span.start:
            merged[-1] = (span.doc_id, merged[-1][1], span.end)
        else:
            merged.append((span.doc_id, span.start, span.end))
    return merged


async def build_sources(
    spans: Sequence[TokenSpan],
    token_ids: Sequence[int],
    tokenizer: Tokenizer,
    titles: TitleLookup,
    text_length: int | None = None,
) -> list[Source]:
    """``text_length``: the answer text's length when it is shorter than the tokens' decoding
    (a stop string cut off); character offsets are clipped to it."""
    merged = merge_spans(spans)
    names = await titles([d for d, _, _ in merged if d is not None])
    bounds = sorted({pos for _, start, end in merged for pos in (start, end)})
    chars = char_offsets(tokenizer, token_ids, bounds)
    if text_length is not None:
        chars = [min(c, text_length) for c in chars]
    offsets = dict(zip(bounds, chars, strict=True))
    return [
        Source(
            doc_id=doc_id,
            title=names.get(doc_id, "") if doc_id is not None else "",
            token_start=start,
            token_end=end,
            char_start=offsets[start],
            char_end=offsets[end],
        )
        for doc_id, start, end in merged
    ]
