"""vLLM's own load generator (``vllm bench serve``, OpenAI completions backend) against the
real server: every request succeeds with the fields it sends (``ignore_eos``, ``stream_options``,
``repetition_penalty``, ``logprobs: null``, the ``ralm`` extension through ``--extra-body``),
and the baseline and ralmspec runs generate the same texts. Run in a subprocess (the client
is vLLM's code, started as its CLI would start it)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from .conftest import API_KEY, MODEL_NAME, Served

pytestmark = pytest.mark.vllm

CLIENT = """
import argparse, sys
from vllm.benchmarks.serve import add_cli_args, main
parser = argparse.ArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


async def test_vllm_bench_serve_runs_against_the_server(
    served: Served, tiny_model_dir: Path, tmp_path: Path
) -> None:
    texts = {}
    for mode in ("baseline", "ralmspec"):
        await served.service.reset_prefix_cache()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT,
            "--backend", "openai", "--base-url", served.base_url,
            "--endpoint", "/v1/completions", "--model", MODEL_NAME,
            "--tokenizer", str(tiny_model_dir), "--dataset-name", "random",
            "--random-input-len", "12", "--random-output-len", "12", "--num-prompts", "6",
            "--max-concurrency", "3", "--ignore-eos", "--temperature", "0", "--seed", "5",
            "--header", f"Authorization=Bearer {API_KEY}",
            "--extra-body", json.dumps({"ralm": {"mode": mode}}),
            "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
            "--result-filename", f"{mode}.json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), timeout=600)
        assert process.returncode == 0, out.decode()[-3000:]
        result = json.loads((tmp_path / f"{mode}.json").read_text())
        assert (result["completed"], result["failed"]) == (6, 0), result["errors"]
        assert result["total_output_tokens"] == 6 * 12  # ignore_eos: every answer runs to 12
        texts[mode] = result["generated_texts"]
    assert texts["ralmspec"] == texts["baseline"]
