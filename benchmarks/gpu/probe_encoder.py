"""Where a query's encoder pass goes on the GPU box, and what one CUDA graph per length saves.

Session 23 (H100, IVF at 1M docs): the baseline's search spent 3.9 ms in the MiniLM query
encoder against 1.5 ms in the IVF scan, and every speculated step paid one more pass for its
guess. A 6-layer BERT on 10-40 tokens is ~100 small kernels: launch-bound. This probe times
single-text encodes (what every search and every guess does), memo off:

- ``shipped``: ``QueryEncoder`` as it is (batch-invariant: the text padded to a multiple of
  16 with its attention mask, its own pass);
- ``graphed``: ``QueryEncoder(cuda_graphs=True)`` (what ``RALMSPEC_ENCODER_CUDA_GRAPHS=1``
  turns on): each text at its exact token length (no padding, so no mask for the model's
  mask code to inspect on the host, which a graph capture forbids), replayed from one CUDA
  graph per length (all captured when the encoder is created, one memory pool);
- ``graphed-bf16``: the same graphs under bf16 autocast (session 34: the guess, one graphed
  pass plus ranking the cache, is half of RaLMSpec's gap to the oracle at 21M; is a bf16
  pass for the guess alone worth having? Session 35: no, the same 0.70 ms on the device);
- ``graphed-compiled``: the graphs of a ``torch.compile``d forward (fewer, fused kernels;
  ``RALMSPEC_ENCODER_COMPILE=1``);

each alone and beside a thread that holds the GIL 1 ms in every 5 (``duty20``: nearer an
event loop that drives vLLM). For every graphed variant ``graphed_phases`` splits a pass
(the p50 of tokenizing, launching, the device's own time, waiting for it, copying back).
It checks that a graphed text's vector is bit-identical over replays (what batch invariance
needs: every search and guess of a text get the same vector) and its cosine with the
shipped vector (padding changes the sums slightly). On a machine without CUDA only
``shipped`` runs.

    python3 benchmarks/gpu/probe_encoder.py --texts 300 --out-dir "$OUT/gpu"
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def query_texts(count: int) -> list[str]:
    """Texts shaped like RaLM queries: the first 8-40 words of real passages."""
    from ralmspec_vllm.retrieval.corpus import wiki_passages

    texts: list[str] = []
    for i, passage in enumerate(wiki_passages(count)):
        words = passage.text.split()
        texts.append(" ".join(words[: 8 + (i * 7) % 33]))
        if len(texts) >= count:
            break
    return texts


def timed(encode: Callable[[str], np.ndarray], texts: list[str], load: str) -> dict[str, Any]:
    from benchmarks.gpu.probe_gil import gil_load, percentiles

    with gil_load(load):
        for text in texts[:5]:
            encode(text)  # settle
        ms = []
        for text in texts:
            start = time.perf_counter()
            encode(text)
            ms.append(1000 * (time.perf_counter() - start))
    return {"load": load, **percentiles(ms)}


def graphed_phases(encoder: Any, texts: list[str]) -> dict[str, float]:
    """Where one graphed pass goes (the p50 of each phase, ms): ``tokenize`` (the fast
    tokenizer on one text), ``launch`` (ids to the device and the replay queued, host
    side), ``gpu`` (the replay on the device, between CUDA events), ``sync`` (the host
    waiting for it past the launch) and ``copy_back`` (the pooled vector to the host)."""
    import torch

    graphs = encoder.graphs
    phases: dict[str, list[float]] = {
        k: [] for k in ("tokenize", "launch", "gpu", "sync", "copy_back", "total")
    }
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.inference_mode():
        for text in texts:
            t0 = time.perf_counter()
            row = encoder._tokenizer([text], truncation=True, max_length=encoder.max_length)
            ids = torch.tensor([row["input_ids"][0]])
            t1 = time.perf_counter()
            graph, static, out = graphs._graphs[int(ids.shape[1])]
            static.copy_(ids)
            begin.record()
            graph.replay()
            end.record()
            t2 = time.perf_counter()
            end.synchronize()
            t3 = time.perf_counter()
            np.array(out[0].cpu().numpy(), dtype=np.float32)
            t4 = time.perf_counter()
            for name, seconds in (
                ("tokenize", t1 - t0), ("launch", t2 - t1), ("sync", t3 - t2),
                ("copy_back", t4 - t3), ("total", t4 - t0),
            ):  # fmt: skip
                phases[name].append(1000 * seconds)
            phases["gpu"].append(begin.elapsed_time(end))
    return {name: round(statistics.median(ms), 3) for name, ms in phases.items()}


def add_graphed(
    name: str,
    encoder: Any,
    texts: list[str],
    shipped: Callable[[str], np.ndarray],
    meta: dict[str, Any],
    variants: list[tuple[str, Callable[[str], np.ndarray]]],
) -> None:
    """A graphed variant to time, with its least cosine with the shipped vectors and its
    phases (``graphed_phases``) in ``meta`` as ``<name>_cosine_with_shipped_min`` and
    ``<name>_phases_p50_ms`` (``-`` read as ``_``)."""
    key = name.replace("-", "_")
    cosines = [float(np.dot(shipped(t), encoder.encode([t])[0])) for t in texts]
    meta[f"{key}_cosine_with_shipped_min"] = round(min(cosines), 7)
    variants.append((name, lambda text: encoder.encode([text])[0]))
    meta[f"{key}_phases_p50_ms"] = graphed_phases(encoder, texts)


def compiled_encoder(meta: dict[str, Any]) -> Any:
    """``graphed-compiled``'s encoder: what ``RALMSPEC_ENCODER_COMPILE=1`` ships, its
    forward compiled by ``torch.compile`` (Inductor fuses the norms, biases and activations
    between the matmuls) and captured at every length. Session 35 found the graphed pass
    latency-bound (0.70 ms of device time, bf16 the same): fewer kernels is what could make
    a guess cheaper. ``compiled_setup_s``: the start-up it costs (compilation and every
    capture)."""
    from ralmspec_vllm.retrieval.encoder import QueryEncoder

    start = time.perf_counter()
    fused = QueryEncoder(cuda_graphs=True, compile_forward=True)
    meta["compiled_setup_s"] = round(time.perf_counter() - start, 1)
    assert fused.graphs is not None
    meta["compiled_lengths"] = len(fused.graphs)
    return fused


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--out-dir", default=None, help="writes probe_encoder_<machine>.json")
    args = parser.parse_args()
    os.environ["RALMSPEC_ENCODER_MEMO"] = "0"  # every encode is a pass

    import torch

    from benchmarks.gpu.probe_gil import write_probe
    from ralmspec_vllm.retrieval.encoder import QueryEncoder

    texts = query_texts(args.texts)
    encoder = QueryEncoder()
    results: list[dict[str, Any]] = []
    meta: dict[str, Any] = {"device": encoder.device, "dtype": encoder.dtype, "texts": len(texts)}

    def shipped(text: str) -> np.ndarray:
        return encoder.encode([text])[0]

    variants: list[tuple[str, Callable[[str], np.ndarray]]] = [("shipped", shipped)]
    if torch.cuda.is_available() and encoder.device.startswith("cuda"):
        try:
            graphed = QueryEncoder(cuda_graphs=True)  # what RALMSPEC_ENCODER_CUDA_GRAPHS=1 ships
            first = [graphed.encode([t])[0] for t in texts]
            again = [graphed.encode([t])[0] for t in texts]
            assert graphed.graphs is not None
            meta["graphs"] = len(graphed.graphs)
            meta["capture_s"] = round(graphed.graphs.capture_s, 2)
            meta["graphed_bit_identical_over_replays"] = all(
                np.array_equal(a, b) for a, b in zip(first, again, strict=True)
            )
            add_graphed("graphed", graphed, texts, shipped, meta, variants)
        except Exception as exc:  # a probe: report why the capture failed
            meta["graph_error"] = f"{type(exc).__name__}: {exc}"
        try:
            # A cheaper guess? The same graphs under bf16 autocast: what it saves, and how
            # far its vectors are from float32's (a guess need not be exact; a search must).
            half = QueryEncoder(cuda_graphs=True, dtype="bfloat16")
            add_graphed("graphed-bf16", half, texts, shipped, meta, variants)
        except Exception as exc:
            meta["graph_bf16_error"] = f"{type(exc).__name__}: {exc}"
        try:
            fused = compiled_encoder(meta)
            add_graphed("graphed-compiled", fused, texts, shipped, meta, variants)
        except Exception as exc:
            meta["graph_compiled_error"] = f"{type(exc).__name__}: {exc}"
    for name, encode in variants:
        for load in ("idle", "duty20"):
            row = {"variant": name, **timed(encode, texts, load)}
            results.append(row)
            print(f"{name:>12} {load:>6}: p50 {row['p50_ms']:.3f} ms, p90 {row['p90_ms']:.3f} ms",
                  flush=True)  # fmt: skip
    write_probe(args.out_dir, "probe_encoder", meta, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
