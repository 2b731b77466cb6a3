"""RetrieverConfig validation, the shared CLI flags, and every backend opened on the real KB.

The knowledge-base tests use the real Wikipedia index (built once into the cache dir) with
its real MiniLM encoder: each backend's reported scores must equal ``score`` for the same
ids, and exact flat search must agree with brute force over the KB's own embeddings.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from ralmspec_vllm.retrieval.base import DenseRetriever, Retriever
from ralmspec_vllm.retrieval.factory import (
    RetrieverConfig,
    add_retriever_arguments,
    config_from_args,
    config_to_args,
    open_retriever,
)
from ralmspec_vllm.retrieval.kb import KnowledgeBase, default_index
from ralmspec_vllm.types import BM25Params

from .synthetic import brute_force

QUERIES = [
    "Who founded the philosophy of anarchism?",
    "Aristotle's teacher was Plato",
    "Alabama state capital Montgomery",
    "the speed of light in a vacuum",
    "Abraham Lincoln was assassinated in 1865",
    "An American in Paris is a jazz-influenced orchestral piece",
]


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    return default_index(show_progress=False)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"backend": "annoy"}, "backend"),
        ({"device": "tpu"}, "device"),
        ({"flat_impl": "numpy"}, "flat_impl"),
        ({"dtype": "float16"}, "dtype"),
        ({"hnsw_m": 1}, "hnsw_m"),
        ({"ef_construction": 0}, "ef_construction"),
        ({"ef_search": 0}, "ef_search"),
        ({"nlist": 0}, "nlist"),
        ({"nprobe": 0}, "nprobe"),
        ({"candidate_margin": -1}, "candidate_margin"),
        ({"bm25_k1": -0.5}, "bm25_k1"),
        ({"bm25_b": 1.5}, "bm25_b"),
        ({"bm25_epsilon": -1.0}, "bm25_epsilon"),
        ({"threads": 0}, "threads"),
        ({"flat_chunk_size": 0}, "flat_chunk_size"),
    ],
)
def test_config_validation_names_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        RetrieverConfig(**changes)


def test_cli_flags_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_retriever_arguments(parser)
    assert config_from_args(parser.parse_args([])) == RetrieverConfig()
    args = parser.parse_args(
        [
            *("--backend", "bm25", "--bm25-k1", "1.2", "--bm25-b", "0.5"),
            *("--no-bm25-stopwords", "--nlist", "64", "--nprobe", "4", "--flat-impl", "torch"),
            *("--dtype", "float16", "--device", "cpu", "--ef-search", "32", "--threads", "3"),
            *("--flat-chunk-size", "4096"),
        ]
    )
    config = config_from_args(args)
    assert config == RetrieverConfig(
        backend="bm25",
        bm25_k1=1.2,
        bm25_b=0.5,
        bm25_stopwords=False,
        nlist=64,
        nprobe=4,
        flat_impl="torch",
        dtype="float16",
        device="cpu",
        ef_search=32,
        threads=3,
        flat_chunk_size=4096,
    )
    assert config.bm25_params == BM25Params(k1=1.2, b=0.5, epsilon=0.25)
    assert not config.analyzer.stopwords
    with pytest.raises(SystemExit):
        parser.parse_args(["--backend", "annoy"])
    # Every config field has a flag.
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(RetrieverConfig)} <= dests
    # config_to_args is the inverse: a parent hands its settings to a child retriever.
    assert config_to_args(RetrieverConfig()) == []
    assert config_from_args(parser.parse_args(config_to_args(config))) == config
    other = RetrieverConfig(
        backend="flat", flat_impl="torch", dtype="bfloat16", flat_layout="both",
        progress=False, rebuild=True, candidate_margin=0, bm25_epsilon=0.5,
    )  # fmt: skip
    assert config_from_args(parser.parse_args(config_to_args(other))) == other
    assert "--no-progress" in config_to_args(other)


BACKEND_CONFIGS = {
    "flat": RetrieverConfig(backend="flat", device="cpu", progress=False),
    "flat-torch": RetrieverConfig(backend="flat", flat_impl="torch", device="cpu", progress=False),
    "hnsw": RetrieverConfig(
        backend="hnsw", hnsw_m=16, ef_construction=80, ef_search=256, progress=False
    ),
    "ivf": RetrieverConfig(backend="ivf", nlist=32, nprobe=32, progress=False),
    "bm25": RetrieverConfig(backend="bm25", progress=False),
}


@pytest.mark.parametrize("name", sorted(BACKEND_CONFIGS))
def test_every_backend_reports_scores_equal_to_score(kb: KnowledgeBase, name: str) -> None:
    retriever = open_retriever(kb, BACKEND_CONFIGS[name])
    assert isinstance(retriever, Retriever)
    assert retriever.info.num_docs == len(kb)
    hits = retriever.search(QUERIES, 10)
    for query, row in zip(QUERIES, hits, strict=True):
        ids = [h.doc_id for h in row]
        assert len(set(ids)) == 10
        assert [h.score for h in row] == retriever.score(query, ids)
        assert [(-h.score, h.doc_id) for h in row] == sorted((-h.score, h.doc_id) for h in row)
    docs = retriever.documents([hits[1][0].doc_id])
    assert "plato" in docs[0].contents.lower() or "aristotle" in docs[0].contents.lower()
    assert (retriever.info.dim == 0) == (name == "bm25")


def test_exact_backends_agree_with_brute_force_on_real_embeddings(kb: KnowledgeBase) -> None:
    flat = open_retriever(kb, BACKEND_CONFIGS["flat"])
    torch_flat = open_retriever(kb, BACKEND_CONFIGS["flat-torch"])
    ivf_all = open_retriever(kb, BACKEND_CONFIGS["ivf"])  # nprobe = nlist: exhaustive
    assert isinstance(flat, DenseRetriever)
    query_vectors = flat.encode(QUERIES)
    expected = brute_force(query_vectors, np.asarray(kb.embeddings()), 20)
    hits = flat.search(QUERIES, 20)
    assert [[h.doc_id for h in row] for row in hits] == expected
    assert torch_flat.search(QUERIES, 20) == hits
    assert ivf_all.search(QUERIES, 20) == hits
    # The encoder is batch-invariant, so a query searched alone gets the same scores.
    assert flat.search(QUERIES[2:3], 20)[0] == hits[2]


def test_open_by_path(kb: KnowledgeBase) -> None:
    retriever = open_retriever(str(kb.path), RetrieverConfig(backend="bm25", progress=False))
    assert retriever.info.num_docs == len(kb)


def test_threads_set_the_search_threads_when_the_retriever_opens(kb: KnowledgeBase) -> None:
    import faiss
    import torch

    before = (torch.get_num_threads(), faiss.omp_get_max_threads())
    try:
        open_retriever(kb, RetrieverConfig(backend="bm25", progress=False, threads=1))
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
