"""Exact dense search: FAISS and torch flat search against brute-force numpy, ties, scores.

Reduced-precision torch matrices (bfloat16, float16) must give the float32 FAISS path's hits
and scores bit for bit; a near-tie corpus makes their error bound admit many candidates.
"""

from __future__ import annotations

import numpy as np
import pytest

from ralmspec_vllm.retrieval.base import DenseRetriever, Retriever, float32_products
from ralmspec_vllm.retrieval.dense import (
    float32_relative_error,
    inner_product,
    screen_candidates,
)
from ralmspec_vllm.retrieval.flat import (
    PACKED_MAX_BATCH,
    FlatRetriever,
    _TorchMatrix,
    can_pack,
    reduced_relative_error,
)

from .synthetic import DIM, DUP_IDS, DUP_OF, NUM_DOCS, SyntheticCorpus, brute_force

IMPLS = [
    {"impl": "faiss"},
    {"impl": "torch", "device": "cpu"},
    {"impl": "torch", "device": "cpu", "dtype": "float16", "chunk_size": 128},
    {"impl": "torch", "device": "cpu", "dtype": "bfloat16", "chunk_size": 300},
    {"impl": "torch", "device": "cpu", "dtype": "bfloat16", "chunk_size": 300, "layout": "plain"},
    {"impl": "torch", "device": "cpu", "dtype": "bfloat16", "chunk_size": 256, "scan": "circular"},
    {"impl": "torch", "device": "cpu", "chunk_size": 384, "scan": "circular"},
]


def _flat(corpus: SyntheticCorpus, **params: object) -> FlatRetriever:
    return FlatRetriever(corpus.vectors, corpus.documents, corpus.encoder, **params)  # type: ignore[arg-type]


def _pairs(hits: list) -> list[tuple[int, float]]:
    return [(h.doc_id, h.score) for h in hits]


def test_inner_product_is_float64_and_shape_independent(corpus: SyntheticCorpus) -> None:
    q = corpus.query_vectors
    full = inner_product(q, corpus.vectors)
    assert full.dtype == np.float64 and full.shape == (len(q), NUM_DOCS)
    reference = q.astype(np.float64) @ corpus.vectors.astype(np.float64).T
    np.testing.assert_allclose(full, reference, rtol=0, atol=1e-12)
    # Same vectors, other batch shapes and per-query candidate sets: the same bits.
    ids = np.array([[5, 3, 599], [0, 1, 2]])
    per_query = inner_product(q[:2], corpus.vectors[ids])
    assert np.array_equal(per_query, full[np.arange(2)[:, None], ids])
    assert np.array_equal(inner_product(q[4:5], corpus.vectors[[9]]), full[4:5, [9]])


@pytest.mark.parametrize("params", IMPLS, ids=lambda p: "-".join(map(str, p.values())))
@pytest.mark.parametrize("k", [1, 5, 10, 40])
def test_flat_equals_brute_force(corpus: SyntheticCorpus, params: dict, k: int) -> None:
    flat = _flat(corpus, **params)
    hits = flat.search(corpus.queries, k)
    assert [[h.doc_id for h in row] for row in hits] == brute_force(
        corpus.query_vectors, corpus.vectors, k
    )
    for row, query in zip(hits, corpus.queries, strict=True):
        assert [h.score for h in row] == flat.score(query, [h.doc_id for h in row])
    assert [row[0].doc_id for row in hits] == corpus.nearest


@pytest.mark.parametrize("params", IMPLS, ids=lambda p: "-".join(map(str, p.values())))
def test_ties_break_by_doc_id_and_widen_past_margin(corpus: SyntheticCorpus, params: dict) -> None:
    # No margin: the index proposes exactly k of the 8 equal-scoring duplicates, in whatever
    # order it likes; the retriever must widen and return the k lowest ids.
    flat = _flat(corpus, candidate_margin=0, **params)
    query = corpus.vectors[DUP_OF]
    for k in (1, 3, len(DUP_IDS), len(DUP_IDS) + 2):
        hits = flat.search_vectors(query, k)[0]
        assert [h.doc_id for h in hits[: len(DUP_IDS)]] == list(DUP_IDS)[:k]
        assert len({h.score for h in hits[: len(DUP_IDS)]}) == 1
        assert hits == flat.search_vectors(query, k)[0]


