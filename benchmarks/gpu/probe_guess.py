"""Where a dense guess's time goes: the encoder pass, the worker-thread round trip, scoring.

Session 38 (H100, IVF-SQ8 at 21M, PSA early, compiled encoder): the LM waited on guesses
0.056 s an answer, 2.1 ms a step, the largest part of RaLMSpec's gap to the oracle. A guess
(``DenseCacheScorer.top1``) took 1.7 ms on average, where the encoder's pass alone takes
0.785 ms at the p50 (session 37's probe). The rest is scoring the cache (a float32 product
with ~1,560 cached vectors, then the exact candidates) and the pass's trip to a worker
thread and back (``ThreadEmbedder``: the event loop stays free while the encoder runs).
This probe times, one query text at a time, memo off:

- ``encoder``: the product's encoder alone (``encoder_for()``: graphed on CUDA, compiled
  with ``RALMSPEC_ENCODER_COMPILE=1``, as the latency runs have it);
- ``guess-inline``: ``top1`` over a cache of ``--cache-docs`` unit vectors, the encoder
  called on the event loop's thread (``RaLMEngine(encode_in_thread=False)``);
- ``guess-thread``: the same, the encoder in a worker thread (the shipped default);
- ``score-only``: the same with an instant encoder (the vector at hand): scoring alone;

each idle and beside a thread that holds the GIL 1 ms in every 5 (``duty20``), under the
switch interval the 21M runs set (``--switch-interval-ms``, 0.5). ``derived_p50_ms`` gives
the round trip (thread minus inline) and the rest of the inline guess past the encoder. Both
guess variants return the same documents (checked).

    python3 benchmarks/gpu/probe_guess.py --texts 300 --out-dir "$OUT/gpu"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def unit_vectors(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


async def timed(
    call: Callable[[str], Awaitable[Any]], texts: list[str]
) -> tuple[list[float], list[Any]]:
    """Milliseconds of each ``call(text)`` after a 5-text settle, and what each returned."""
    for text in texts[:5]:
        await call(text)
    ms, out = [], []
    for text in texts:
        start = time.perf_counter()
        out.append(await call(text))
        ms.append(1000 * (time.perf_counter() - start))
    return ms, out


def run_variants(
    encode: Callable[[Sequence[str]], np.ndarray], texts: list[str], cache_docs: int, load: str
) -> tuple[list[dict[str, Any]], bool]:
    """Every variant under ``load``; also whether both guess variants chose the same."""
    from benchmarks.gpu.probe_gil import gil_load, percentiles
    from ralmspec_vllm.core.cache import DenseCacheScorer, SpeculationCache
    from ralmspec_vllm.core.trace import TraceRecorder

    dim = int(encode(texts[:1]).shape[1])
    vectors = unit_vectors(cache_docs, dim)
    cache = SpeculationCache(max(cache_docs, 1))
    ids = list(range(cache_docs))
    cache.insert(ids, dict(zip(ids, vectors, strict=True)))
    at_hand = {text: encode([text]) for text in texts}  # score-only's "encoder"
    recorder = TraceRecorder("probe")
    inline = DenseCacheScorer(encode, in_thread=False)
    thread = DenseCacheScorer(encode, in_thread=True)
    instant = DenseCacheScorer(lambda batch: at_hand[batch[0]], in_thread=False)

    async def encoder(text: str) -> None:
        encode([text])

    variants: list[tuple[str, Callable[[str], Awaitable[Any]]]] = [
        ("encoder", encoder),
        ("guess-inline", lambda t: inline.top1(cache, t, recorder)),
        ("guess-thread", lambda t: thread.top1(cache, t, recorder)),
        ("score-only", lambda t: instant.top1(cache, t, recorder)),
    ]
    rows, chosen = [], {}
    with gil_load(load):
        for name, call in variants:
            ms, out = asyncio.run(timed(call, texts))
            chosen[name] = out
            rows.append({"variant": name, "load": load, **percentiles(ms)})
            print(f"{name:>13} {load:>6}: p50 {rows[-1]['p50_ms']:.3f} ms, "
                  f"p90 {rows[-1]['p90_ms']:.3f} ms", flush=True)  # fmt: skip
    return rows, chosen["guess-inline"] == chosen["guess-thread"]


def derived(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per load, from the p50s: ``thread_round_trip`` (thread minus inline guess) and
    ``inline_past_encoder`` (inline guess minus the encoder alone: scoring and the rest)."""
    p50 = {(r["variant"], r["load"]): r["p50_ms"] for r in rows}
    out = {}
    for load in sorted({r["load"] for r in rows}):
        out[load] = {
            "thread_round_trip": round(p50["guess-thread", load] - p50["guess-inline", load], 3),
            "inline_past_encoder": round(p50["guess-inline", load] - p50["encoder", load], 3),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument(
        "--cache-docs", type=int, default=1560, help="cached documents a guess ranks (21M: ~1,560)"
    )
    parser.add_argument("--switch-interval-ms", type=float, default=0.5)
    parser.add_argument("--out-dir", default=None, help="writes probe_guess_<machine>.json")
    args = parser.parse_args()
    if args.texts < 1 or args.cache_docs < 1 or not args.switch_interval_ms > 0:
        parser.error("--texts and --cache-docs must be positive, --switch-interval-ms > 0")
    os.environ["RALMSPEC_ENCODER_MEMO"] = "0"  # every encode is a pass
    sys.setswitchinterval(args.switch_interval_ms / 1000)

    from benchmarks.gpu.probe_encoder import query_texts
    from benchmarks.gpu.probe_gil import write_probe
    from ralmspec_vllm.retrieval.encoder import encoder_for

    texts = query_texts(args.texts)
    start = time.perf_counter()
    encoder = encoder_for()
    meta: dict[str, Any] = {
        "device": encoder.device,
        "encoder_settings": encoder.settings,
        "encoder_setup_s": round(time.perf_counter() - start, 1),
        "texts": len(texts),
        "cache_docs": args.cache_docs,
        "switch_interval_ms": args.switch_interval_ms,
    }
    results: list[dict[str, Any]] = []
    same = True
    for load in ("idle", "duty20"):
        rows, agreed = run_variants(encoder.encode, texts, args.cache_docs, load)
        results.extend(rows)
        same = same and agreed
    meta["guesses_identical_inline_and_thread"] = same
    meta["derived_p50_ms"] = derived(results)
    write_probe(args.out_dir, "probe_guess", meta, results)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
