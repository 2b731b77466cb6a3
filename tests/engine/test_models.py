"""The model cache: build-once semantics and the built-in model directories."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from ralmspec_vllm.engine.artifacts import build_once
from ralmspec_vllm.engine.models import TINY_SHAPE, random_model, resolve_model


def test_build_once_builds_once_under_concurrency(tmp_path: Path) -> None:
    calls: list[int] = []

    def build(out: Path) -> None:
        calls.append(1)
        time.sleep(0.2)
        (out / "done").write_text("ok")

    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(build_once("thing", build, tmp_path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert {str(r) for r in results} == {str(tmp_path / "thing")}
    assert (tmp_path / "thing" / "done").read_text() == "ok"


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def build(out: Path) -> None:
        (out / "partial").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_once("broken", build, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["broken.lock"]


def test_tiny_model_has_the_tokenizer_vocabulary(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["vocab_size"] == 49152
    assert config["head_dim"] == TINY_SHAPE.head_dim == 32
    assert config["eos_token_id"] == 2
    assert (tiny_model_dir / "tokenizer.json").is_file()
    assert resolve_model(tiny_model_dir) == tiny_model_dir


def test_random_7b_has_no_weights(tiny_model_dir: Path) -> None:
    path = random_model("7b")
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (4096, 32)
    assert not list(path.glob("*.safetensors"))
    assert (path / "tokenizer.json").is_file()


def test_unknown_model_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model(tmp_path / "nothing-here")
