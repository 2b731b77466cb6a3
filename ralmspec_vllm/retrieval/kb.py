"""The knowledge base: a versioned on-disk index of passages and their vectors.

Layout of an index folder (``FORMAT_VERSION`` 1)::

    manifest.json        what was built: sources, counts, encoder, parameters (``Manifest``)
    docs.jsonl           real passages in doc-id order: {"id", "ext_id", "title", "text"}
    docs.offsets.npy     int64 byte offsets of each line (num_real_docs + 1), O(1) access
    embeddings.npy       float32 (num_docs, dim), real rows then filler rows (memory-mapped)
    filler.json          vocabulary, counts and seed of the synthetic filler text
    artifacts/<name>/    backend artefacts (FAISS, BM25 ...), created on demand

Doc ids are ``0..N-1``: real passages first in source order, then synthetic filler. Filler
text is never stored: ``FillerText`` regenerates it from (seed, doc id). ``build_index``
writes into a temporary sibling folder and renames it into place, so readers never see a
half-built index; ``default_index`` builds the real Wikipedia index once into the cache dir,
under a lock file, and reuses it afterwards. ``build.py`` does the building (and is the
``ralmspec-vllm index build`` CLI); ``build_index``/``default_index`` here forward to it.
"""

from __future__ import annotations

import json
import logging
import mmap
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ralmspec_vllm.retrieval.corpus import FillerText
from ralmspec_vllm.retrieval.encoder import DEFAULT_ENCODER, QueryEncoder, encoder_for
from ralmspec_vllm.types import Document

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DOCS = "docs.jsonl"
OFFSETS = "docs.offsets.npy"
EMBEDDINGS = "embeddings.npy"
FILLER = "filler.json"
ARTIFACTS = "artifacts"


@dataclass(frozen=True)
class Manifest:
    """What an index holds and how it was built (stored as ``manifest.json``)."""

    format_version: int
    """On-disk layout version; ``KnowledgeBase.open`` refuses any other."""
    source: str
    """Human-readable description of where the real passages came from."""
    sources: tuple[str, ...]
    """Source names in doc-id order (``wiki``, ``gcide``, ..., ``corpus``)."""
    source_counts: dict[str, int]
    """Passages contributed by each source."""
    num_docs: int
    """Total documents: real plus synthetic filler."""
    num_real_docs: int
    """Real passages (doc ids ``0..num_real_docs-1``)."""
    num_filler_docs: int
    """Synthetic filler documents (the ids after the real ones)."""
    encoder: str
    """Encoder name that produced the vectors (also the one for queries)."""
    dim: int
    """Vector dimension."""
    passage_words: int
    """Words per passage when built-in sources were cut DPR-style."""
    params: dict[str, Any] = field(default_factory=dict)
    """Other build parameters (filler seed and recipe, batch size, corpus file, ...)."""
    docs_sha256: str = ""
    """SHA-256 of ``docs.jsonl``: equal digests mean equal ids, titles and texts."""
    created: str = ""
    """UTC build time, ISO 8601."""
    build_seconds: float = 0.0
    """Wall time of the build."""

    def __post_init__(self) -> None:
        if self.num_real_docs < 1:
            raise ValueError(
                f"num_real_docs: need at least one real document, got {self.num_real_docs}"
            )
        if self.num_filler_docs < 0:
            raise ValueError(f"num_filler_docs: must be >= 0, got {self.num_filler_docs}")
        if self.num_docs != self.num_real_docs + self.num_filler_docs:
            raise ValueError(
                f"num_docs: {self.num_docs} != num_real_docs {self.num_real_docs} + "
                f"num_filler_docs {self.num_filler_docs}"
            )
        if self.dim < 1:
            raise ValueError(f"dim: must be >= 1, got {self.dim}")
        if self.passage_words < 1:
            raise ValueError(f"passage_words: must be >= 1, got {self.passage_words}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        obj = json.loads(text)
        obj["sources"] = tuple(obj.get("sources", ()))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in obj.items() if k in known})


