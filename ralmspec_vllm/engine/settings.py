"""Process settings and the typed engine configuration.

Two things live here, both free of any vLLM import so they can run before vLLM is loaded:

- :func:`apply_process_settings` sets the environment vLLM and torch read at import time.
  On CPU these are what keeps generation fast and exact on a small machine (one OpenMP
  thread, no thread binding, 1 GiB of KV cache, no torch.compile: vLLM otherwise compiles a
  sampling kernel with inductor at every engine start, ~60 s on 2 cores, unused by greedy
  decoding). Offline mode and no usage stats apply everywhere. Values already in the
  environment win, so a user can override any of them.
- :class:`EngineConfig` is the typed engine configuration. Device-dependent fields default to
  ``None`` and resolve per device (CPU: fp32, block size 32, eager; GPU: bf16, block size 16,
  CUDA graphs allowed); :meth:`EngineConfig.engine_kwargs` gives vLLM ``AsyncEngineArgs``
  keyword arguments and :meth:`EngineConfig.to_engine_args` the object itself.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

Device = Literal["cpu", "cuda"]
LmPath = Literal["resubmit", "sessions"]
RALM_SCHEDULER_CLS = "ralmspec_vllm.engine.scheduler.RaLMScheduler"
"""The scheduler hook (``engine.scheduler``) that ``lm_path="sessions"`` needs."""
RALM_SESSION_KEY = "ralm_session"
RALM_KEEP_KEY = "ralm_keep"
"""``SamplingParams.extra_args`` keys by which ``engine.sessions`` instructs the hook."""

COMMON_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
"""Set on every device: no machine here reaches a model hub, and no telemetry."""

CPU_ENV: dict[str, str] = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TORCHDYNAMO_DISABLE": "1",
}
"""CPU only (see module docstring); without the thread settings generation is ~10x slower."""

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def detect_device() -> Device:
    """``cuda`` when an NVIDIA GPU is visible, else ``cpu``; never initialises CUDA.

    ``RALMSPEC_DEVICE=cpu|cuda`` overrides the detection.
    """
    forced = os.environ.get("RALMSPEC_DEVICE", "").strip().lower()
    if forced in ("cpu", "cuda"):
        return "cpu" if forced == "cpu" else "cuda"
    if forced:
        raise ValueError(f"RALMSPEC_DEVICE must be 'cpu' or 'cuda', got {forced!r}")
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "cpu"
    return "cuda" if Path("/dev/nvidiactl").exists() else "cpu"


def process_env(device: Device) -> dict[str, str]:
    """The environment variables :func:`apply_process_settings` sets for ``device``."""
    return {**COMMON_ENV, **(CPU_ENV if device == "cpu" else {})}


def apply_process_settings(device: Device | None = None) -> dict[str, str]:
    """Set the environment for ``device`` (default: detected) unless already set.

    Call before vLLM (and ideally torch) is imported; :func:`version.load_vllm` does. Child
    processes vLLM spawns inherit the environment. Returns what was set.
    """
    device = detect_device() if device is None else device
    applied: dict[str, str] = {}
    for key, value in process_env(device).items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    if applied:
        logger.debug("process settings for %s: %s", device, applied)
    return applied


def model_has_weights(model: str | Path) -> bool:
    """True unless ``model`` is a local directory without weight files (a dummy-weight model)."""
    path = Path(model)
    if not path.is_dir():
        return True
    return any(p.name.endswith(_WEIGHT_SUFFIXES) for p in path.iterdir())


@dataclass(frozen=True)
class EngineConfig:
    """How to start one vLLM engine. ``None`` fields resolve per device in :meth:`resolved`."""

    model: str
    """Local model directory (see ``engine.models.resolve_model``)."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the model directory."""
    device: Device | None = None
    """``cpu`` or ``cuda``; default: detected (``settings.detect_device``)."""
    dtype: str | None = None
    """Weights/activations dtype; default ``float32`` on every device. bf16 breaks the token
    identity RaLMSpec promises: a prompt whose head came from the prefix cache can give a
    different near-tie token than the same prompt computed whole (seen on CPU and on an H200,
    where ``VLLM_BATCH_INVARIANT=1`` did not help; fp32 held on 185 of 185 GPU questions).
    ``bfloat16`` is faster and usually, not always, identical."""
    block_size: int | None = None
    """KV block size in tokens: the prefix-cache granularity (only full blocks are reused).
    CPU default 32 (vLLM's CPU default of 128 wastes prefix reuse), GPU default 16."""
    max_model_len: int = 2048
    """Longest prompt + generation in tokens."""
    gpu_memory_utilization: float = 0.9
    """GPU only: fraction of GPU memory vLLM may use (weights + KV cache)."""
    kv_cache_gib: int | None = None
    """CPU only: KV cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``); default 1."""
    enforce_eager: bool | None = None
    """Disable CUDA graphs / torch.compile. CPU default True, GPU default False."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks across requests: what makes resubmitting a RaLM prompt cheap."""
    seed: int = 0
    max_num_seqs: int | None = None
    """Most sequences per engine step. CPU default 64, GPU default 256."""
    max_num_batched_tokens: int | None = None
    """Most tokens per engine step (longer prompts are prefilled in chunks). CPU default 512:
    engine start runs one step of this size to warm up (~30 s at 2048 for SmolLM2 on
    2 cores); GPU default: vLLM's."""
    load_format: str = "auto"
    """vLLM load format; ``auto`` becomes ``dummy`` (random weights initialised on the device)
    when the model directory holds no weight files (``engine.models.random_model``)."""
    scheduler_cls: str | None = None
    """Qualified name of a vLLM scheduler class (the serving layer's scheduler hook)."""
    lm_path: LmPath = "resubmit"
    """How RaLM steps reach vLLM: ``resubmit`` (each step a new request; the prefix cache
    serves the shared prefix) or ``sessions`` (each step resumes, and on rollback rewinds,
    a paused sequence: ``engine.sessions``; sets ``scheduler_cls`` to the RaLM hook)."""
    disable_log_stats: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    """Further ``AsyncEngineArgs`` keyword arguments, passed through unchanged."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be a model directory or name, got an empty string")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device must be 'cpu', 'cuda' or None, got {self.device!r}")
        if self.block_size is not None and (self.block_size <= 0 or self.block_size % 16):
            raise ValueError(f"block_size must be a positive multiple of 16, got {self.block_size}")
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.lm_path not in ("resubmit", "sessions"):
            raise ValueError(f"lm_path must be 'resubmit' or 'sessions', got {self.lm_path!r}")
        if self.lm_path == "sessions" and self.scheduler_cls not in (None, RALM_SCHEDULER_CLS):
            raise ValueError(
                f"scheduler_cls must be {RALM_SCHEDULER_CLS} (or None) when lm_path is "
                f"'sessions', got {self.scheduler_cls!r}"
            )
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    def resolved(self) -> EngineConfig:
        """A copy with every device-dependent default filled in."""
        device = self.device or detect_device()
        cpu = device == "cpu"
        load_format = self.load_format
        if load_format == "auto" and not model_has_weights(self.model):
            load_format = "dummy"
        return replace(
            self,
            device=device,
            dtype=self.dtype or "float32",
            block_size=self.block_size or (32 if cpu else 16),
            kv_cache_gib=self.kv_cache_gib or (1 if cpu else None),
            enforce_eager=cpu if self.enforce_eager is None else self.enforce_eager,
            max_num_seqs=self.max_num_seqs or (64 if cpu else 256),
            max_num_batched_tokens=self.max_num_batched_tokens or (512 if cpu else None),
            load_format=load_format,
            scheduler_cls=(
                RALM_SCHEDULER_CLS if self.lm_path == "sessions" else self.scheduler_cls
            ),
        )

    def engine_kwargs(self) -> dict[str, Any]:
        """``AsyncEngineArgs`` keyword arguments (resolves defaults; imports nothing)."""
        cfg = self.resolved()
        kwargs: dict[str, Any] = {
            "model": cfg.model,
            "tokenizer": cfg.tokenizer or cfg.model,
            "dtype": cfg.dtype,
            "block_size": cfg.block_size,
            "max_model_len": cfg.max_model_len,
            "enforce_eager": cfg.enforce_eager,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "seed": cfg.seed,
            "max_num_seqs": cfg.max_num_seqs,
            "load_format": cfg.load_format,
            "disable_log_stats": cfg.disable_log_stats,
        }
        if cfg.device == "cuda":
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        if cfg.scheduler_cls is not None:
            kwargs["scheduler_cls"] = cfg.scheduler_cls
        kwargs.update(cfg.extra)
        return kwargs

    def apply_env(self) -> None:
        """Set the process environment for this config (before the engine starts).

        The CPU KV cache size is an environment variable in vLLM 0.26 (it overrides any
        ``kv_cache_memory_bytes``), so it is set here rather than passed as an argument.
        """
        cfg = self.resolved()
        assert cfg.device is not None
        apply_process_settings(cfg.device)
        if cfg.device == "cpu" and self.kv_cache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)

    def to_engine_args(self) -> Any:
        """vLLM ``AsyncEngineArgs`` for this config (imports vLLM)."""
        from ralmspec_vllm.engine.version import load_vllm

        self.apply_env()
        return load_vllm().AsyncEngineArgs(**self.engine_kwargs())
