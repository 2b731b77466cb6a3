"""EngineConfig, process settings, the version gate and the plugin: no vLLM engine needed."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import os
from pathlib import Path

import pytest

from ralmspec_vllm.engine import plugin
from ralmspec_vllm.engine.settings import (
    CPU_ENV,
    EngineConfig,
    apply_process_settings,
    detect_device,
    model_has_weights,
)
from ralmspec_vllm.engine.version import (
    UnsupportedVllmError,
    check_vllm_version,
    installed_vllm_version,
    load_scheduler_api,
    load_vllm,
)

PACKAGE = Path(__file__).resolve().parents[2] / "ralmspec_vllm"
# The gate, and the OpenAI protocol models that the server's request types subclass.
VLLM_IMPORTERS = {"engine/version.py", "entrypoints/openai/protocol.py"}


def test_cpu_defaults_are_the_proven_settings(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    cfg = EngineConfig(model=str(tmp_path), device="cpu").resolved()
    assert (cfg.dtype, cfg.block_size, cfg.enforce_eager, cfg.kv_cache_gib) == (
        "float32",
        32,
        True,
        1,
    )
    kwargs = EngineConfig(model=str(tmp_path), device="cpu").engine_kwargs()
    assert kwargs["enable_prefix_caching"] is True
    assert kwargs["max_num_batched_tokens"] == 512
    assert kwargs["load_format"] == "auto"
    assert kwargs["tokenizer"] == str(tmp_path)
    assert "gpu_memory_utilization" not in kwargs


def test_gpu_defaults_differ(tmp_path: Path) -> None:
    kwargs = EngineConfig(
        model=str(tmp_path), device="cuda", gpu_memory_utilization=0.5, extra={"foo": 1}
    ).engine_kwargs()
    assert (kwargs["dtype"], kwargs["block_size"], kwargs["enforce_eager"]) == (
        "float32",
        16,
        False,
    )
    assert kwargs["gpu_memory_utilization"] == 0.5
    assert "max_num_batched_tokens" not in kwargs
    assert kwargs["foo"] == 1


def test_weightless_model_loads_dummy_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert not model_has_weights(tmp_path)
    assert EngineConfig(model=str(tmp_path), device="cuda").engine_kwargs()["load_format"] == (
        "dummy"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", ""),
        ("block_size", 24),
        ("max_model_len", 0),
        ("gpu_memory_utilization", 1.5),
        ("kv_cache_gib", 0),
        ("max_num_seqs", 0),
        ("device", "tpu"),
    ],
)
def test_invalid_config_names_the_field(field: str, value: object) -> None:
    kwargs: dict[str, object] = {"model": "m", field: value}
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)  # type: ignore[arg-type]


def test_process_settings_do_not_override_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    applied = apply_process_settings("cpu")
    assert os.environ["OMP_NUM_THREADS"] == "7"
    assert "OMP_NUM_THREADS" not in applied
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == CPU_ENV["VLLM_CPU_OMP_THREADS_BIND"]


def test_device_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RALMSPEC_DEVICE", "cuda")
    assert detect_device() == "cuda"
    monkeypatch.setenv("RALMSPEC_DEVICE", "gpu")
    with pytest.raises(ValueError, match="RALMSPEC_DEVICE"):
        detect_device()


@pytest.mark.parametrize("version", ["0.26.0", "0.26.3+cpu", "0.26.0rc1"])
def test_supported_versions_pass(version: str) -> None:
    assert check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.25.1", "0.27.0", "1.26.0"])
def test_other_versions_fail_clearly(version: str) -> None:
    with pytest.raises(UnsupportedVllmError, match=r"0\.26\.x"):
        check_vllm_version(version)


def test_installed_vllm_is_found_without_importing_it() -> None:
    version = installed_vllm_version()
    if version is None:
        pytest.skip("vLLM is not installed")
    assert version.startswith("0.26")


@pytest.mark.vllm
@pytest.mark.parametrize("loader", [load_vllm, load_scheduler_api])
def test_the_gate_loads_every_class_it_declares(loader: object) -> None:
    api = loader()  # type: ignore[operator]
    assert api.version == installed_vllm_version()
    for field in dataclasses.fields(api):
        if field.name != "version":
            # Each field holds the vLLM class of that name (StreamingInput, AsyncEngineArgs...).
            assert getattr(api, field.name).__name__ == field.name


def test_only_the_gate_imports_vllm() -> None:
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n == "vllm" or n.startswith("vllm.") for n in names):
                importers.add(path.relative_to(PACKAGE).as_posix())
    assert importers == VLLM_IMPORTERS


def test_plugin_registration_is_reentrant_and_declared() -> None:
    plugin.register()
    plugin.register()
    assert plugin.is_registered()
    names = {ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert "ralmspec_vllm.engine.plugin:register" in names
