"""HNSW and IVF-Flat: exact neighbours with generous parameters, exact scores, save/load."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from ralmspec_vllm.retrieval.ann import (
    INDEX_FILE,
    META_FILE,
    HNSWRetriever,
    IVFFlatRetriever,
    default_nlist,
)
from ralmspec_vllm.retrieval.base import DenseRetriever
from ralmspec_vllm.retrieval.flat import FlatRetriever

from .synthetic import NUM_DOCS, SyntheticCorpus, brute_force


def _hnsw(corpus: SyntheticCorpus, path: Path | None = None, **params: object) -> HNSWRetriever:
    params = {"m": 16, "ef_construction": 200, "ef_search": 400, "progress": False, **params}
    return HNSWRetriever(
        corpus.vectors,
        corpus.documents,
        corpus.encoder,
        index_path=path,
        **params,  # type: ignore[arg-type]
    )


def _ivf(corpus: SyntheticCorpus, path: Path | None = None, **params: object) -> IVFFlatRetriever:
    params = {"nlist": 12, "nprobe": 12, "progress": False, **params}
    return IVFFlatRetriever(
        corpus.vectors,
        corpus.documents,
        corpus.encoder,
        index_path=path,
        **params,  # type: ignore[arg-type]
    )


def _ivf_sq8(
    corpus: SyntheticCorpus, path: Path | None = None, **params: object
) -> IVFFlatRetriever:
    return _ivf(corpus, path, codec="sq8", **params)


def _ivf_torch(
    corpus: SyntheticCorpus, path: Path | None = None, **params: object
) -> IVFFlatRetriever:
    """Centroids and list assignments from ``retrieval/kmeans.py`` (torch on the CPU here;
    ``ivf_build="cuda"`` on a GPU)."""
    return _ivf(corpus, path, build_device="cpu", **params)


def _ivf_sq8_torch(
    corpus: SyntheticCorpus, path: Path | None = None, **params: object
) -> IVFFlatRetriever:
    return _ivf(corpus, path, codec="sq8", build_device="cpu", **params)


BUILDERS = {
    "hnsw": _hnsw,
    "ivf": _ivf,
    "ivf-sq8": _ivf_sq8,
    "ivf-torch": _ivf_torch,
    "ivf-sq8-torch": _ivf_sq8_torch,
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def ann(
    request: pytest.FixtureRequest, corpus: SyntheticCorpus
) -> HNSWRetriever | IVFFlatRetriever:
    return BUILDERS[request.param](corpus)


@pytest.mark.parametrize("k", [1, 10])
def test_generous_parameters_find_exact_neighbours(
    ann: HNSWRetriever | IVFFlatRetriever, corpus: SyntheticCorpus, k: int
) -> None:
    hits = ann.search(corpus.queries, k)
    assert [[h.doc_id for h in row] for row in hits] == brute_force(
        corpus.query_vectors, corpus.vectors, k
    )
    flat = FlatRetriever(corpus.vectors, corpus.documents, corpus.encoder)
    assert hits == flat.search(corpus.queries, k)


def test_reported_scores_equal_score(
    ann: HNSWRetriever | IVFFlatRetriever, corpus: SyntheticCorpus
) -> None:
    rng = np.random.default_rng(11)
    queries = rng.standard_normal((20, corpus.vectors.shape[1])).astype(np.float32)
    for query, row in zip(queries, ann.search_vectors(queries, 15), strict=True):
        ids = [h.doc_id for h in row]
        assert [h.score for h in row] == ann.score_vector(query, ids)
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
    for query, row in zip(corpus.queries, ann.search(corpus.queries, 5), strict=True):
        assert [h.score for h in row] == ann.score(query, [h.doc_id for h in row])


def test_protocol_and_info(ann: HNSWRetriever | IVFFlatRetriever) -> None:
    assert isinstance(ann, DenseRetriever)
    info = ann.info
    assert info.num_docs == NUM_DOCS and info.metric == "inner_product"
    if info.backend == "hnsw":
        assert (info.extra["hnsw_m"], info.extra["ef_search"]) == ("16", "400")
    else:
        assert (info.extra["nlist"], info.extra["nprobe"]) == ("12", "12")


def test_tiny_search_parameters_still_return_k_exact_scores(corpus: SyntheticCorpus) -> None:
    # efSearch below k must not shrink the result list; nprobe=1 reads one list only.
    for retriever in (_hnsw(corpus, ef_search=1), _ivf(corpus, nprobe=1)):
        rows = retriever.search_vectors(corpus.query_vectors, 20)
        for query, row in zip(corpus.query_vectors, rows, strict=True):
            ids = [h.doc_id for h in row]
            assert len(set(ids)) == 20
            assert [h.score for h in row] == retriever.score_vector(query, ids)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_save_load_round_trip(
    kind: str, corpus: SyntheticCorpus, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / kind / INDEX_FILE
    built = BUILDERS[kind](corpus, path)
    assert path.is_file() and (path.parent / META_FILE).is_file()
    stamp = path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="ralmspec_vllm.retrieval.ann"):
        loaded = BUILDERS[kind](corpus, path)
    assert "loading" in caplog.text and path.stat().st_mtime_ns == stamp
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((25, corpus.vectors.shape[1])).astype(np.float32)
    assert loaded.search_vectors(queries, 10) == built.search_vectors(queries, 10)
    BUILDERS[kind](corpus, path, rebuild=True)
    assert path.stat().st_mtime_ns != stamp


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_save_off_builds_without_writing(
    kind: str, corpus: SyntheticCorpus, tmp_path: Path
) -> None:
    """``save=False`` (``RetrieverConfig.save_index``): the index is built and used, nothing is
    written, and a later start with saving on builds and saves it."""
    path = tmp_path / kind / INDEX_FILE
    unsaved = BUILDERS[kind](corpus, path, save=False)
    assert not path.exists() and not (path.parent / META_FILE).exists()
    saved = BUILDERS[kind](corpus, path)
    assert path.is_file()
    queries = corpus.vectors[:5] + 0.01
    assert unsaved.search_vectors(queries, 5) == saved.search_vectors(queries, 5)


def test_stale_index_is_rebuilt(corpus: SyntheticCorpus, tmp_path: Path) -> None:
    path = tmp_path / "hnsw" / INDEX_FILE
    _hnsw(corpus, path)
    other = corpus.vectors.copy()
    other[0] = -other[0]
    rebuilt = HNSWRetriever(other, index_path=path, m=16, ef_construction=200, progress=False)
    assert rebuilt.search_vectors(other[0], 1)[0][0].doc_id == 0
    # Changing a build parameter also rebuilds rather than loading the old graph.
    HNSWRetriever(other, index_path=path, m=8, progress=False)
    assert '"hnsw_m": 8' in (path.parent / META_FILE).read_text()


def test_parameter_validation(corpus: SyntheticCorpus) -> None:
    with pytest.raises(ValueError, match=r"^hnsw_m:"):
        HNSWRetriever(corpus.vectors, m=1)
    with pytest.raises(ValueError, match=r"^ef_search:"):
        HNSWRetriever(corpus.vectors, ef_search=0)
    with pytest.raises(ValueError, match=r"^nlist:"):
        IVFFlatRetriever(corpus.vectors, nlist=NUM_DOCS + 1)
    with pytest.raises(ValueError, match=r"^nprobe:"):
        IVFFlatRetriever(corpus.vectors, nprobe=0)
    with pytest.raises(ValueError, match=r"^codec:"):
        IVFFlatRetriever(corpus.vectors, codec="pq")
    assert default_nlist(1_000_000) == 4000 and default_nlist(3) == 3


def test_concurrent_searches_with_different_k_do_not_interfere(corpus: SyntheticCorpus) -> None:
    # Search parameters travel with each call (not set on the shared index), so threads
    # asking for different k at once get exactly what they get alone.
    from concurrent.futures import ThreadPoolExecutor

    for retriever in (_hnsw(corpus, ef_search=8), _ivf(corpus, nprobe=2)):
        jobs = [(q, k) for q in corpus.query_vectors for k in (1, 5, 30, 60)]
        alone = [retriever.search_vectors(q, k) for q, k in jobs]
        with ThreadPoolExecutor(max_workers=8) as pool:
            queries, ks = zip(*(jobs * 3), strict=True)
            together = list(pool.map(retriever.search_vectors, queries, ks))
        assert together == alone * 3


def test_hnsw_top1_does_not_depend_on_k() -> None:
    """A prefetching verification (k = 20..ef_search) must see the baseline's (k = 1) top-1.

    A wider FAISS beam visits other graph nodes, so letting k + margin widen efSearch made
    the top-1 depend on k on a sparse graph like this one; the beam is now fixed for
    k <= ef_search."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((20_000, 32)).astype(np.float32)
    queries = rng.standard_normal((400, 32)).astype(np.float32)
    hnsw = HNSWRetriever(vectors, None, None, m=4, ef_construction=16, ef_search=24)
    top1 = [hits[0] for hits in hnsw.search_vectors(queries, 1)]
    for k in (8, 20, 24):
        assert [hits[0] for hits in hnsw.search_vectors(queries, k)] == top1, k