class KBDocuments:
    """``DocumentStore`` over an index folder: real passages by byte offset, filler by hash."""

    def __init__(self, path: Path, manifest: Manifest, filler: FillerText | None) -> None:
        self._num_docs = manifest.num_docs
        self._num_real = manifest.num_real_docs
        self._offsets = np.load(path / OFFSETS)
        self._filler = filler
        with (path / DOCS).open("rb") as f:
            self._blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __len__(self) -> int:
        return self._num_docs

    def check(self, doc_ids: Sequence[int]) -> list[int]:
        """``doc_ids`` as ints; ``KeyError`` naming the first id outside ``0..N-1``."""
        out = []
        for doc_id in doc_ids:
            if isinstance(doc_id, bool) or not isinstance(doc_id, int | np.integer):
                raise KeyError(f"unknown doc id {doc_id!r}: not an integer")
            if not 0 <= int(doc_id) < self._num_docs:
                raise KeyError(
                    f"unknown doc id {int(doc_id)} "
                    f"(this knowledge base has ids 0..{self._num_docs - 1})"
                )
            out.append(int(doc_id))
        return out

    def record(self, doc_id: int) -> dict[str, Any]:
        """The stored JSON record of a real passage (includes ``ext_id``)."""
        start, stop = int(self._offsets[doc_id]), int(self._offsets[doc_id + 1])
        rec: dict[str, Any] = json.loads(self._blob[start:stop])
        return rec

    def get(self, doc_ids: Sequence[int]) -> list[Document]:
        ids = self.check(doc_ids)
        filler_ids = [i for i in ids if i >= self._num_real]
        filler: dict[int, Document] = {}
        if filler_ids:
            assert self._filler is not None
            filler = {d.doc_id: d for d in self._filler.documents(filler_ids)}
        docs = []
        for i in ids:
            if i >= self._num_real:
                docs.append(filler[i])
            else:
                rec = self.record(i)
                docs.append(Document(i, rec["title"], rec["text"]))
        return docs

    def close(self) -> None:
        self._blob.close()


