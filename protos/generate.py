#!/usr/bin/env python3
"""Regenerate the committed Python stubs from protos/ with the pinned grpcio-tools.

One script, so the stubs can be checked for staleness by running it into a
temporary directory (tests/test_protos.py) and comparing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
#: The generator version the committed stubs were made with; bump with care,
#: runtime protobuf/grpcio must stay at least this new (pyproject.toml).
GRPCIO_TOOLS_VERSION = "1.85.1"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("fphint/v1/*.proto"))


def generate(out_dir: Path) -> None:
    from importlib.metadata import version

    from grpc_tools import protoc  # type: ignore[import-untyped]

    have = version("grpcio-tools")
    if have != GRPCIO_TOOLS_VERSION:
        raise SystemExit(f"grpcio-tools {have} installed, stubs are pinned to {GRPCIO_TOOLS_VERSION}")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_DIR)) for p in proto_files()],
    ]
    import os

    cwd = os.getcwd()
    os.chdir(PROTO_DIR)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    generate(ap.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
