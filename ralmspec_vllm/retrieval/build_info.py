"""``ralmspec-vllm index info [DIR]``: print an index's manifest as JSON.

Without ``DIR`` it reads the default index in the cache dir (``ralmspec-vllm index build``
with no options builds it).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ralmspec_vllm.retrieval.build import default_index_path
from ralmspec_vllm.retrieval.kb import KnowledgeBase

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir",
        nargs="?",
        type=Path,
        default=None,
        help="index folder (default: the default index in the cache dir)",
    )


def run(args: argparse.Namespace) -> int:
    path = args.dir or default_index_path()
    try:
        kb = KnowledgeBase.open(path)
    except (OSError, ValueError) as exc:
        logger.error("%s", exc)
        return 1
    print(kb.manifest.to_json(), end="")
    return 0
