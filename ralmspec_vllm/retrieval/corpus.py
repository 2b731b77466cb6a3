"""Sources of knowledge-base text, turned into passages; synthetic filler text for scale runs.

Every source yields ``Passage`` records (external id, title, text) in a fixed order, so
building an index twice gives the same passages under the same internal doc ids:

- ``wiki``: the real English Wikipedia excerpt shipped in gensim 4.4.0's test data
  (~106 articles). Markup is stripped with gensim's ``filter_wiki`` plus a few cleanups
  (bold/italic quotes, headings, list bullets, reference-like sections), then each article is
  cut DPR-style into disjoint ``passage_words``-word passages titled with the article title.
- ``gcide``, ``wordnet``, ``foldoc``: Debian dictd dictionaries (``apt-get install dict-gcide
  dict-wn dict-foldoc``), one entry per headword cut the same way.
- a user JSONL file: one document per line, either ``{"id", "title", "text"}`` (title
  optional) or Pyserini's ``{"id", "contents"}`` where, when ``contents`` spans several lines,
  the first line is the title (surrounding double quotes removed, as in Pyserini's DPR
  Wikipedia) and the rest the text. User documents are kept whole, not re-cut.

``FillerText`` makes deterministic synthetic passages: words drawn from the real corpus's own
unigram distribution (Zipf-like by nature) with a counter-based hash of (seed, doc id,
position), so any filler document is generated in O(1) without storing it; ``filler_vectors`` makes
their vectors as perturbed copies of real ones.
"""

from __future__ import annotations

import bz2
import gzip
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ralmspec_vllm.jsonl import read_objects
from ralmspec_vllm.types import Document

DICTD_DIR = Path("/usr/share/dictd")
# source name -> (dictd file stem, Debian package)
DICTIONARIES: dict[str, tuple[str, str]] = {
    "gcide": ("gcide", "dict-gcide"),
    "wordnet": ("wn", "dict-wn"),
    "foldoc": ("foldoc", "dict-foldoc"),
}
SOURCES: tuple[str, ...] = ("wiki", *DICTIONARIES)
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_DROP_SECTIONS = {
    "see also",
    "references",
    "external links",
    "further reading",
    "notes",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
    "notes and references",
}
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class Passage:
    """A passage before it gets an internal doc id; ``ext_id`` is the source's own id."""

    ext_id: str
    title: str
    text: str


def split_words(text: str, passage_words: int) -> list[str]:
    """Disjoint chunks of ``passage_words`` whitespace words (the last may be shorter)."""
    if passage_words < 1:
        raise ValueError(f"passage_words: must be >= 1, got {passage_words}")
    words = text.split()
    return [" ".join(words[i : i + passage_words]) for i in range(0, len(words), passage_words)]


# --------------------------------------------------------------------------- Wikipedia


def wiki_dump_path() -> Path:
    """The Wikipedia excerpt inside the installed gensim package."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("source 'wiki' needs gensim==4.4.0 (pip install gensim==4.4.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"source 'wiki': {path} not found (gensim 4.4.0 ships it)")
    return path


def clean_wiki(markup: str) -> str:
    """Plain article text: gensim's markup filter, then headings, bullets and ref sections."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup).replace("'''", "").replace("''", "")
    kept: list[str] = []
    dropping = False
    for line in text.split("\n"):
        heading = _HEADING.match(line)
        if heading:
            dropping = heading.group(2).strip().lower() in _DROP_SECTIONS
            continue
        line = line.strip().lstrip("*#:;").strip()
        if dropping or not line or line[0] in "|!{}":
            continue
        kept.append(line)
    return _SPACES.sub(" ", " ".join(kept)).strip()


def wiki_passages(passage_words: int = 100, path: Path | None = None) -> Iterator[Passage]:
    """DPR-style passages of the real Wikipedia articles (redirects skipped)."""
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(path or wiki_dump_path()) as f:
        for title, markup, page_id in extract_pages(f, filter_namespaces=("0",)):
            if markup.lstrip()[:9].upper() == "#REDIRECT":
                continue
            for k, chunk in enumerate(split_words(clean_wiki(markup), passage_words)):
                yield Passage(f"enwiki-{page_id}-{k}", title, chunk)


