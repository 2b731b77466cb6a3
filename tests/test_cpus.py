"""``--cpus`` lists and pinning (``ralmspec_vllm.cpus``); the retriever CLI's use of it is
tested with a real child in ``tests/retrieval/test_grpc_client.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ralmspec_vllm.cpus import parse_cpus


def test_parse_cpus_reads_cores_and_ranges() -> None:
    assert parse_cpus("0-3,8") == {0, 1, 2, 3, 8}
    assert parse_cpus(" 5 ") == {5}
    assert parse_cpus("2-2,1") == {1, 2}


@pytest.mark.parametrize("text", ["", "a", "3-1", "-1", "1-", "0,,2", "1.5"])
def test_parse_cpus_refuses_what_is_not_a_list_of_cores(text: str) -> None:
    with pytest.raises(ValueError, match="--cpus"):
        parse_cpus(text)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_pin_moves_the_process_and_its_later_children() -> None:
    core = min(os.sched_getaffinity(0))
    code = textwrap.dedent(
        f"""
        import os, subprocess, sys
        from ralmspec_vllm.cpus import pin
        assert pin("{core}") == {{{core}}}
        show = "import os; print(sorted(os.sched_getaffinity(0)))"
        child = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True)
        print(child.stdout.strip())
        try:
            pin("100000")
        except ValueError as exc:
            print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == f"[{core}]"  # the child inherited the set
    assert lines[1].startswith("--cpus: cannot run on '100000'")