class KnowledgeBase:
    """An opened index folder (see the module docstring for its layout)."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        filler = None
        if manifest.num_filler_docs:
            filler = FillerText.from_json(json.loads((path / FILLER).read_text()))
        self.filler = filler
        self.documents = KBDocuments(path, manifest, filler)
        self._embeddings: np.ndarray | None = None
        self._ext_index: dict[str, int] | None = None

    @classmethod
    def open(cls, path: str | Path) -> KnowledgeBase:
        path = Path(path).expanduser().resolve()
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{path} is not a knowledge-base index (no {MANIFEST})")
        manifest = Manifest.from_json(manifest_path.read_text())
        if manifest.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version: index {path} has layout {manifest.format_version}, this "
                f"version reads {FORMAT_VERSION}; rebuild it with "
                "`ralmspec-vllm index build --force`"
            )
        for name in (DOCS, OFFSETS, EMBEDDINGS):
            if not (path / name).is_file():
                raise FileNotFoundError(f"index {path} is incomplete: {name} is missing")
        return cls(path, manifest)

    def __len__(self) -> int:
        return self.manifest.num_docs

    def __repr__(self) -> str:
        m = self.manifest
        return f"KnowledgeBase({str(self.path)!r}, docs={m.num_docs}, filler={m.num_filler_docs})"

    def embeddings(self) -> np.ndarray:
        """float32 (num_docs, dim), row i = doc id i (memory-mapped, read-only)."""
        if self._embeddings is None:
            emb = np.load(self.path / EMBEDDINGS, mmap_mode="r")
            if emb.shape != (self.manifest.num_docs, self.manifest.dim) or emb.dtype != np.float32:
                raise ValueError(
                    f"embeddings: {self.path / EMBEDDINGS} has shape {emb.shape} {emb.dtype}, "
                    f"manifest says ({self.manifest.num_docs}, {self.manifest.dim}) float32"
                )
            self._embeddings = emb
        return self._embeddings

    def iter_texts(self, batch_size: int = 10000, filler: bool = True) -> Iterator[list[str]]:
        """``Document.contents`` of every doc in id order, in lists of at most ``batch_size``
        (the real passages only if ``filler`` is False)."""
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        batch: list[str] = []
        with (self.path / DOCS).open("rb") as f:
            for line in f:
                rec = json.loads(line)
                batch.append(Document(rec["id"], rec["title"], rec["text"]).contents)
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch
        if filler:
            yield from self.iter_filler_texts(batch_size)

    def iter_filler_texts(self, batch_size: int = 10000) -> Iterator[list[str]]:
        """``Document.contents`` of the synthetic filler docs in id order (none if no filler)."""
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        m = self.manifest
        for start in range(m.num_real_docs, m.num_docs, batch_size):
            ids = range(start, min(start + batch_size, m.num_docs))
            assert self.filler is not None
            yield [d.contents for d in self.filler.documents(ids)]

    def encoder(self) -> QueryEncoder:
        """The (process-shared, batch-invariant) encoder named in the manifest."""
        return encoder_for(self.manifest.encoder)

    def artifact_dir(self, name: str) -> Path:
        """``artifacts/<name>`` inside the index, created on demand."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"name: invalid artefact name {name!r}")
        path = self.path / ARTIFACTS / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def external_id(self, doc_id: int) -> str:
        """The source's own id of a document (``synthetic-<id>`` for filler)."""
        (doc_id,) = self.documents.check([doc_id])
        if doc_id >= self.manifest.num_real_docs:
            return FillerText.title(doc_id)
        return str(self.documents.record(doc_id)["ext_id"])

    def doc_id_of(self, ext_id: str) -> int:
        """Internal doc id of a real document's external id (``KeyError`` if unknown)."""
        if self._ext_index is None:
            index: dict[str, int] = {}
            with (self.path / DOCS).open("rb") as f:
                for line in f:
                    rec = json.loads(line)
                    index[rec["ext_id"]] = rec["id"]
            self._ext_index = index
        return self._ext_index[ext_id]


def default_index_path() -> Path:
    """Where ``default_index`` keeps the real Wikipedia index (inside the cache dir)."""
    from ralmspec_vllm.retrieval import build

    return build.default_index_path()


def build_index(
    out: str | Path,
    sources: Sequence[str] = ("wiki",),
    corpus: str | Path | None = None,
    synthetic_filler: int = 0,
    encoder: str = DEFAULT_ENCODER,
    passage_words: int = 100,
    show_progress: bool = True,
    batch_size: int = 64,
    force: bool = False,
    filler_seed: int = 0,
    encode_dtype: str = "auto",
) -> KnowledgeBase:
    """Build an index into ``out`` (see ``build.build_index``, where the work is done)."""
    from ralmspec_vllm.retrieval import build

    return build.build_index(
        out,
        sources=sources,
        corpus=corpus,
        synthetic_filler=synthetic_filler,
        encoder=encoder,
        passage_words=passage_words,
        show_progress=show_progress,
        batch_size=batch_size,
        force=force,
        filler_seed=filler_seed,
        encode_dtype=encode_dtype,
    )


def default_index(show_progress: bool = True) -> KnowledgeBase:
    """The real Wikipedia index, built once into the cache dir and reused afterwards."""
    from ralmspec_vllm.retrieval import build

    return build.default_index(show_progress=show_progress)


def scale_index(num_filler: int, seed: int = 0, show_progress: bool = True) -> KnowledgeBase:
    """The default index plus ``num_filler`` synthetic documents (built once, cached)."""
    from ralmspec_vllm.retrieval import build

    return build.scale_index(num_filler, seed=seed, show_progress=show_progress)