# --------------------------------------------------------------------------- dictd

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(code: str) -> int:
    value = 0
    for ch in code:
        value = value * 64 + _B64.index(ch)
    return value


def _clean_entry(headword: str, body: str) -> str:
    lines = [ln.strip() for ln in body.split("\n")]
    if lines and lines[0].lower() == headword.lower():
        lines = lines[1:]
    lines = [ln for ln in lines if ln and ln != "[1913 Webster]"]
    text = " ".join(lines).replace("{", "").replace("}", "")
    return _SPACES.sub(" ", text).strip()


def dict_passages(name: str, passage_words: int = 100, root: Path = DICTD_DIR) -> Iterator[Passage]:
    """Passages of a Debian dictd dictionary (``gcide``, ``wordnet`` or ``foldoc``)."""
    if name not in DICTIONARIES:
        raise ValueError(f"source: unknown dictionary {name!r} (known: {sorted(DICTIONARIES)})")
    stem, package = DICTIONARIES[name]
    index, data_path = root / f"{stem}.index", root / f"{stem}.dict.dz"
    if not index.is_file() or not data_path.is_file():
        raise FileNotFoundError(
            f"source {name!r}: {data_path} not found; install it with `apt-get install {package}`"
        )
    with gzip.open(data_path) as f:
        data = f.read()
    seen: set[tuple[int, int]] = set()
    entry = 0
    for line in index.read_text(encoding="utf-8", errors="replace").split("\n"):
        parts = line.split("\t")
        if (
            len(parts) < 3
            or parts[0].startswith("00-database")
            or parts[0].startswith("00database")
        ):
            continue
        loc = (_dictd_number(parts[1]), _dictd_number(parts[2]))
        if loc in seen:
            continue
        seen.add(loc)
        body = data[loc[0] : loc[0] + loc[1]].decode("utf-8", errors="replace")
        for k, chunk in enumerate(split_words(_clean_entry(parts[0], body), passage_words)):
            yield Passage(f"{name}-{entry}-{k}", parts[0], chunk)
        entry += 1


def source_passages(name: str, passage_words: int = 100) -> Iterator[Passage]:
    """Passages of a named built-in source (see ``SOURCES``)."""
    if name == "wiki":
        return wiki_passages(passage_words)
    return dict_passages(name, passage_words)


# --------------------------------------------------------------------------- user JSONL


def _field(obj: dict[str, object], key: str, where: str, required: bool = True) -> str:
    if key not in obj:
        if required:
            raise ValueError(f"{where}: missing field {key!r}")
        return ""
    value = obj[key]
    if key == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def read_jsonl_corpus(path: str | Path) -> Iterator[Passage]:
    """Documents of a user JSONL file (``id``/``title``/``text`` or ``id``/``contents``).

    Raises ``ValueError`` naming the line and field of the first malformed record.
    """
    seen: set[str] = set()
    for where, obj in read_objects(path):
        ext_id = _field(obj, "id", where)
        if "text" in obj or "contents" not in obj:
            title, text = _field(obj, "title", where, False), _field(obj, "text", where)
        else:
            contents = _field(obj, "contents", where)
            title, _, text = contents.partition("\n") if "\n" in contents else ("", "", contents)
            if len(title) >= 2 and title[0] == title[-1] == '"':
                title = title[1:-1]
        if not text.strip():
            raise ValueError(f"{where}: field 'text' is empty")
        if ext_id in seen:
            raise ValueError(f"{where}: field 'id' repeats {ext_id!r}")
        seen.add(ext_id)
        yield Passage(ext_id, title.strip(), text.strip())


# --------------------------------------------------------------------------- filler

FILLER_CHUNK = 65536
FILLER_NOISE = 0.5
FILLER_TITLE_PREFIX = "synthetic-"
"""A filler document's title (and external id) is this prefix and its doc id."""
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