@pytest.mark.parametrize("params", IMPLS, ids=lambda p: "-".join(map(str, p.values())))
@pytest.mark.parametrize(("k", "prefetch"), [(1, 30), (5, 10)])
def test_prefetch_hits_follow_the_exact_top_k(
    corpus: SyntheticCorpus, params: dict, k: int, prefetch: int
) -> None:
    """The first k hits are the plain top-k, bit for bit; then up to ``prefetch`` distinct
    further docs, ranked by their exact scores. FAISS proposes k + prefetch candidates, so
    its prefetch hits are the exact next ones; the bfloat16 scan gives its near-ties."""
    flat = _flat(corpus, **params)
    plain = flat.search(corpus.queries, k)
    got = flat.search(corpus.queries, k, prefetch)
    exact = flat.search(corpus.queries, k + prefetch)
    for query, row, top, full in zip(corpus.queries, got, plain, exact, strict=True):
        assert row[:k] == top
        assert k < len(row) <= k + prefetch
        assert len({h.doc_id for h in row}) == len(row)
        assert [h.score for h in row] == flat.score(query, [h.doc_id for h in row])
        assert [(-h.score, h.doc_id) for h in row] == sorted((-h.score, h.doc_id) for h in row)
        if params.get("dtype", "float32") != "bfloat16":
            assert row == full
    assert flat.search_vectors(corpus.query_vectors, k, prefetch) == got


def test_bfloat16_prefetch_hits_are_the_scans_near_ties() -> None:
    """On a near-tie corpus a top-1 bfloat16 scan proposes hundreds of docs: the prefetch
    hits are the best of them, the first of which are the exact runners-up."""
    docs, queries = _near_ties()
    flat = FlatRetriever(docs, impl="torch", device="cpu", dtype="bfloat16", chunk_size=512)
    got = flat.search_vectors(queries, 1, 100)
    exact = FlatRetriever(docs).search_vectors(queries, 101)
    for row, full in zip(got, exact, strict=True):
        assert len(row) == 101
        assert row[:20] == full[:20]
    assert flat.widened == 0


def test_torch_equals_faiss(corpus: SyntheticCorpus) -> None:
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((30, DIM)).astype(np.float32)  # not unit: scores scale
    faiss_hits = _flat(corpus).search_vectors(queries, 25)
    for params in IMPLS[1:]:
        assert _flat(corpus, **params).search_vectors(queries, 25) == faiss_hits


def test_k_above_corpus_returns_everything(corpus: SyntheticCorpus) -> None:
    hits = _flat(corpus).search([corpus.queries[0]], NUM_DOCS + 50)[0]
    assert sorted(h.doc_id for h in hits) == list(range(NUM_DOCS))
    assert [h.doc_id for h in hits] == brute_force(
        corpus.query_vectors[:1], corpus.vectors, NUM_DOCS
    )[0]


def test_protocol_info_documents_vectors(corpus: SyntheticCorpus) -> None:
    flat = _flat(corpus)
    assert isinstance(flat, Retriever) and isinstance(flat, DenseRetriever)
    info = flat.info
    assert (info.backend, info.num_docs, info.dim, info.metric) == (
        "flat",
        NUM_DOCS,
        DIM,
        "inner_product",
    )
    assert info.bm25 is None and info.extra["impl"] == "faiss"
    assert [d.doc_id for d in flat.documents([5, 0, 5])] == [5, 0, 5]
    vecs = flat.vectors([3, 599])
    assert vecs.dtype == np.float32 and np.array_equal(vecs, corpus.vectors[[3, 599]])
    assert flat.search([], 3) == []
    assert flat.score(corpus.queries[0], []) == []
    assert np.array_equal(flat.encode(corpus.queries[:2]), corpus.query_vectors[:2])


