"""Building knowledge-base indexes: ``build_index``, ``default_index`` and ``index build``.

Data flow: sources (``corpus.py``) -> passages in a fixed order -> ``docs.jsonl`` + byte
offsets -> encoder (length-sorted padded batches) -> ``embeddings.npy`` real rows -> filler
vectors and filler vocabulary -> ``manifest.json``. Everything is written into a temporary
sibling folder that is renamed into place at the end, under a lock file next to the target,
so concurrent builders (a server and a test run, say) build once and never see half an index.

Filler vectors (``corpus.filler_vectors``) are perturbed copies of real vectors, so their
neighbourhood structure resembles the real corpus; the manifest records them as synthetic. A
filler build reuses the real vectors of an already-built index of the same passages.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ralmspec_vllm.paths import cache_dir
from ralmspec_vllm.retrieval import corpus as corpus_mod
from ralmspec_vllm.retrieval.encoder import DEFAULT_ENCODER, QueryEncoder
from ralmspec_vllm.retrieval.kb import (
    DOCS,
    EMBEDDINGS,
    FILLER,
    FORMAT_VERSION,
    MANIFEST,
    OFFSETS,
    KnowledgeBase,
    Manifest,
)
from ralmspec_vllm.types import Document

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BuildConfig:
    """What to put into an index."""

    sources: tuple[str, ...] = ("wiki",)
    """Built-in sources in doc-id order (``wiki``, ``gcide``, ``wordnet``, ``foldoc``)."""
    corpus: Path | None = None
    """A user JSONL corpus, appended after the built-in sources."""
    synthetic_filler: int = 0
    """Synthetic filler documents appended after the real ones."""
    encoder: str = DEFAULT_ENCODER
    """Encoder name (or local model folder) for passage and query vectors."""
    passage_words: int = 100
    """Words per passage when cutting built-in sources."""
    batch_size: int = 64
    """Encoder batch size during the build."""
    filler_seed: int = 0
    """Seed of the filler text and vectors."""
    encode_dtype: str = "auto"
    """Passage encoding precision: ``float32``, ``bfloat16`` or ``auto`` (bf16 on AMX CPUs)."""

    def __post_init__(self) -> None:
        for name in self.sources:
            if name not in corpus_mod.SOURCES:
                raise ValueError(f"sources: unknown source {name!r} (known: {corpus_mod.SOURCES})")
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources: repeated source in {self.sources}")
        if not self.sources and self.corpus is None:
            raise ValueError("sources: give at least one source or a corpus file")
        if self.corpus is not None and not Path(self.corpus).is_file():
            raise ValueError(f"corpus: file {self.corpus} not found")
        if self.synthetic_filler < 0:
            raise ValueError(f"synthetic_filler: must be >= 0, got {self.synthetic_filler}")
        if not 1 <= self.passage_words < 1 << 16:
            raise ValueError(f"passage_words: must be in [1, 65535], got {self.passage_words}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.encode_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(
                f"encode_dtype: must be auto, float32 or bfloat16, got {self.encode_dtype!r}"
            )
        if self.filler_seed < 0:
            raise ValueError(f"filler_seed: must be >= 0, got {self.filler_seed}")

    def index_name(self) -> str:
        """Cache-folder name that identifies this configuration."""
        parts = list(self.sources)
        if self.corpus is not None:
            parts.append(f"corpus-{Path(self.corpus).stem}")
        name = f"{'+'.join(parts)}-{Path(self.encoder).name}-p{self.passage_words}"
        if self.synthetic_filler:
            name += f"-filler{self.synthetic_filler}-s{self.filler_seed}"
        return f"{name}-v{FORMAT_VERSION}"


def default_index_path(config: BuildConfig | None = None) -> Path:
    """Where an index of ``config`` (default: real Wikipedia) lives in the cache dir."""
    return cache_dir("indexes") / (config or BuildConfig()).index_name()


def _fill(out: np.ndarray, real: np.ndarray, seed: int) -> Iterator[int]:
    """Write filler vectors 0..len(out)-1 into ``out``, one chunk per thread; yields rows done.

    Each chunk's rows depend only on (seed, chunk), so the threads (numpy releases the GIL
    while drawing and normalising) give the same bytes as one loop: 21M rows take ~20 s
    on 16 cores instead of ~3 minutes.
    """
    step = corpus_mod.FILLER_CHUNK

    def one(lo: int) -> int:
        hi = min(lo + step, len(out))
        out[lo:hi] = corpus_mod.filler_vectors(real, seed, lo, hi)
        return hi - lo

    workers = max(1, min(os.cpu_count() or 1, 16))
    with ThreadPoolExecutor(workers, thread_name_prefix="filler") as pool:
        yield from pool.map(one, range(0, len(out), step))


def _collect(cfg: BuildConfig) -> tuple[list[corpus_mod.Passage], dict[str, int]]:
    passages: list[corpus_mod.Passage] = []
    counts: dict[str, int] = {}
    streams: list[tuple[str, Iterator[corpus_mod.Passage]]] = [
        (name, corpus_mod.source_passages(name, cfg.passage_words)) for name in cfg.sources
    ]
    if cfg.corpus is not None:
        streams.append(("corpus", corpus_mod.read_jsonl_corpus(cfg.corpus)))
    seen: set[str] = set()
    for name, stream in streams:
        before = len(passages)
        for p in stream:
            if p.ext_id in seen:
                raise ValueError(f"{name}: external id {p.ext_id!r} already used by another source")
            seen.add(p.ext_id)
            passages.append(p)
        counts[name] = len(passages) - before
        logger.info("source %s: %d passages", name, counts[name])
    if not passages:
        raise ValueError("sources: no passages to index")
    return passages, counts


def _write_docs(tmp: Path, passages: list[corpus_mod.Passage], show_progress: bool) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    offsets = np.zeros(len(passages) + 1, dtype=np.int64)
    pos = 0
    with (tmp / DOCS).open("wb") as f:
        items = tqdm(passages, desc="writing", unit="doc", disable=not show_progress)
        for i, p in enumerate(items):
            rec = {"id": i, "ext_id": p.ext_id, "title": p.title, "text": p.text}
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            digest.update(line)
            pos += len(line)
            offsets[i + 1] = pos
    np.save(tmp / OFFSETS, offsets)
    return digest.hexdigest()


def _encode_real(
    cfg: BuildConfig, passages: list[corpus_mod.Passage], digest: str, show_progress: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    """Real passage vectors and the parameters that describe them.

    A filler build copies them from the already-built index of the same passages (same
    ``docs.jsonl`` digest and encoder; same precision unless ``auto``) instead of encoding
    again, so a scaled index's real rows equal the base index's exactly.
    """
    params: dict[str, Any] = {
        "batch_size": cfg.batch_size,
        "filler_seed": cfg.filler_seed,
        "encode_dtype_requested": cfg.encode_dtype,
    }
    base = default_index_path(dataclasses.replace(cfg, synthetic_filler=0, filler_seed=0))
    if cfg.synthetic_filler and (base / MANIFEST).is_file():
        kb = KnowledgeBase.open(base)
        m = kb.manifest
        base_dtype = m.params.get("encode_dtype", "float32")
        same_dtype = cfg.encode_dtype in ("auto", base_dtype)
        if m.docs_sha256 == digest and m.encoder == cfg.encoder and same_dtype:
            logger.info("reusing the real passage vectors of %s", base)
            params.update(encode_dtype=base_dtype, real_vectors_from=str(base))
            return np.array(kb.embeddings()[: m.num_real_docs]), params
    encoder = QueryEncoder(
        cfg.encoder, batch_size=cfg.batch_size, batch_invariant=False, dtype=cfg.encode_dtype
    )
    contents = [Document(i, p.title, p.text).contents for i, p in enumerate(passages)]
    with _all_cores():
        real = encoder.encode(contents, show_progress=show_progress)
    params["encode_dtype"] = encoder.dtype
    return real, params


def _build_into(tmp: Path, cfg: BuildConfig, show_progress: bool) -> Manifest:
    from tqdm import tqdm

    started = time.perf_counter()
    passages, counts = _collect(cfg)
    digest = _write_docs(tmp, passages, show_progress)
    real, params = _encode_real(cfg, passages, digest, show_progress)
    n_real, n_filler, dim = len(passages), cfg.synthetic_filler, real.shape[1]
    emb = np.lib.format.open_memmap(
        tmp / EMBEDDINGS, mode="w+", dtype=np.float32, shape=(n_real + n_filler, dim)
    )
    emb[:n_real] = real
    if cfg.corpus is not None:
        params["corpus"] = str(Path(cfg.corpus).resolve())
    if n_filler:
        filler = corpus_mod.FillerText.from_texts(
            (p.text for p in passages), cfg.filler_seed, cfg.passage_words
        )
        (tmp / FILLER).write_text(json.dumps(filler.to_json(), ensure_ascii=False))
        params["filler_text"] = f"{cfg.passage_words} words from the real unigram distribution"
        params["filler_vectors"] = (
            f"normalise(real[r] + {corpus_mod.FILLER_NOISE} * N(0, I) / sqrt(dim))"
        )
        with tqdm(total=n_filler, desc="filler", unit="doc", disable=not show_progress) as bar:
            for done in _fill(emb[n_real:], real, cfg.filler_seed):
                bar.update(done)
    emb.flush()
    del emb
    source = " + ".join(
        [f"{name} ({counts[name]} passages)" for name in cfg.sources]
        + ([f"corpus {cfg.corpus} ({counts['corpus']} documents)"] if cfg.corpus else [])
        + ([f"synthetic filler ({n_filler} documents)"] if n_filler else [])
    )
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        source=source,
        sources=tuple(counts),
        source_counts=counts,
        num_docs=n_real + n_filler,
        num_real_docs=n_real,
        num_filler_docs=n_filler,
        encoder=cfg.encoder,
        dim=dim,
        passage_words=cfg.passage_words,
        params=params,
        docs_sha256=digest,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        build_seconds=round(time.perf_counter() - started, 3),
    )
    (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


@contextlib.contextmanager
def _all_cores() -> Iterator[None]:
    """Encode with every core this process may use (test and vLLM settings pin torch to 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(before, len(os.sched_getaffinity(0))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_locked(out: Path, cfg: BuildConfig, show_progress: bool, force: bool) -> Manifest:
    """Build ``cfg`` into ``out`` atomically; the caller holds ``out``'s lock."""
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not an index; refusing to replace it")
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a builder that died
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an index is meant to be shared
    try:
        manifest = _build_into(tmp, cfg, show_progress)
        old = None
        if out.exists():
            if not force:
                raise FileExistsError(f"{out} exists; pass force=True (--force) to rebuild it")
            old = out.parent / f".{out.name}.tmp-old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built %s: %d docs in %.1f s", out, manifest.num_docs, manifest.build_seconds)
    return manifest


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
    """Build an index into ``out``; ``FileExistsError`` if it exists and ``force`` is off."""
    cfg = BuildConfig(
        sources=tuple(sources),
        corpus=Path(corpus) if corpus is not None else None,
        synthetic_filler=synthetic_filler,
        encoder=encoder,
        passage_words=passage_words,
        batch_size=batch_size,
        filler_seed=filler_seed,
        encode_dtype=encode_dtype,
    )
    path = Path(out).expanduser().resolve()
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to rebuild it")
    with _locked(path):
        _build_locked(path, cfg, show_progress, force)
    return KnowledgeBase.open(path)


def open_or_build(config: BuildConfig, path: Path, show_progress: bool = True) -> KnowledgeBase:
    """Open the index at ``path``, building ``config`` there first if it is not built yet."""
    if not (path / MANIFEST).is_file():
        with _locked(path):
            if not (path / MANIFEST).is_file():  # another process may have built it meanwhile
                logger.info("building index %s (one-time)", path)
                _build_locked(path, config, show_progress, force=True)
    return KnowledgeBase.open(path)


def default_index(show_progress: bool = True) -> KnowledgeBase:
    """The real Wikipedia index, built once into the cache dir and reused afterwards."""
    return open_or_build(BuildConfig(), default_index_path(), show_progress)


def scale_index(num_filler: int, seed: int = 0, show_progress: bool = True) -> KnowledgeBase:
    """The default index plus ``num_filler`` synthetic documents, built once and cached.

    Reuses the default index's real vectors (building that first if needed).
    """
    cfg = BuildConfig(synthetic_filler=num_filler, filler_seed=seed)
    default_index(show_progress)
    return open_or_build(cfg, default_index_path(cfg), show_progress)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="index folder (default: a folder named after the options in the cache dir; "
        "with no options, the default index)",
    )
    parser.add_argument(
        "--source",
        action="append",
        choices=corpus_mod.SOURCES,
        default=None,
        help="built-in text source, repeatable (default: wiki, unless --corpus is given); "
        "gcide/wordnet/foldoc need `apt-get install dict-gcide dict-wn dict-foldoc`",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="your documents: JSONL with id, title, text (or Pyserini's id, contents)",
    )
    parser.add_argument(
        "--synthetic-filler",
        type=int,
        default=0,
        metavar="N",
        help="append N synthetic documents/vectors for scale runs (default: 0)",
    )
    parser.add_argument("--filler-seed", type=int, default=0, help="filler seed (default: 0)")
    parser.add_argument(
        "--encoder", default=DEFAULT_ENCODER, help=f"dense encoder (default: {DEFAULT_ENCODER})"
    )
    parser.add_argument(
        "--passage-words",
        type=int,
        default=100,
        help="words per passage for built-in sources (default: 100)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch (default: 64)")
    parser.add_argument(
        "--encode-dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="passage encoding precision (default: auto = bfloat16 on CPUs with AMX, on CUDA)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild if the index exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    sources = tuple(args.source or (() if args.corpus else ("wiki",)))
    try:
        cfg = BuildConfig(
            sources=sources,
            corpus=args.corpus,
            synthetic_filler=args.synthetic_filler,
            encoder=args.encoder,
            passage_words=args.passage_words,
            batch_size=args.batch_size,
            filler_seed=args.filler_seed,
            encode_dtype=args.encode_dtype,
        )
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    out = (args.out or default_index_path(cfg)).expanduser().resolve()
    if (out / MANIFEST).is_file() and not args.force:
        print(f"index already built at {out} (use --force to rebuild)")
        return 0
    try:
        with _locked(out):
            manifest = _build_locked(out, cfg, not args.no_progress, force=True)
    except (OSError, ValueError) as exc:
        logger.error("index build failed: %s", exc)
        return 1
    print(
        f"built {out}: {manifest.source}; {manifest.num_docs} docs, dim {manifest.dim}, "
        f"{manifest.build_seconds:.1f} s"
    )
    return 0
