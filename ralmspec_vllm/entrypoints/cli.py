"""``ralmspec-vllm <command>``: one CLI for every entry point.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so ``--help`` stays fast and a retriever
host never imports vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# (command words) -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("index", "build"): (
        "ralmspec_vllm.retrieval.build",
        "build a knowledge-base index (default: real Wikipedia passages)",
    ),
    ("index", "info"): (
        "ralmspec_vllm.retrieval.build_info",
        "print an index's manifest",
    ),
    ("retriever", "serve"): (
        "ralmspec_vllm.retrieval.server",
        "serve an index over gRPC (exact/approximate dense, BM25)",
    ),
    ("serve",): (
        "ralmspec_vllm.entrypoints.serve",
        "OpenAI-compatible RaLM server on vLLM with a retriever service",
    ),
    ("questions",): (
        "ralmspec_vllm.questions",
        "export open-domain QA questions (NQ, TriviaQA, WebQuestions) as JSONL",
    ),
}


def _load(module: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(module)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ralmspec-vllm",
        description="Lossless speculative retrieval for iterative retrieval-augmented LMs.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    top = parser.add_subparsers(dest="command", metavar="<command>")
    groups: dict[str, argparse._SubParsersAction] = {}
    wanted = [w for w in argv if not w.startswith("-")]
    for words, (module, help_text) in COMMANDS.items():
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text, description=help_text)
        else:
            if words[0] not in groups:
                grp = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = grp.add_subparsers(dest="subcommand", metavar="<subcommand>")
            sub = groups[words[0]].add_parser(words[1], help=help_text, description=help_text)
        sub.set_defaults(_module=module)
        # Only the command being run imports its module (to add its arguments).
        if list(words) == wanted[: len(words)]:
            _load(module).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = getattr(args, "_module", None)
    if module is None:
        parser.print_help()
        return 2
    return int(_load(module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
