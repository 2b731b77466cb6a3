"""IVF centroids and list assignments computed in torch (``retrieval/kmeans.py``), the way an
IVF index is built on a GPU: what FAISS's inner-product k-means does (unit centroids, each
the normalized mean of its rows, empty clusters split), deterministic, and an index built
from them that holds every vector in its nearest centroid's list."""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from ralmspec_vllm.retrieval import kmeans
from ralmspec_vllm.retrieval.ann import (
    INDEX_FILE,
    IVF_BUILDS,
    META_FILE,
    IVFFlatRetriever,
    ivf_build_device,
)
from ralmspec_vllm.retrieval.factory import (
    RetrieverConfig,
    add_retriever_arguments,
    config_from_args,
)


def _blobs(
    seed: int = 3, per: int = 200, k: int = 8, dim: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` tight blobs around random unit directions (rows shuffled), and each row's blob."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.repeat(np.arange(k), per)
    x = centers[labels] + 0.02 * rng.standard_normal((k * per, dim))
    order = rng.permutation(len(x))
    return x[order].astype(np.float32), labels[order]


def _lists_of(index: object, nlist: int) -> dict[int, int]:
    """doc id -> the inverted list FAISS holds it in."""
    import faiss

    invlists = index.invlists  # type: ignore[attr-defined]
    out = {}
    for lst in range(nlist):
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), invlists.list_size(lst))
        out.update({int(i): lst for i in ids})
    return out


def test_kmeans_ends_at_a_lloyd_fixed_point_with_unit_centroids() -> None:
    """Converged, each centroid is the normalized mean of the rows nearest to it, and on
    well-separated blobs no cluster mixes rows of two blobs unless a blob was left without
    a centroid of its own (Lloyd's local optimum, FAISS's too)."""
    x, labels = _blobs()
    for seed in (0, 1, 2):
        centroids = kmeans.kmeans(x, 8, "cpu", niter=40, seed=seed)
        assert centroids.shape == (8, 16) and centroids.dtype == np.float32
        assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
        assign = np.argmax(x.astype(np.float64) @ centroids.T.astype(np.float64), axis=1)
        for c in range(8):
            mean = x[assign == c].astype(np.float64).mean(axis=0)
            assert np.allclose(centroids[c], mean / np.linalg.norm(mean), atol=1e-5)
        blobs_of = [set(labels[assign == c].tolist()) for c in range(8)]
        merged = sum(len(b) - 1 for b in blobs_of)
        split = sum(len(set(assign[labels == blob].tolist())) - 1 for blob in range(8))
        assert merged == split  # every merge is paid for by a split of another blob


def test_kmeans_is_deterministic_and_seeded() -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3000, 24)).astype(np.float32)
    a = kmeans.kmeans(x, 40, "cpu", seed=5)
    assert np.array_equal(a, kmeans.kmeans(x, 40, "cpu", seed=5))
    assert not np.array_equal(a, kmeans.kmeans(x, 40, "cpu", seed=6))


def test_empty_clusters_take_half_of_the_largest() -> None:
    """Three distinct rows, five clusters: the seeded sample repeats a row, so two centroids
    start equal, the tie goes to the lower one and the other is left empty; every empty one
    is split off a populated one in another direction, and no centroid is NaN or zero."""
    rows = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    x = np.repeat(rows, 20, axis=0)
    centroids = kmeans.kmeans(x, 5, "cpu", seed=0)
    assert np.isfinite(centroids).all()
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert len({tuple(c) for c in centroids.tolist()}) == 5  # all pushed apart
    assign = np.argmax(x @ centroids.T, axis=1)
    assert len(set(assign.tolist())) == 3  # each distinct row still has a centroid


def test_assign_blocks_cover_every_row_in_order() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1000, 12)).astype(np.float32)
    c = rng.standard_normal((7, 12)).astype(np.float32)
    blocks = list(kmeans.assign_blocks(x, c, "cpu", block=300))
    assert [start for start, _, _ in blocks] == [0, 300, 600, 900]
    rows = np.concatenate([r for _, r, _ in blocks])
    lists = np.concatenate([lst for _, _, lst in blocks])
    assert np.array_equal(rows, x)
    scores = x.astype(np.float64) @ c.T.astype(np.float64)
    top2 = np.sort(scores, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4  # float32 products agree off near-ties
    assert np.array_equal(lists[clear], np.argmax(scores, axis=1)[clear])


def test_assign_blocks_read_a_read_only_memory_map_quietly(tmp_path: Path) -> None:
    """A knowledge base's vectors are a read-only memory map: assigned without a copy and
    without torch's warning about non-writable arrays."""
    rng = np.random.default_rng(6)
    np.save(tmp_path / "v.npy", rng.standard_normal((500, 8)).astype(np.float32))
    vectors = np.load(tmp_path / "v.npy", mmap_mode="r")
    c = rng.standard_normal((4, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ((_, rows, lists),) = kmeans.assign_blocks(vectors, c, "cpu", block=500)
    assert np.shares_memory(rows, vectors) and len(lists) == 500


def test_kmeans_validation() -> None:
    x = np.zeros((10, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"^k:"):
        kmeans.kmeans(x, 11, "cpu")
    with pytest.raises(ValueError, match=r"^niter:"):
        kmeans.kmeans(x, 2, "cpu", niter=0)


@pytest.mark.parametrize("codec", ["flat", "sq8"])
def test_torch_built_index_holds_each_vector_in_its_nearest_list(
    codec: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The index FAISS is handed: nlist centroids in its quantizer, every vector once, in
    the list of the centroid it has the largest inner product with, and searches with
    every list probed return the exact neighbours."""
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((4000, 16)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="ralmspec_vllm.retrieval.ann"):
        ivf = IVFFlatRetriever(
            vectors, nlist=20, nprobe=20, codec=codec, build_device="cpu", progress=False
        )
    assert "torch on cpu" in caplog.text and "IVF built on cpu: k-means" in caplog.text
    index = ivf._index
    assert index.is_trained and index.ntotal == len(vectors) and index.quantizer.ntotal == 20
    centroids = index.quantizer.reconstruct_n(0, 20)
    lists = _lists_of(index, 20)
    assert sorted(lists) == list(range(len(vectors)))
    scores = vectors.astype(np.float64) @ centroids.T.astype(np.float64)
    top2 = np.sort(scores, axis=1)[:, -2:]
    clear = np.flatnonzero(top2[:, 1] - top2[:, 0] > 1e-4)
    want = np.argmax(scores, axis=1)
    assert all(lists[int(i)] == want[i] for i in clear)
    queries = rng.standard_normal((30, 16)).astype(np.float32)
    exact = np.argsort(-(queries.astype(np.float64) @ vectors.T.astype(np.float64)), axis=1)
    hits = ivf.search_vectors(queries, 5)
    assert [[h.doc_id for h in row] for row in hits] == exact[:, :5].tolist()


def test_torch_and_faiss_builds_are_saved_apart(tmp_path: Path) -> None:
    """A saved index records how its lists were made: asking for the other build rebuilds
    instead of loading lists it did not ask for."""
    path = tmp_path / "ivf" / INDEX_FILE
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((2000, 8)).astype(np.float32)
    IVFFlatRetriever(vectors, nlist=10, build_device="cpu", index_path=path, progress=False)
    assert '"trainer": "torch"' in (path.parent / META_FILE).read_text()
    IVFFlatRetriever(vectors, nlist=10, index_path=path, progress=False)
    assert "trainer" not in (path.parent / META_FILE).read_text()


def test_ivf_build_choice_reaches_the_config() -> None:
    """``--ivf-build``: validated, passed through the parser, and ``auto`` builds on the GPU
    only where torch sees one."""
    import torch

    assert IVF_BUILDS == ("auto", "faiss", "cuda")
    assert ivf_build_device("faiss") is None and ivf_build_device("cuda") == "cuda"
    assert ivf_build_device("auto") == ("cuda" if torch.cuda.is_available() else None)
    with pytest.raises(ValueError, match=r"^ivf_build:"):
        ivf_build_device("gpu")
    with pytest.raises(ValueError, match=r"^ivf_build:"):
        RetrieverConfig(backend="ivf", ivf_build="gpu")
    parser = argparse.ArgumentParser()
    add_retriever_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--backend", "ivf", "--ivf-build", "faiss"]))
    assert cfg.ivf_build == "faiss"
    assert config_from_args(parser.parse_args(["--backend", "ivf"])).ivf_build == "auto"


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["flat", "sq8"])
def test_cuda_build_is_deterministic_and_exact_with_every_list_probed(codec: str) -> None:
    """On the GPU: two builds give the same centroids and lists bit for bit, and with every
    list probed the index finds the exact neighbours."""
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((50_000, 64)).astype(np.float32)
    a, b = (
        IVFFlatRetriever(vectors, nlist=64, nprobe=64, codec=codec, build_device="cuda")
        for _ in range(2)
    )
    assert np.array_equal(
        a._index.quantizer.reconstruct_n(0, 64), b._index.quantizer.reconstruct_n(0, 64)
    )
    assert _lists_of(a._index, 64) == _lists_of(b._index, 64)
    queries = rng.standard_normal((20, 64)).astype(np.float32)
    exact = np.argsort(-(queries.astype(np.float64) @ vectors.T.astype(np.float64)), axis=1)
    assert [[h.doc_id for h in row] for row in a.search_vectors(queries, 5)] == exact[
        :, :5
    ].tolist()