@pytest.mark.parametrize("params", [IMPLS[0], IMPLS[3]], ids=["faiss", "torch-bf16"])
def test_phase_times_count_every_call(corpus: SyntheticCorpus, params: dict) -> None:
    """The benchmark splits awaited search time with these: each phase is counted once a
    call, and reads are timed apart from searches."""
    flat = _flat(corpus, **params)
    assert flat.times.snapshot() == {
        "searches": 0, "abandoned": 0, "encode_s": 0, "scan_s": 0, "rank_s": 0,
        "vectors_s": 0, "documents_s": 0,
    }  # fmt: skip
    flat.search_vectors(corpus.query_vectors[:3], 5, 7)
    assert flat.times.encode_s == 0  # by vector: nothing to encode
    flat.search(corpus.queries[:1], 2)
    after = flat.times.snapshot()
    assert after["searches"] == 2 and after["scan_s"] > 0 and after["rank_s"] > 0
    assert after["encode_s"] > 0
    assert after["vectors_s"] == after["documents_s"] == 0
    flat.vectors([1, 2])
    flat.documents([3])
    last = flat.times.snapshot()
    assert last["vectors_s"] > 0 and last["documents_s"] > 0
    assert {k: last[k] for k in ("searches", "scan_s", "rank_s")} == {
        k: after[k] for k in ("searches", "scan_s", "rank_s")
    }


@pytest.mark.parametrize(
    ("call", "error", "field"),
    [
        (lambda r: r.search(["hello"], 0), ValueError, "k"),
        (lambda r: r.search(["hello"], -3), ValueError, "k"),
        (lambda r: r.search(["hello"], 2, -1), ValueError, "prefetch"),
        (lambda r: r.search_vectors(np.ones((1, DIM), np.float32), 2, 1.5), ValueError, "prefetch"),
        (lambda r: r.search(["ok", "  "], 3), ValueError, "queries[1]"),
        (lambda r: r.search("a string", 3), ValueError, "queries"),
        (lambda r: r.score("", [1]), ValueError, "query"),
        (lambda r: r.search_vectors(np.zeros((2, DIM + 1), np.float32), 3), ValueError, "vectors"),
        (
            lambda r: r.search_vectors(np.full((1, DIM), np.nan, np.float32), 3),
            ValueError,
            "vectors",
        ),
        (lambda r: r.score("hello", [0, NUM_DOCS]), KeyError, "doc_ids"),
        (lambda r: r.score("hello", [-1]), KeyError, "doc_ids"),
        (lambda r: r.vectors([NUM_DOCS + 5]), KeyError, "doc_ids"),
        (lambda r: r.documents([10**9]), KeyError, "doc_ids"),
    ],
)
def test_bad_input_names_the_field(corpus: SyntheticCorpus, call, error, field: str) -> None:
    with pytest.raises(error, match=f"^'?{__import__('re').escape(field)}:"):
        call(_flat(corpus))


def test_constructor_validation(corpus: SyntheticCorpus) -> None:
    with pytest.raises(ValueError, match=r"^impl:"):
        FlatRetriever(corpus.vectors, impl="annoy")
    with pytest.raises(ValueError, match=r"^dtype:"):
        FlatRetriever(corpus.vectors, impl="faiss", dtype="float16")
    with pytest.raises(ValueError, match=r"^device:"):
        FlatRetriever(corpus.vectors, impl="faiss", device="cuda")
    with pytest.raises(ValueError, match=r"^encoder:"):
        FlatRetriever(corpus.vectors[:, :8], encoder=corpus.encoder)
    with pytest.raises(ValueError, match=r"^documents:"):
        FlatRetriever(corpus.vectors[:10], documents=corpus.documents)
    with pytest.raises(ValueError, match=r"^layout: packed needs"):
        FlatRetriever(corpus.vectors, impl="torch", device="cpu", dtype="float32", layout="packed")
    with pytest.raises(ValueError, match=r"^layout: must be one of"):
        FlatRetriever(corpus.vectors, impl="torch", device="cpu", layout="tiled")
    with pytest.raises(ValueError, match=r"^scan: circular needs impl='torch'"):
        FlatRetriever(corpus.vectors, impl="faiss", scan="circular")
    with pytest.raises(ValueError, match=r"^scan: must be one of"):
        FlatRetriever(corpus.vectors, impl="torch", device="cpu", scan="round")


