"""Benchmark command lines: flags mapped onto typed config dataclasses.

A benchmark declares its options as ``Flag`` triples (``--flag``, config field, argparse
keywords) and calls ``parse_config``, which builds an argparse parser whose defaults (and
``--help`` text) come from the config dataclass, applies ``--quick`` (a smoke-run overlay)
and ``--log-level``, and returns the config. ``OutputConfig`` is the base of every
benchmark config that writes results: its fields (``--out-dir``, ``--name``, ``--plot``, from
``output_flags``) say where ``common.write_results`` and ``common.plot_panels`` put them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from benchmarks.common import DEFAULT_OUT_DIR

Flag = tuple[str, str, dict[str, Any]]
"""(``--flag``, config field, argparse keywords): a benchmark option mapped onto its config."""

C = TypeVar("C")


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """Where a benchmark writes its results, inherited by the benchmark configs.

    The subclass adds ``output_flags(...)`` to its flags. Keyword-only, so that the
    subclass's own fields keep their positions in ``__init__``.
    """

    out_dir: str = str(DEFAULT_OUT_DIR)
    """Folder of the JSON and PNG results."""
    name: str | None = None
    """Result file stem; ``None``: the benchmark's own default (its ``--name`` help says)."""
    plot: bool = True
    """Save the PNG plot next to the JSON."""


def output_flags(default_name: str) -> tuple[Flag, ...]:
    """``--out-dir``, ``--name`` and ``--plot`` for an ``OutputConfig`` subclass.

    ``default_name`` is the stem used without ``--name``, as shown in ``--help``.
    """
    return (
        ("--out-dir", "out_dir", {"help": "results folder"}),
        ("--name", "name", {"help": f"result file stem (default: {default_name})"}),
        ("--plot", "plot", {"action": argparse.BooleanOptionalAction, "help": "save the PNG"}),
    )


def parse_config(
    config_cls: Callable[..., C],
    flags: Sequence[Flag],
    quick: Mapping[str, Any],
    description: str | None,
    argv: Sequence[str] | None = None,
) -> C:
    """Build a benchmark's config dataclass from the command line.

    Defaults come from the dataclass (shown in ``--help``); ``--quick`` overlays ``quick``;
    ``--log-level`` configures logging.
    """
    defaults = config_cls()
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag, name, kwargs in flags:
        default = getattr(defaults, name)
        if default is not None:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            kwargs = {**kwargs, "help": f"{kwargs['help']} (default: {shown})"}
        parser.add_argument(flag, dest=name, default=default, **kwargs)
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {dict(quick)}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    cfg = config_cls(**{name: getattr(args, name) for _, name, _ in flags})
    return dataclasses.replace(cfg, **quick) if args.quick else cfg  # type: ignore[type-var]
