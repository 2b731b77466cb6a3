"""The knowledge bases benchmarks run against: the real one and a filler-grown copy.

``open_corpora`` opens the real index (``--index`` or ``default_index()``) and, for scale
runs, an index with the same real passages plus synthetic filler up to a total size. The
filler index is built once into the cache dir (``bench/<real-name>-filler<total>``) and
reused by later runs; every build or reuse is recorded (what, size, seconds) so result files
say what the run paid for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralmspec_vllm.paths import cache_dir
from ralmspec_vllm.retrieval.kb import MANIFEST, KnowledgeBase, build_index, default_index

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Corpus:
    """One opened knowledge base and which benchmark size it stands for."""

    kind: str
    """``real`` or ``filler``."""
    kb: KnowledgeBase

    @property
    def size(self) -> int:
        return self.kb.manifest.num_docs

    @property
    def num_real_docs(self) -> int:
        return self.kb.manifest.num_real_docs

    def describe(self) -> dict[str, Any]:
        m = self.kb.manifest
        return {
            "kind": self.kind,
            "num_docs": m.num_docs,
            "num_real_docs": m.num_real_docs,
            "num_filler_docs": m.num_filler_docs,
            "source": m.source,
            "encoder": m.encoder,
            "dim": m.dim,
        }


def filler_path(real: KnowledgeBase, total: int) -> Path:
    return cache_dir("bench") / f"{real.path.name}-filler{total}"


def filler_corpus(
    real: KnowledgeBase, total: int, path: str | Path | None = None
) -> tuple[KnowledgeBase, dict[str, Any]]:
    """``real``'s passages plus filler up to ``total`` docs, built once at ``path``."""
    m = real.manifest
    if m.num_filler_docs:
        raise ValueError(f"index: {real.path} already holds filler; pass a real-only index")
    if total < m.num_real_docs:
        raise ValueError(f"filler_total: {total} is below the {m.num_real_docs} real docs")
    out = Path(path) if path else filler_path(real, total)
    record: dict[str, Any] = {"what": "filler knowledge base", "corpus_size": total}
    if (out / MANIFEST).is_file():
        kb = KnowledgeBase.open(out)
        if kb.manifest.num_docs == total and kb.manifest.docs_sha256 == m.docs_sha256:
            record.update(seconds=0.0, reused=True, path=str(out))
            record["original_build_seconds"] = kb.manifest.build_seconds
            return kb, record
        logger.warning("%s does not match %s/%d docs; rebuilding it", out, real.path, total)
    sources = [s for s in m.sources if s != "corpus"]
    corpus = m.params.get("corpus") if "corpus" in m.sources else None
    logger.info("building the %d-doc filler knowledge base at %s (once)", total, out)
    start = time.perf_counter()
    kb = build_index(
        out,
        sources=sources,
        corpus=corpus,
        synthetic_filler=total - m.num_real_docs,
        encoder=m.encoder,
        passage_words=m.passage_words,
        force=True,
    )
    record.update(seconds=round(time.perf_counter() - start, 1), reused=False, path=str(out))
    return kb, record


def open_corpora(
    index: str | Path | None,
    filler_index: str | Path | None,
    sizes: Sequence[str],
    filler_total: int,
) -> tuple[list[Corpus], list[dict[str, Any]]]:
    """The corpora for ``sizes`` (``real``/``filler``) and a record of each build."""
    real = KnowledgeBase.open(index) if index else default_index()
    corpora: list[Corpus] = []
    builds: list[dict[str, Any]] = []
    if "real" in sizes:
        corpora.append(Corpus("real", real))
    if "filler" in sizes:
        kb, record = filler_corpus(real, filler_total, filler_index)
        corpora.append(Corpus("filler", kb))
        builds.append(record)
    return corpora, builds
