"""Text sources -> passages: real Wikipedia cut DPR-style, user JSONL, dictd, synthetic filler."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ralmspec_vllm.retrieval.corpus import (
    DICTD_DIR,
    FillerText,
    Passage,
    dict_passages,
    read_jsonl_corpus,
    split_words,
    wiki_passages,
)


@pytest.fixture(scope="module")
def wiki() -> list[Passage]:
    return list(wiki_passages(100))


def test_split_words_makes_disjoint_chunks_with_a_short_tail() -> None:
    text = " ".join(f"w{i}" for i in range(25))
    chunks = split_words(text, 10)
    assert [len(c.split()) for c in chunks] == [10, 10, 5]
    assert " ".join(chunks) == text
    assert split_words("  ", 10) == []
    with pytest.raises(ValueError, match="passage_words"):
        split_words(text, 0)


def test_wiki_passages_are_titled_100_word_chunks_of_real_articles(wiki: list[Passage]) -> None:
    titles = Counter(p.title for p in wiki)
    assert len(titles) == 106  # the real articles; redirects are skipped
    assert 4000 < len(wiki) < 5500
    lengths = [len(p.text.split()) for p in wiki]
    assert max(lengths) == 100
    assert sum(n == 100 for n in lengths) > 0.95 * len(wiki)
    assert wiki[0].title == "Anarchism"
    assert wiki[0].text.startswith("Anarchism is a political philosophy that advocates")
    assert len({p.ext_id for p in wiki}) == len(wiki)
    # Markup is gone: no bold/italic quotes, headings, links or templates.
    joined = " ".join(p.text for p in wiki)
    for junk in ("'''", "[[", "]]", "{{", "==References=="):
        assert junk not in joined
    # Reference-like sections (here an item of a "See also" list) go, article text stays.
    assert "Proudhon" in joined and "Matching Person & Technology Model" not in joined


def test_wiki_passages_are_stable_across_runs(wiki: list[Passage]) -> None:
    again = wiki_passages(100)
    assert [next(again) for _ in range(50)] == wiki[:50]


def test_shorter_passages_cover_the_same_words(wiki: list[Passage]) -> None:
    first = [p for p in wiki_passages(50) if p.title == "Anarchism"]
    original = [p for p in wiki if p.title == "Anarchism"]
    assert " ".join(p.text for p in first) == " ".join(p.text for p in original)
    assert max(len(p.text.split()) for p in first) == 50


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_jsonl_corpus_title_text_and_pyserini_forms(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "c.jsonl",
        [
            {"id": "a1", "title": "Alpha", "text": "first document"},
            {"id": 7, "text": "no title here"},
            "",
            {"id": "p3", "contents": '"Gamma"\nthird document\nwith two lines'},
            {"id": "p4", "contents": "one line contents"},
        ],
    )
    got = list(read_jsonl_corpus(path))
    assert got == [
        Passage("a1", "Alpha", "first document"),
        Passage("7", "", "no title here"),
        Passage("p3", "Gamma", "third document\nwith two lines"),
        Passage("p4", "", "one line contents"),
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"title": "x", "text": "y"}, r"c\.jsonl:2: missing field 'id'"),
        ({"id": "b", "title": "x"}, r"c\.jsonl:2: missing field 'text'"),
        ({"id": "b", "text": "   "}, r"c\.jsonl:2: field 'text' is empty"),
        ({"id": "b", "title": 3, "text": "y"}, r"c\.jsonl:2: field 'title' must be a string"),
        ({"id": "a", "text": "y"}, r"c\.jsonl:2: field 'id' repeats 'a'"),
        ("{not json", r"c\.jsonl:2: invalid JSON"),
        ([1, 2], r"c\.jsonl:2: expected a JSON object"),
    ],
)
def test_jsonl_corpus_rejects_bad_records_naming_line_and_field(
    tmp_path: Path, bad: object, message: str
) -> None:
    path = _write(tmp_path / "c.jsonl", [{"id": "a", "text": "good"}, bad])
    with pytest.raises(ValueError, match=message):
        list(read_jsonl_corpus(path))


def test_missing_dictionary_fails_with_install_hint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dict-foldoc"):
        next(dict_passages("foldoc", root=tmp_path))
    with pytest.raises(ValueError, match="unknown dictionary"):
        next(dict_passages("nope"))


@pytest.mark.skipif(
    not (DICTD_DIR / "foldoc.index").is_file(), reason="dict-foldoc is not installed"
)
def test_foldoc_entries_become_titled_passages() -> None:
    passages = list(dict_passages("foldoc", 100))
    assert len(passages) > 10000
    assert max(len(p.text.split()) for p in passages) <= 100
    assert not any(p.title.startswith("00-database") for p in passages)
    actor = [p for p in passages if p.title == "actor"]
    assert actor and "object-oriented" in actor[0].text and "{" not in actor[0].text


def test_filler_text_is_deterministic_per_doc_id() -> None:
    filler = FillerText.from_texts(["the cat sat on the mat", "the dog ate the bone"], 3, 40)
    batch = filler.texts([100, 101, 102])
    assert filler.texts([102]) == [batch[2]]  # independent of what else is generated
    twin = FillerText.from_json(json.loads(json.dumps(filler.to_json())))
    assert twin.texts([100, 101, 102]) == batch
    assert len(set(batch)) == 3 and all(len(t.split()) == 40 for t in batch)
    other_seed = FillerText(filler.words, filler.counts, 4, 40)
    assert other_seed.texts([100]) != batch[:1]
    docs = filler.documents([101])
    assert docs[0].doc_id == 101 and docs[0].title == "synthetic-101" and docs[0].text == batch[1]


def test_filler_follows_the_real_unigram_distribution(wiki: list[Passage]) -> None:
    filler = FillerText.from_texts((p.text for p in wiki[:500]), 0, 100)
    assert filler.words[0] == "the"  # most frequent first
    sampled = Counter(" ".join(filler.texts(np.arange(10_000, 12_000))).split())
    total = sum(filler.counts)
    expected_the = filler.counts[0] / total
    assert abs(sampled["the"] / 200_000 - expected_the) < 0.005
    assert set(sampled) <= set(filler.words)