def test_sq8_stores_a_quarter_and_lives_apart_from_flat(
    corpus: SyntheticCorpus, tmp_path: Path
) -> None:
    """8 bits a dimension instead of 32: the saved index shrinks ~4x (what lets a 21M-doc
    IVF fit a 64 GB disk next to its knowledge base), under its own artefact name, and a
    flat index's saved parameters are those it had before codecs existed."""
    flat_path, sq8_path = tmp_path / "flat" / INDEX_FILE, tmp_path / "sq8" / INDEX_FILE
    flat, sq8 = _ivf(corpus, flat_path), _ivf_sq8(corpus, sq8_path)
    codes = corpus.vectors.size  # bytes of 8-bit codes; flat holds 4x that
    assert sq8_path.stat().st_size < flat_path.stat().st_size - 2 * codes
    assert "codec" not in (flat_path.parent / META_FILE).read_text()
    assert '"codec": "sq8"' in (sq8_path.parent / META_FILE).read_text()
    assert IVFFlatRetriever.artifact_name(64) == "ivf-nlist64"
    assert IVFFlatRetriever.artifact_name(64, "sq8") == "ivf-nlist64-sq8"
    assert (flat.info.extra["codec"], sq8.info.extra["codec"]) == ("flat", "sq8")


@pytest.mark.parametrize("codec", ["flat", "sq8"])
@pytest.mark.parametrize("groups", [2, 3, 50])
def test_probe_groups_find_the_candidates_faiss_finds(
    corpus: SyntheticCorpus, codec: str, groups: int
) -> None:
    """A query's probed lists searched in groups on threads and merged: the same candidates
    (ids and index scores) as FAISS's one-core search, singly and in a batch, ordered by
    (index score desc, doc id asc) where FAISS leaves the duplicated vectors' tie in heap
    order; the same hits; more groups than probed lists are capped."""
    serial = _ivf(corpus, nlist=16, nprobe=6, codec=codec)
    grouped = _ivf(corpus, nlist=16, nprobe=6, codec=codec, probe_groups=groups)
    queries = np.ascontiguousarray(corpus.query_vectors, dtype=np.float32)
    for count in (1, 9, 40):
        want_ids, want_scores = serial._candidates(queries, count)
        got_ids, got_scores = grouped._candidates(queries, count)
        for want_row, got_row, got_s in zip(want_ids, got_ids, got_scores, strict=True):
            assert sorted(got_row.tolist()) == sorted(want_row.tolist())
            assert (np.lexsort((got_row, -got_s)) == np.arange(count)).all()
        assert np.array_equal(np.sort(got_scores, axis=1), np.sort(want_scores, axis=1))
        one_ids, _ = grouped._candidates(queries[3:4], count)
        assert np.array_equal(one_ids[0], got_ids[3])
    assert grouped.search(corpus.queries, 10) == serial.search(corpus.queries, 10)
    assert grouped.info.extra["probe_groups"] == str(groups)
    assert "probe_groups" not in serial.info.extra


