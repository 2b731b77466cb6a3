"""The checked-in gRPC stubs match ``proto/retriever.proto`` (what CI's drift check runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_checked_in_stubs_match_the_proto() -> None:
    pytest.importorskip("grpc_tools")
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stubs_import_as_a_package() -> None:
    from ralmspec_vllm.retrieval.proto_gen import retriever_pb2, retriever_pb2_grpc

    assert retriever_pb2.DESCRIPTOR.package == "ralmspec.retriever.v1"
    assert retriever_pb2_grpc.RetrieverStub is not None