def test_bfloat16_on_the_cpu_packs_its_chunks_where_onednn_can(corpus: SyntheticCorpus) -> None:
    assert can_pack()  # the CPU builds of torch we install all can
    packed = _flat(corpus, impl="torch", device="cpu", dtype="bfloat16", chunk_size=300)
    plain = _flat(corpus, impl="torch", device="cpu", dtype="bfloat16", layout="plain")
    both = _flat(corpus, impl="torch", device="cpu", dtype="bfloat16", layout="both")
    assert packed.info.extra["layout"] == "packed"
    assert plain.info.extra["layout"] == "plain"
    assert both.info.extra["layout"] == "both"
    assert _flat(corpus, impl="torch", device="cpu").info.extra["layout"] == "plain"
    # both layouts answer alike, below and above the batch where "both" switches layout
    rng = np.random.default_rng(3)
    for batch in (3, PACKED_MAX_BATCH + 1):
        queries = rng.standard_normal((batch, DIM)).astype(np.float32)
        expected = _flat(corpus).search_vectors(queries, 5)
        for flat in (packed, plain, both):
            assert flat.search_vectors(queries, 5) == expected


@pytest.mark.parametrize("layout", ["plain", "packed", "both"])
@pytest.mark.parametrize("batch", [1, 2, 7, 16, 20, 64, 65])
def test_bfloat16_products_accumulate_in_float32(layout: str, batch: int) -> None:
    """The error bound assumes fp32 sums: 1 + 383 x u/2 (u = 2^-8) is 1.748 in fp32, which
    rounds to 1.75 in bfloat16; summed in bfloat16 every u/2 would round away (1.0)."""
    dim = 384
    docs = np.ones((1000, dim), dtype=np.float32)
    matrix = _TorchMatrix(docs, "cpu", "bfloat16", chunk_size=512, scale=1.0, layout=layout)
    queries = np.random.default_rng(batch).standard_normal((batch, dim)).astype(np.float32)
    queries[-1] = 2.0**-9
    queries[-1, 0] = 1.0
    blocks = [block.float().numpy() for _, block in matrix.products(queries)]
    assert matrix.packed == (layout != "plain")
    assert [b.shape for b in blocks] == [(batch, 512), (batch, 488)]
    assert all((b[-1] == 1.75).all() for b in blocks)


@pytest.mark.parametrize("params", IMPLS, ids=lambda p: "-".join(map(str, p.values())))
def test_differences_below_float32_resolution_rank_by_exact_score(params: dict) -> None:
    # Doc 1 = doc 0 with one coordinate nudged by one float32 ulp towards the query: the
    # index's float32/float16 scores cannot tell them apart, the exact float64 score can.
    rng = np.random.default_rng(3)
    base = rng.standard_normal((50, DIM))
    base = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float32)
    query = rng.standard_normal(DIM).astype(np.float32)
    base[0] = query / np.linalg.norm(query)
    j = int(np.argmax(np.abs(query)))
    base[1] = base[0]
    base[1, j] = np.nextafter(base[0, j], base[0, j] + np.sign(query[j]))
    flat = FlatRetriever(base, candidate_margin=0, **params)
    exact = inner_product(query[None], base)[0]
    assert exact[1] > exact[0]
    hits = flat.search_vectors(query, 1)[0]
    assert [(h.doc_id, h.score) for h in hits] == [(1, exact[1])]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_torch_cuda_equals_faiss(corpus: SyntheticCorpus, dtype: str) -> None:
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((40, DIM)).astype(np.float32)
    cuda = _flat(corpus, impl="torch", device="cuda", dtype=dtype, chunk_size=100)
    assert cuda.device == "cuda"
    assert cuda.search_vectors(queries, 12) == _flat(corpus).search_vectors(queries, 12)
    assert cuda.search_vectors(corpus.vectors[DUP_OF], 3)[0][0].doc_id == DUP_IDS[0]


