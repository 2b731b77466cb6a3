"""The text analyzer BM25 uses for documents and queries alike.

``Analyzer`` turns text into index terms: lowercase (``str.lower``), split on runs of
non-word characters (``\\W+``, Unicode-aware: ``é``, ``ß`` and CJK characters are word
characters; ``_`` and digits too), drop empty pieces, then optionally drop English stopwords
(Lucene's 33-word ``EnglishAnalyzer`` list, which Anserini/Pyserini also use by default).
No stemming. The same analyzer must tokenise the corpus and the queries, and the speculation
cache uses it to score cached documents, so the BM25 index records the analyzer it was built
with (``Analyzer.to_dict`` / ``from_dict``) and refuses a different one at load time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET (also Anserini's default).
ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    {
        *("a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into"),
        *("is", "it", "no", "not", "of", "on", "or", "such", "that", "the", "their", "then"),
        *("there", "these", "they", "this", "to", "was", "will", "with"),
    }
)

# ``findall(\w+)`` is exactly "split on \W+ and drop the empty strings", in one C pass.
_WORD = re.compile(r"\w+")


@dataclass(frozen=True, slots=True)
class Analyzer:
    """Lowercase + ``\\W+`` split + optional English stopword removal."""

    lowercase: bool = True
    """Lowercase the text (``str.lower``) before splitting."""
    stopwords: bool = True
    """Drop the terms in ``ENGLISH_STOPWORDS`` (after lowercasing)."""

    def __call__(self, text: str) -> list[str]:
        """Index terms of ``text`` in order, with repetitions (BM25 counts them)."""
        if self.lowercase:
            text = text.lower()
        terms = _WORD.findall(text)
        if self.stopwords:
            stop = ENGLISH_STOPWORDS
            return [t for t in terms if t not in stop]
        return terms

    @property
    def name(self) -> str:
        """Short description, used in artefact names and ``RetrieverInfo.extra``."""
        parts = ["word"]
        if self.lowercase:
            parts.append("lower")
        if self.stopwords:
            parts.append("stop-en")
        return "-".join(parts)

    def to_dict(self) -> dict[str, bool]:
        return {"lowercase": self.lowercase, "stopwords": self.stopwords}

    @classmethod
    def from_dict(cls, data: dict[str, bool]) -> Analyzer:
        return cls(lowercase=bool(data["lowercase"]), stopwords=bool(data["stopwords"]))

    @classmethod
    def from_name(cls, name: str) -> Analyzer:
        """The analyzer ``name`` describes (``RetrieverInfo.extra["analyzer"]``: how a client
        of a BM25 retriever analyzes queries exactly as the retriever does)."""
        for analyzer in (cls(lc, sw) for lc in (True, False) for sw in (True, False)):
            if analyzer.name == name:
                return analyzer
        raise ValueError(f"unknown analyzer {name!r}")
