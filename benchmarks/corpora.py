"""The knowledge bases benchmarks run against: the real one and a filler-grown copy.

``open_corpora`` opens the real index (``--index`` or ``default_index()``) and, for scale
runs, the index with the same real passages plus synthetic filler up to a total size. That
one is made by the project's own builder (``build.open_or_build`` with
``synthetic_filler=N``, which copies the real vectors from the real index when it can instead
of encoding again), once, into the cache dir at the builder's own path for that
configuration (so other benchmarks and ``scale_index`` share it), or into ``--filler-index``.
Every build or reuse is recorded (what, size, seconds) so result files say what the run
paid for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralmspec_vllm.retrieval.build import BuildConfig, default_index_path, open_or_build
from ralmspec_vllm.retrieval.kb import MANIFEST, KnowledgeBase, default_index, scale_index

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
            "path": str(self.kb.path),
            "num_docs": m.num_docs,
            "num_real_docs": m.num_real_docs,
            "num_filler_docs": m.num_filler_docs,
            "source": m.source,
            "encoder": m.encoder,
            "dim": m.dim,
            "build_seconds": m.build_seconds,
            "real_vectors_from": m.params.get("real_vectors_from", ""),
        }


def filler_config(real: KnowledgeBase, total: int) -> BuildConfig:
    """The build configuration of ``real`` grown to ``total`` documents."""
    m = real.manifest
    if m.num_filler_docs:
        raise ValueError(f"index: {real.path} already holds filler; pass a real-only index")
    if total <= m.num_real_docs:
        raise ValueError(f"filler_total: {total} must exceed the {m.num_real_docs} real docs")
    corpus = m.params.get("corpus") if "corpus" in m.sources else None
    return BuildConfig(
        sources=tuple(s for s in m.sources if s != "corpus"),
        corpus=Path(corpus) if corpus else None,
        synthetic_filler=total - m.num_real_docs,
        encoder=m.encoder,
        passage_words=m.passage_words,
        encode_dtype=m.params.get("encode_dtype_requested", "auto"),
    )


def filler_corpus(
    real: KnowledgeBase, total: int, path: str | Path | None = None
) -> tuple[KnowledgeBase, dict[str, Any]]:
    """``real``'s passages plus filler up to ``total`` docs, built once (at ``path``)."""
    cfg = filler_config(real, total)
    out = Path(path) if path else default_index_path(cfg)
    reused = (out / MANIFEST).is_file()
    if not reused:
        logger.info("building the %d-doc filler knowledge base at %s (once)", total, out)
    start = time.perf_counter()
    kb = open_or_build(cfg, out)
    m = kb.manifest
    if m.num_docs != total or m.docs_sha256 != real.manifest.docs_sha256:
        raise ValueError(
            f"filler_index: {out} holds {m.num_docs} docs of other passages than {real.path} "
            f"+ filler to {total}; delete it or pass another --filler-index"
        )
    record = {
        "what": "filler knowledge base",
        "corpus_size": total,
        "seconds": round(time.perf_counter() - start, 1),
        "reused": reused,
        "original_build_seconds": m.build_seconds,
        "real_vectors_reused": bool(m.params.get("real_vectors_from")),
    }
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


def kb_of_size(total: int) -> KnowledgeBase:
    """The default index, grown with synthetic filler to ``total`` documents where it has
    fewer (``scale_index``: built once into the cache dir, then shared); the offline probes'
    knowledge base."""
    base = default_index()
    return scale_index(total - len(base)) if total > len(base) else base


def size_tag(total: int) -> str:
    """``4k``, ``1m``: a corpus size as result files name it."""
    return f"{total // 1000}k" if total < 1_000_000 else f"{total // 10**6}m"
