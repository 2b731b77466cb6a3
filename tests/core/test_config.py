"""Configuration validation and the paper's ablation presets."""

from __future__ import annotations

import pytest

from ralmspec_vllm.core.config import PRESETS, RaLMConfig, SpeculationConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"retrieval_stride": 0}, "retrieval_stride"),
        ({"query_window": -1}, "query_window"),
        ({"max_doc_tokens": 0}, "max_doc_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_ralm_config_names_bad_field(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RaLMConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"speculation_stride": 0}, "speculation_stride"),
        ({"speculation_stride": "fast"}, "speculation_stride"),
        ({"prefetch_k": 0}, "prefetch_k"),
        ({"cache_capacity": 0}, "cache_capacity"),
        ({"eviction": "random"}, "eviction"),
        ({"window": 0}, "window"),
        ({"gamma_max": 1.0}, "gamma_max"),
        ({"max_speculation_stride": 0}, "max_speculation_stride"),
        ({"gamma_confidence_z": 0.0}, "gamma_confidence_z"),
        ({"gamma_confidence_z": "high"}, "gamma_confidence_z"),
        ({"gamma_evidence_window": 4}, "gamma_evidence_window"),
        ({"async_verification": 1}, "async_verification"),
        ({"exact_k": -1}, "exact_k"),
        ({"exact_k": True}, "exact_k"),
        ({"overlap_depth": 0}, "overlap_depth"),
        ({"overlap_depth": "round"}, "overlap_depth"),
    ],
)
def test_speculation_config_names_bad_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SpeculationConfig(**kwargs)  # type: ignore[arg-type]


def test_defaults_match_the_paper() -> None:
    ralm = RaLMConfig()
    assert (ralm.retrieval_stride, ralm.query_window, ralm.max_doc_tokens) == (4, 32, 256)
    assert ralm.max_new_tokens == 128
    spec = SpeculationConfig()
    assert spec.label == "B" and not spec.adaptive and not spec.prefetch


def test_presets_are_the_ablation_rows() -> None:
    paper_rows = ["B", "P", "S", "A", "PS", "SA", "PA", "PSA"]
    assert sorted(PRESETS) == sorted([*paper_rows, "PSA-PAPER"])
    for name, config in PRESETS.items():
        assert config.label == name.removesuffix("-PAPER")
    paper, ours = PRESETS["PSA-PAPER"], PRESETS["PSA"]
    assert paper.gamma_confidence_z is None and ours.gamma_confidence_z is not None
    assert (paper.max_speculation_stride, ours.max_speculation_stride) == (10, 16)
    assert (paper.overlap_depth, ours.overlap_depth) == (1, "stride")
    assert all(c.overlap_depth == 1 for n, c in PRESETS.items() if n != "PSA")
    psa = SpeculationConfig.preset("psa", cache_capacity=64)
    assert psa.prefetch_k == 256 and psa.adaptive and psa.async_verification
    assert (psa.search_k, psa.search_prefetch) == (20, 236)
    assert all(c.exact_k == 0 for n, c in PRESETS.items() if n != "PSA")
    assert psa.cache_capacity == 64
    assert (paper.prefetch_k, paper.cache_capacity) == (20, 512)
    assert all(c.prefetch_k == 20 for n, c in PRESETS.items() if "P" in n and n != "PSA")
    with pytest.raises(ValueError, match="preset"):
        SpeculationConfig.preset("X")


def test_parse_overrides_a_preset_by_name() -> None:
    assert SpeculationConfig.parse("PSA") == PRESETS["PSA"]
    spec = SpeculationConfig.parse("psa:overlap_depth=1:gamma_confidence_z=none:gamma_max=0.5")
    assert spec == SpeculationConfig.preset(
        "PSA", overlap_depth=1, gamma_confidence_z=None, gamma_max=0.5
    )
    assert SpeculationConfig.parse("A:async_verification=false").label == "B"
    for bad, match in (
        ("PSA:depth=1", "FIELD=VALUE"),
        ("PSA:overlap_depth", "FIELD=VALUE"),
        ("PSA:overlap_depth=deep", "overlap_depth"),
        ("XYZ", "preset"),
    ):
        with pytest.raises(ValueError, match=match):
            SpeculationConfig.parse(bad)


@pytest.mark.parametrize(
    "word",
    [
        "B",
        "PSA",
        "PSA:overlap_depth=pipeline:early_verification=true",
        "psa:gamma_confidence_z=none:route_guesses=false:gamma_max=0.75",
        "A:async_verification=false",  # B by its fields: described as B
        "S:score_recent=64:eviction=fifo:speculation_stride=5",
    ],
)
def test_describe_is_a_word_parse_reads_back(word: str) -> None:
    """``describe`` (what the server logs at start) names the configuration by its label's
    preset and the fields that differ from it; ``parse`` gives the same configuration back."""
    spec = SpeculationConfig.parse(word)
    described = spec.describe()
    assert described.split(":")[0] == spec.label
    assert SpeculationConfig.parse(described) == spec
    assert PRESETS[spec.label].describe() == spec.label


def test_describe_names_only_what_differs_from_the_preset() -> None:
    spec = SpeculationConfig.preset("PSA", overlap_depth="pipeline", early_verification=True)
    assert spec.describe() == "PSA:overlap_depth=pipeline:early_verification=true"
    assert SpeculationConfig.parse("A:async_verification=false").describe() == "B"


def test_exact_k_splits_each_retrieval_into_exact_hits_and_prefetch_hits() -> None:
    assert (SpeculationConfig(prefetch_k=256).search_k, SpeculationConfig().search_k) == (256, 1)
    spec = SpeculationConfig.parse("PSA:exact_k=0")  # the exact top-256
    assert (spec.prefetch_k, spec.search_k, spec.search_prefetch) == (256, 256, 0)
    spec = SpeculationConfig.parse("PSA:exact_k=64")
    assert (spec.prefetch_k, spec.search_k, spec.search_prefetch) == (256, 64, 192)
    small = SpeculationConfig(prefetch_k=5, exact_k=20)  # a request's smaller prefetch_k
    assert (small.search_k, small.search_prefetch) == (5, 0)
    assert spec.label == "PSA"
