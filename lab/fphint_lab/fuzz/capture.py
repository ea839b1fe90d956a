"""Make the fuzzers' seed corpus from real QEMU (run by hand; the outputs are committed).

Streams: a no-OS guest (a 64 KiB firmware image whose reset vector runs a loop
incrementing a word in two pages) migrated while running to ``exec:cat > file``
under QEMU 7.2 and 10.0, with the bandwidth low at first so the loop's pages
are re-sent in a few passes. Memory trees: ``info mtree -D`` (what
qmp/mtree.py parses) and ``info mtree -f`` (which it must refuse cleanly) of
several machine types. Ranges: real ReportChunks of this host's free pages
(/proc/kpageflags), cut small.

    flock /tmp/fphint-heavy.lock .venv/bin/python -m fphint_lab.fuzz.capture
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parents[3] / "tests" / "fuzz" / "corpus"
QEMU72 = ("qemu-system-x86_64", "")
QEMU10 = ("/var/cache/fphint/qemu-10.0/bin/qemu-system-x86_64", "/var/cache/fphint/qemu-10.0/share/qemu")

# F000:FFF0: xor ax,ax; mov ds,ax; l: inc word [0x5000]; inc word [0x9000]; jmp l
_RESET = bytes.fromhex("31c08ed8ff060050ff060090ebf6")


def _firmware(path: Path) -> Path:
    image = bytearray(64 << 10)
    image[-16 : -16 + len(_RESET)] = _RESET
    path.write_bytes(bytes(image))
    return path


class _Qmp:
    def __init__(self, path: str) -> None:
        for _ in range(100):
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.sock.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")


def _qemu(qemu: tuple[str, str], machine: str, work: Path, *extra: str) -> tuple[subprocess.Popen[bytes], _Qmp]:
    binary, datadir = qemu
    qmp = str(work / f"qmp-{time.monotonic_ns()}.sock")
    argv = [
        binary,
        *(["-L", datadir] if datadir else []),
        "-M",
        machine,
        "-accel",
        "tcg",
        "-display",
        "none",
        "-nodefaults",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
        *extra,
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, _Qmp(qmp)


def stream(qemu: tuple[str, str], machine: str, out: Path, work: Path) -> None:
    proc, q = _qemu(qemu, machine, work, "-m", "8", "-bios", str(_firmware(work / "fw.bin")))
    try:
        q.cmd("migrate-set-parameters", **{"max-bandwidth": 256 << 10, "downtime-limit": 1})
        q.cmd("migrate", uri=f"exec:cat > {out}")
        time.sleep(0.06)  # a few passes re-send the loop's two pages
        q.cmd("migrate-set-parameters", **{"downtime-limit": 2000, "max-bandwidth": 1 << 30})
        for _ in range(200):
            st = q.cmd("query-migrate")
            if st.get("status") in ("completed", "failed"):
                break
            time.sleep(0.05)
        assert st["status"] == "completed", st
        print(out.name, out.stat().st_size, "bytes,", st["ram"]["dirty-sync-count"], "passes")
    finally:
        proc.kill()
        proc.wait()


def mtree(qemu: tuple[str, str], machine: str, flag: str, out: Path, work: Path) -> None:
    proc, q = _qemu(qemu, machine, work, "-m", "64", "-S")
    try:
        text = q.cmd("human-monitor-command", **{"command-line": f"info mtree {flag}"})
        out.write_text(text)
        print(out.name, len(text), "bytes")
    finally:
        proc.kill()
        proc.wait()


def chunks(out_dir: Path) -> None:
    from fphint import ranges
    from fphint.v1 import hints_pb2
    from guest_agent.sources.kpageflags import KpageflagsSource

    src = KpageflagsSource()
    src.open()
    snap = src.snapshot()
    src.close()
    rs = list(snap.ranges)
    for i, (lo, n) in enumerate([(0, 64), (len(rs) // 2, 256)]):
        words = ranges.encode(rs[lo : lo + n])
        chunk = hints_pb2.ReportChunk(epoch=1 + i, seq=0, kind=hints_pb2.REPORT_KIND_SNAPSHOT, ranges=words, end=True)
        (out_dir / f"host-snapshot-{i}.pb").write_bytes(bytes([0]) + chunk.SerializeToString())
    print("ranges:", len(rs), "host ranges, 2 seeds")


def main() -> None:
    for d in ("stream", "mtree", "ranges"):
        (CORPUS / d).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stream(QEMU72, "pc,acpi=off", CORPUS / "stream" / "qemu72-pc.bin", work)
        stream(QEMU10, "pc,acpi=off", CORPUS / "stream" / "qemu10-pc.bin", work)
        stream(QEMU10, "q35,acpi=off", CORPUS / "stream" / "qemu10-q35.bin", work)
        mtree(QEMU72, "pc", "-D", CORPUS / "mtree" / "qemu72-pc-D.txt", work)
        mtree(QEMU10, "q35", "-D", CORPUS / "mtree" / "qemu10-q35-D.txt", work)
        mtree(QEMU10, "microvm", "-D", CORPUS / "mtree" / "qemu10-microvm-D.txt", work)
        mtree(QEMU10, "isapc", "-D", CORPUS / "mtree" / "qemu10-isapc-D.txt", work)
        mtree(QEMU72, "q35", "-f", CORPUS / "mtree" / "qemu72-q35-f.txt", work)
    if os.access("/proc/kpageflags", os.R_OK):
        chunks(CORPUS / "ranges")


if __name__ == "__main__":
    main()
