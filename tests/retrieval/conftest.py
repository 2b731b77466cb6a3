"""Retrieval test fixtures: the seeded synthetic dense corpus of ``synthetic.py``."""

from __future__ import annotations

import pytest

from .synthetic import SyntheticCorpus, make_corpus


@pytest.fixture(scope="session")
def corpus() -> SyntheticCorpus:
    return make_corpus()
