"""Regenerate the checked-in gRPC stubs from ``proto/retriever.proto`` (or check for drift).

    python proto/generate.py          # rewrite ralmspec_vllm/retrieval/proto_gen/
    python proto/generate.py --check  # regenerate into a temp dir, exit 1 if they differ

The stubs are generated with the pinned ``grpcio-tools`` (requirements/project.txt), so the
check is exact. ``protoc`` writes ``import retriever_pb2`` in the ``_grpc`` module, which only
works with ``proto_gen`` on ``sys.path``; it is rewritten to an absolute package import.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO = "retriever.proto"
PACKAGE = "ralmspec_vllm.retrieval.proto_gen"
OUT_DIR = ROOT / PACKAGE.replace(".", "/")
PINNED_TOOLS = "1.76.0"
INIT = '"""Generated gRPC stubs for proto/retriever.proto: do not edit, run proto/generate.py."""\n'


def generate(out_dir: Path) -> None:
    """Write retriever_pb2.py/.pyi, retriever_pb2_grpc.py and __init__.py into ``out_dir``."""
    from importlib.metadata import version

    from grpc_tools import protoc

    tools = version("grpcio-tools")
    if tools != PINNED_TOOLS:
        raise SystemExit(f"grpcio-tools {tools} installed, stubs are pinned to {PINNED_TOOLS}")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    grpc_file = out_dir / "retriever_pb2_grpc.py"
    source = grpc_file.read_text()
    fixed = source.replace(
        "import retriever_pb2 as retriever__pb2",
        f"from {PACKAGE} import retriever_pb2 as retriever__pb2",
    )
    if fixed == source:
        raise SystemExit("could not find the relative import to rewrite in retriever_pb2_grpc.py")
    grpc_file.write_text(fixed)
    (out_dir / "__init__.py").write_text(INIT)


def _files(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.glob("*.py*")) if p.is_file()}


def check() -> int:
    """0 when the checked-in stubs equal freshly generated ones, else 1 with a diff summary."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = _files(Path(tmp))
    current = _files(OUT_DIR) if OUT_DIR.is_dir() else {}
    drift = False
    for name in sorted(set(fresh) | set(current)):
        if name not in current:
            print(f"missing: {name}")
        elif name not in fresh:
            print(f"unexpected: {name}")
        elif fresh[name] != current[name]:
            diff = list(
                difflib.unified_diff(
                    current[name].splitlines(),
                    fresh[name].splitlines(),
                    f"checked-in/{name}",
                    f"generated/{name}",
                    lineterm="",
                )
            )
            print(f"differs: {name} ({len(diff)} diff lines)")
            print("\n".join(diff[:40]))
        else:
            continue
        drift = True
    if drift:
        print(f"stubs in {OUT_DIR.relative_to(ROOT)} are stale: run python proto/generate.py")
        return 1
    print(f"stubs up to date ({len(fresh)} files)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if checked-in stubs drift")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        if OUT_DIR.exists():
            shutil.rmtree(OUT_DIR)
        shutil.copytree(tmp, OUT_DIR, ignore=shutil.ignore_patterns("__pycache__"))
    print(f"wrote {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