def _near_ties(seed: int = 11, dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """1500 docs: 400 within ~1e-3 of one direction (far inside the bf16 bound), rest random;
    7 queries near that direction, one exactly on it, one scaled by 1000."""
    rng = np.random.default_rng(seed)
    docs = rng.standard_normal((1500, dim))
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    centre = docs[0].copy()
    docs[1:401] = centre + 1e-3 * rng.standard_normal((400, dim))
    docs[401:405] = docs[1]  # exact duplicates: ties at float64 too
    queries = centre + 0.02 * rng.standard_normal((7, dim))
    queries[0] = centre
    queries[3] *= 1000.0
    return docs.astype(np.float32), queries.astype(np.float32)


@pytest.mark.parametrize(
    "dtype", ["bfloat16", "bfloat16-plain", "bfloat16-both", "float16", "float32"]
)
@pytest.mark.parametrize("k", [1, 20])
@pytest.mark.parametrize("batch", [1, 7])
def test_reduced_precision_equals_faiss_on_near_ties(dtype: str, k: int, batch: int) -> None:
    docs, queries = _near_ties()
    reference = FlatRetriever(docs, candidate_margin=0)
    dtype, _, layout = dtype.partition("-")
    torch_flat = FlatRetriever(
        docs, impl="torch", device="cpu", dtype=dtype, chunk_size=512, layout=layout or "auto"
    )
    expected = reference.search_vectors(queries[:batch], k)
    got = torch_flat.search_vectors(queries[:batch], k)
    assert [_pairs(row) for row in got] == [_pairs(row) for row in expected]
    assert [[h.doc_id for h in row] for row in got] == brute_force(queries[:batch], docs, k)
    # FAISS proposes k and must widen; the torch scan proposes every doc within its bound
    # in one pass (bf16's bound admits hundreds here), so it never rescans.
    assert reference.widened >= batch
    assert torch_flat.widened == 0
    if dtype == "bfloat16":
        assert torch_flat.rescored > 100 * batch
        # The float32 screen leaves the near-ties within float32's bound (none here beyond
        # the exact duplicates) for the float64 re-scoring: k plus a few per query.
        assert torch_flat.rescored_exact <= (k + 8) * batch


def test_ranking_on_threads_equals_ranking_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``_PARALLEL_RANK_MIN`` candidates a call's queries are ranked on a thread pool:
    the same hits, scores and counters as one after another."""
    from ralmspec_vllm.retrieval import dense

    docs, queries = _near_ties()

    def run(threshold: int) -> tuple[list, int, int]:
        monkeypatch.setattr(dense, "_PARALLEL_RANK_MIN", threshold)
        flat = FlatRetriever(docs, impl="torch", device="cpu", dtype="bfloat16", chunk_size=512)
        hits = flat.search_vectors(queries, 5, 60)
        return [_pairs(row) for row in hits], flat.rescored, flat.rescored_exact

    in_turn, on_threads = run(10**9), run(0)
    assert on_threads == in_turn
    assert in_turn[2] > len(queries) * 60  # enough work to matter


def test_float32_screen_keeps_every_possible_top_k_member() -> None:
    """Candidates closer than float32 can resolve all survive the screen; far ones do not."""
    rng = np.random.default_rng(8)
    dim, k = 64, 5
    query = rng.standard_normal(dim).astype(np.float32)
    base = rng.standard_normal(dim).astype(np.float32)
    vectors = np.repeat(base[None], 40, axis=0)
    # 20 docs differ from base by one ulp-scale nudge (scores within ~1e-6 relative), 20 by
    # a large step down the query's direction (clearly worse).
    toward = np.where(np.arange(20) % 2, np.inf, -np.inf).astype(np.float32)
    vectors[:20, 0] = np.nextafter(vectors[:20, 0], toward)
    vectors[20:] -= 0.5 * query / np.linalg.norm(query)
    max_norm = float(np.linalg.norm(vectors.astype(np.float64), axis=1).max())
    keep = screen_candidates(query, vectors, k, max_norm)
    exact = inner_product(query[None], vectors)[0]
    top = np.lexsort((np.arange(40), -exact))[:k]
    assert keep[top].all()
    assert keep[:20].all() and not keep[20:].any()
    assert screen_candidates(query, vectors[:k], k, max_norm).all()  # m <= k: nothing to drop


def test_float32_products_stay_within_the_screens_error_bound() -> None:
    """The screens' float32 product (einsum on the calling thread, not multi-threaded BLAS)
    is within ``float32_relative_error(d) |q| |x|`` of the exact score, float64 query too."""
    rng = np.random.default_rng(11)
    dim = 384
    vectors = rng.standard_normal((5000, dim)).astype(np.float32)
    vectors[:10] = np.float32(1e-3) * vectors[:10] + vectors[10]  # near-ties
    for query in (rng.standard_normal(dim).astype(np.float32), rng.standard_normal(dim)):
        approx = float32_products(vectors, query)
        assert approx.dtype == np.float32 and approx.shape == (5000,)
        exact = inner_product(query.astype(np.float32)[None], vectors)[0]
        norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
        q_norm = np.linalg.norm(query.astype(np.float32).astype(np.float64))
        bound = float32_relative_error(dim) * q_norm * norms
        assert (np.abs(approx - exact) <= bound).all()
        np.testing.assert_allclose(approx, vectors @ query.astype(np.float32), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "bfloat16-plain", "float16"])
def test_reduced_error_bound_holds_and_is_not_loose(dtype: str) -> None:
    dtype, _, layout = dtype.partition("-")
    # Worst case for input rounding: every coordinate sits just below a rounding midpoint,
    # so q and x both lose almost u per coordinate, all in the same direction.
    u = {"bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    dim = 96
    worst = np.full((1, dim), 1.0 + u - u / 64, dtype=np.float32)
    rng = np.random.default_rng(5)
    docs = np.concatenate([worst, rng.random((500, dim))]).astype(np.float32)  # norms < |worst|
    queries = np.concatenate([worst, rng.standard_normal((3, dim))]).astype(np.float32)
    flat = FlatRetriever(docs, impl="torch", device="cpu", dtype=dtype, layout=layout or "auto")
    assert flat._matrix.packed == (dtype == "bfloat16" and not layout)
    ids, approx, _ = flat._torch_scan(queries, len(docs), len(docs))
    exact = inner_product(queries, docs[ids])
    q_norms = np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    relative = np.abs(approx - exact) / (q_norms * flat._max_norm)
    bound = reduced_relative_error(dim, dtype)
    assert relative.max() < bound
    assert relative[0].max() > 1.9 * u  # the worst row really loses ~2u: the bound is ~3u


def test_config_layout_needs_the_bfloat16_torch_scan(corpus: SyntheticCorpus) -> None:
    import argparse

    from ralmspec_vllm.retrieval.factory import (
        RetrieverConfig,
        add_retriever_arguments,
        config_from_args,
    )

    config = RetrieverConfig(flat_impl="torch", device="cpu", dtype="bfloat16", flat_layout="both")
    assert config.flat_layout == "both"
    for bad in ({"flat_impl": "faiss"}, {"flat_impl": "torch", "dtype": "float16"}):
        with pytest.raises(ValueError, match=r"^flat_layout: both needs"):
            RetrieverConfig(flat_layout="both", **bad)  # type: ignore[arg-type]
    parser = argparse.ArgumentParser()
    add_retriever_arguments(parser)
    args = parser.parse_args(
        ["--flat-impl", "torch", "--dtype", "bfloat16", "--flat-layout", "both"]
    )
    assert config_from_args(args).flat_layout == "both"
    with pytest.raises(SystemExit):
        parser.parse_args(["--flat-layout", "tiled"])


def test_config_accepts_reduced_dtypes_for_torch_only() -> None:
    from ralmspec_vllm.retrieval.factory import RetrieverConfig

    for dtype in ("bfloat16", "float16"):
        assert RetrieverConfig(flat_impl="torch", dtype=dtype).dtype == dtype
        with pytest.raises(ValueError, match=rf"^dtype: {dtype} needs flat_impl='torch'"):
            RetrieverConfig(flat_impl="faiss", dtype=dtype)
