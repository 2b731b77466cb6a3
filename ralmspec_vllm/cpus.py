"""``--cpus``: pin a process (and the children it starts after) to a set of CPU cores.

A serving host runs three busy processes side by side: the retriever's scan (many OpenMP
threads that wait for each other at every chunk), vLLM's engine core and the API server. When
the last two need a core, the scheduler takes it from the scan, and one preempted scan thread
stalls the whole chunk. Pinning them to disjoint cores keeps them apart, e.g. on 16 cores:
``serve --cpus 12-15 --retriever-arg=--cpus=0-11 --retriever-arg=--threads=12``. The engine
core inherits the server's set; a retriever child sets its own. Linux only
(``os.sched_setaffinity``)."""

from __future__ import annotations

import argparse
import os


def parse_cpus(text: str) -> set[int]:
    """``"0-11,14"`` -> {0, ..., 11, 14}; ``ValueError`` with the reason otherwise."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            raise ValueError(f"--cpus: {part!r} is not a core or a range like 0-11") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"--cpus: {part!r} is not a core or an ascending range")
        cpus.update(range(lo, hi + 1))
    return cpus


CPUS_HELP = (
    "pin this process (and what it starts) to these cores, e.g. 0-11 or 0-3,8 "
    "(default: all it may use)"
)


def add_cpus_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--cpus", default=None, metavar="LIST", help=CPUS_HELP)


def pin(text: str | None) -> set[int] | None:
    """Apply ``--cpus`` to this process; the cores it now runs on (None: unchanged).
    ``ValueError`` naming the cores where the list is bad or the system refuses it."""
    if text is None:
        return None
    cpus = parse_cpus(text)
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpus: this platform cannot pin processes (Linux only)")
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        count = os.cpu_count()
        raise ValueError(
            f"--cpus: cannot run on {text!r} ({exc.strerror}; {count} cores)"
        ) from None
    return set(os.sched_getaffinity(0))
