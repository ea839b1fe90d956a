"""Kernel headers for bcc: the cached merged tree scripts/bcc-headers.sh
builds on a kernel without headers, and the native Debian layout (split
``build``/``source`` trees) that the guest images use.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bcc-headers.sh"
RELEASE = os.uname().release
NATIVE = os.path.exists(f"/lib/modules/{RELEASE}/build/include/linux/kconfig.h")

debian_headers = pytest.mark.skipif(
    not glob.glob("/usr/src/linux-headers-*-common"), reason="Debian linux-headers packages not installed"
)


def _run(cache: Path) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(SCRIPT)], env={**os.environ, "FPHINT_CACHE": str(cache)}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - t0, proc.stdout.strip().splitlines()[-1]


@debian_headers
@pytest.mark.skipif(NATIVE, reason="this kernel has native headers: the script does nothing")
def test_script_builds_a_complete_tree_once(tmp_path: Path) -> None:
    _, out = _run(tmp_path)
    current = tmp_path / "kernel-headers" / "current"
    assert out == str(current)
    assert (current / "include" / "linux" / "kconfig.h").is_file()  # from the -common package
    assert (current / "arch" / "x86" / "include" / "generated").is_dir()  # from the flavour package
    assert (current / ".complete").read_text().startswith("linux-headers-")
    assert not (current / "scripts").is_symlink() or (current / "scripts").exists(), "no dangling links"
    first = os.stat(current / "include" / "linux" / "kconfig.h").st_ino
    _, again = _run(tmp_path)
    assert again == out
    assert os.stat(current / "include" / "linux" / "kconfig.h").st_ino == first, "idempotent: not rebuilt"
    assert [p.name for p in (tmp_path / "kernel-headers").iterdir() if p.name.startswith(".")] == []


@debian_headers
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
@pytest.mark.bpf
def test_bcc_compiles_with_a_native_split_tree(tmp_path: Path) -> None:
    """What a Debian guest has: /lib/modules/$(uname -r)/{build,source}, no
    BCC_KERNEL_SOURCE. Simulated in a private mount namespace."""
    flavour = sorted(p for p in glob.glob("/usr/src/linux-headers-*") if not p.endswith("-common"))[-1]
    common = glob.glob(flavour.rsplit("-", 1)[0] + "-common")[0]
    fake = tmp_path / "modules" / RELEASE
    fake.mkdir(parents=True)
    (fake / "build").symlink_to(flavour)
    (fake / "source").symlink_to(common)
    code = """
import json, os, sys
os.environ.pop("BCC_KERNEL_SOURCE", None)
from guest_agent.sources.ebpf import headers, program, system
from guest_agent.sources.ebpf.btf import Btf
from guest_agent.sources.ebpf.layout import page_layout
src = headers.kernel_source()
cfg = program.ProgramConfig(page_layout(Btf.load(), os.uname().release), system.ram_pfn_ranges()[-1][1])
p = program.LoadedProgram(cfg, src)
ok = p.peek.run(0) == 0  # reading address 0 fails cleanly
p.close()
print(json.dumps({"source": src, "loaded": ok}))
"""
    shell = f'mount --bind {tmp_path / "modules"} /lib/modules && exec "$@"'
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, "sh", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"source": None, "loaded": True}
