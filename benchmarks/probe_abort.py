"""Probe: what an aborted LM step costs on vLLM, the price of an early-verification miss.

Early verification (``SpeculationConfig.early_verification``) sends a step's search before
the step is generated; when the search answers "miss" the step in flight is cancelled and
aborted (``SpeculativeRequest._discard``) and regenerated with the true document. On the
H200 (session 20, HNSW at 1M) a miss cost ~17 ms more than the search it waited for, on a
~22 ms step: this measures where that goes, with nothing else running.

Each trial uses prompts of fresh random tokens (a new document in front, as after a miss: the
prefix cache cannot help), ``--prompt-tokens`` long, ``--step-tokens`` generated:

- ``plain``: one step, timed alone (what a plain retrieval step's LM part costs);
- ``miss`` for each ``--abort-after-ms`` X: a step started, cancelled and aborted after X
  ms exactly as the speculative path does, then at once the regenerated step on another
  fresh prompt. ``overhead`` = (start to the regenerated step's end) - X - the trial's
  ``plain``: what the abort cost beyond the time already spent and a plain step.

    python benchmarks/probe_abort.py --model smollm2-135m --trials 20 --abort-after-ms 1,3,10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import describe_machine, write_results

_ids = itertools.count()


def _prompt(rng: np.random.Generator, vocab: int, length: int) -> list[int]:
    return rng.integers(100, vocab, size=length).tolist()


async def _step(lm: Any, prompt: list[int], tokens: int) -> float:
    start = time.perf_counter()
    await lm.generate(prompt, tokens, f"probe-{next(_ids)}")
    return time.perf_counter() - start


async def _miss(lm: Any, first: list[int], again: list[int], tokens: int, after_s: float) -> float:
    """Start a step on ``first``, abort it after ``after_s`` as ``_discard`` does (cancel the
    task, then ``abort``), then generate on ``again``: seconds from start to the end."""
    request_id = f"probe-{next(_ids)}"
    start = time.perf_counter()
    task = asyncio.create_task(lm.generate(first, tokens, request_id))
    await asyncio.sleep(after_s)
    if not task.done():
        task.cancel()
        await lm.abort(request_id)
    await asyncio.gather(task, return_exceptions=True)
    await lm.generate(again, tokens, f"probe-{next(_ids)}")
    return time.perf_counter() - start


async def probe(
    lm: Any,
    trials: int,
    abort_after_ms: Sequence[float],
    prompt_tokens: int,
    step_tokens: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per abort delay (and one for the plain step): p50 and mean in ms."""
    rng = np.random.default_rng(seed)
    vocab = len(lm.tokenizer) if hasattr(lm.tokenizer, "__len__") else 32000
    fresh = lambda: _prompt(rng, vocab, prompt_tokens)  # noqa: E731
    await _step(lm, fresh(), step_tokens)  # warm-up
    plain: list[float] = []
    misses: dict[float, list[float]] = {ms: [] for ms in abort_after_ms}
    for _ in range(trials):
        plain.append(await _step(lm, fresh(), step_tokens))
        for ms in abort_after_ms:
            misses[ms].append(await _miss(lm, fresh(), fresh(), step_tokens, ms / 1000))
    base = statistics.median(plain)
    rows = [_row("plain", None, plain, None)]
    for ms, times in misses.items():
        overhead = [t - ms / 1000 - base for t in times]
        rows.append(_row("miss", ms, times, overhead))
    return rows


def _row(
    kind: str, after_ms: float | None, times: list[float], overhead: list[float] | None
) -> dict[str, Any]:
    ms = [t * 1000 for t in times]
    row: dict[str, Any] = {
        "kind": kind,
        "abort_after_ms": after_ms,
        "trials": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }
    if overhead is not None:
        over = [o * 1000 for o in overhead]
        row["overhead_p50_ms"] = round(statistics.median(over), 3)
        row["overhead_mean_ms"] = round(statistics.fmean(over), 3)
    return row


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default=None, help="LM dtype (default: float32)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--abort-after-ms", default="1,3,10")
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--step-tokens", type=int, default=4)
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    args.abort_after_ms = [float(x) for x in args.abort_after_ms.split(",") if x]
    if args.trials < 1 or args.prompt_tokens < 1 or args.step_tokens < 1:
        parser.error("--trials, --prompt-tokens and --step-tokens must be positive")
    return args


async def main(argv: Sequence[str] | None = None) -> Path:
    from ralmspec_vllm.engine.lm import VllmLanguageModel
    from ralmspec_vllm.engine.models import resolve_model
    from ralmspec_vllm.engine.settings import EngineConfig

    args = parse_args(argv)
    config = EngineConfig(model=str(resolve_model(args.model)), seed=0, dtype=args.dtype)
    lm = await VllmLanguageModel.create(config)
    try:
        rows = await probe(
            lm, args.trials, args.abort_after_ms, args.prompt_tokens, args.step_tokens
        )
    finally:
        await lm.shutdown()
    machine = describe_machine()
    for row in rows:
        print(row, flush=True)
    name = args.name or f"probe_abort_{machine.tag}_{Path(args.model).name}"
    meta = {"benchmark": "probe_abort", "machine": asdict(machine), "params": vars(args)}
    return write_results(name, rows, meta, args.out_dir)


if __name__ == "__main__":
    print(f"wrote {asyncio.run(main())}")