def test_probe_groups_do_not_depend_on_the_batch_or_timing_under_ties() -> None:
    """Exact ties (every vector three times): a query's candidates are the same alone, in
    a batch, and on every repetition, so baseline and speculative runs see one retriever."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((300, 16)).astype(np.float32)
    vectors = np.concatenate([base, base, base])
    ivf = IVFFlatRetriever(vectors, nlist=8, nprobe=5, probe_groups=3, progress=False)
    queries = rng.standard_normal((12, 16)).astype(np.float32)
    batch_ids, batch_scores = ivf._candidates(queries, 25)
    for _ in range(3):
        again_ids, again_scores = ivf._candidates(queries, 25)
        assert np.array_equal(again_ids, batch_ids) and np.array_equal(again_scores, batch_scores)
    for i in range(len(queries)):
        alone_ids, _ = ivf._candidates(queries[i : i + 1], 25)
        assert np.array_equal(alone_ids[0], batch_ids[i])
    scores = batch_scores[:, :-1] >= batch_scores[:, 1:]  # index score desc, then doc id asc
    ties = batch_scores[:, :-1] == batch_scores[:, 1:]
    assert scores.all() and (batch_ids[:, :-1][ties] < batch_ids[:, 1:][ties]).all()
    with pytest.raises(ValueError, match="probe_groups"):
        IVFFlatRetriever(vectors, nlist=8, probe_groups=0, progress=False)