class FillerText:
    """Deterministic synthetic passages over a real vocabulary (doc id -> text in O(1))."""

    def __init__(self, words: Sequence[str], counts: Sequence[int], seed: int, num_words: int):
        if not words or len(words) != len(counts):
            raise ValueError("words: need a non-empty vocabulary with one count per word")
        if not 1 <= num_words < 1 << 16:
            raise ValueError(f"num_words: must be in [1, 65535], got {num_words}")
        self.words = list(words)
        self.counts = [int(c) for c in counts]
        self.seed = int(seed)
        self.num_words = num_words
        self._vocab = np.array(self.words, dtype=object)
        self._cdf = np.cumsum(np.asarray(self.counts, dtype=np.float64))
        self._key = _splitmix64(np.array([self.seed & (2**64 - 1)], dtype=np.uint64))[0]

    @classmethod
    def from_texts(cls, texts: Iterable[str], seed: int, num_words: int) -> FillerText:
        """Vocabulary and unigram counts of ``texts`` (most frequent first, ties by word)."""
        counter: Counter[str] = Counter()
        for text in texts:
            counter.update(text.split())
        ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([w for w, _ in ranked], [c for _, c in ranked], seed, num_words)

    def to_json(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "num_words": self.num_words,
            "words": self.words,
            "counts": self.counts,
        }

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> FillerText:
        return cls(obj["words"], obj["counts"], obj["seed"], obj["num_words"])  # type: ignore[arg-type]

    def word_indices(self, doc_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Each document's words as indices into ``words``: int64, (len(doc_ids), num_words).
        ``texts`` joins these words with spaces; a BM25 build counts them without the text."""
        ids = np.asarray(doc_ids, dtype=np.uint64).reshape(-1, 1)
        pos = np.arange(self.num_words, dtype=np.uint64).reshape(1, -1)
        h = _splitmix64(((ids << np.uint64(16)) | pos) ^ self._key)
        u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
        return np.searchsorted(self._cdf, u * self._cdf[-1], side="right")

    def texts(self, doc_ids: Sequence[int] | np.ndarray) -> list[str]:
        """Texts of the filler documents ``doc_ids`` (any ids; same id, same text)."""
        return [" ".join(row) for row in self._vocab[self.word_indices(doc_ids)]]

    @staticmethod
    def title(doc_id: int) -> str:
        """A filler document's title: ``synthetic-<doc id>``."""
        return f"{FILLER_TITLE_PREFIX}{int(doc_id)}"

    def documents(self, doc_ids: Sequence[int]) -> list[Document]:
        return [
            Document(int(i), self.title(i), text)
            for i, text in zip(doc_ids, self.texts(doc_ids), strict=True)
        ]


def filler_vectors(real: np.ndarray, seed: int, start: int, stop: int) -> np.ndarray:
    """Filler vectors ``start..stop-1`` (filler ordinals, not doc ids), unit norm.

    Row j is ``normalise(real[r] + FILLER_NOISE * g / sqrt(dim))`` with ``r`` and the Gaussian
    ``g`` drawn from ``default_rng([seed, j // FILLER_CHUNK])``, so a row does not depend on
    how many rows are made, and filler vectors cluster like the real ones.
    """
    n_real, dim = real.shape
    out = np.empty((stop - start, dim), dtype=np.float32)
    for chunk in range(
        start // FILLER_CHUNK, (stop - 1) // FILLER_CHUNK + 1 if stop > start else 0
    ):
        rng = np.random.default_rng([seed, chunk])
        src = rng.integers(0, n_real, size=FILLER_CHUNK)
        noise = rng.standard_normal((FILLER_CHUNK, dim), dtype=np.float32)
        lo, hi = max(start, chunk * FILLER_CHUNK), min(stop, (chunk + 1) * FILLER_CHUNK)
        rows = slice(lo - chunk * FILLER_CHUNK, hi - chunk * FILLER_CHUNK)
        vecs = real[src[rows]] + noise[rows] * np.float32(FILLER_NOISE / np.sqrt(dim))
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        out[lo - start : hi - start] = vecs
    return out
