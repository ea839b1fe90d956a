"""The committed stubs are what protos/generate.py makes from protos/, and the
runtime requirements are at least the versions the stubs were made with."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)], check=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "fphint" / "v1").glob("*_pb2*"))
    assert fresh == committed, "stub file set differs: run `make protos`"
    stale = [str(p) for p in fresh if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not stale, f"stale generated stubs (run `make protos`): {stale}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def test_runtime_pins_cover_generated_code() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    mins = {m.group(1): _version(m.group(2)) for d in deps if (m := re.match(r"([a-z]+)>=([\d.]+)", d))}
    pb = (ROOT / "fphint" / "v1" / "hints_pb2.py").read_text()
    gen_pb = _version(re.search(r"Protobuf Python Version: ([\d.]+)", pb).group(1))  # type: ignore[union-attr]
    grpc_src = (ROOT / "fphint" / "v1" / "hints_pb2_grpc.py").read_text()
    gen_grpc = _version(re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_src).group(1))  # type: ignore[union-attr]
    assert mins["protobuf"] >= gen_pb, f"protobuf>= {mins['protobuf']} is older than the stubs ({gen_pb})"
    assert mins["grpcio"] >= gen_grpc, f"grpcio>= {mins['grpcio']} is older than the stubs ({gen_grpc})"
