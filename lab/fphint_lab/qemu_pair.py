"""Source and destination QEMU for stream tests: no guest OS, RAM in files.

Each VM's main RAM is one or more ``memory-backend-file,share=on`` objects in
the test's directory, so a test writes known patterns into the source's RAM
before QEMU starts and compares the two RAM files page by page afterwards.
Writes through the file are invisible to QEMU's dirty logging, so patterns
are written before the migration, never during it.

A running source executes a 36-byte boot sector that keeps incrementing one
word in each of the 128 pages at 0x20000-0x9ffff: a guest that dirties memory
without an OS, so pages are re-sent in later passes (XBZRLE needs that).

The binary comes from ``$FPH_QEMU`` (default ``qemu-system-x86_64``), with
``$FPH_QEMU_DATADIR`` passed as ``-L`` (to run an unpacked newer QEMU).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from qemu.qmp.legacy import QEMUMonitorProtocol

from host_collector.layout import RamLayout, RamRange
from vmimage.accel import Accel, tcg

PAGE = 4096
GiB = 1 << 30
MiB = 1 << 20
FOUR_G = 4 * GiB

QEMU = os.environ.get("FPH_QEMU", "qemu-system-x86_64")
QEMU_DATADIR = os.environ.get("FPH_QEMU_DATADIR", "")

#: Pages the boot-sector loop dirties (GPA 0x20000-0x9ffff).
DIRTY_GPA = (0x20000, 0xA0000)

# cli; xor ax,ax; mov ss,ax; mov sp,0x7c00
# outer: mov bx,0x2000
# inner: mov es,bx; inc word [es:0]; invlpg [es:0]; add bx,0x100; cmp bx,0xa000; jb inner
#        jmp outer
# The invlpg works around a QEMU 7.2 TCG bug: the word-aligned path of
# cpu_physical_memory_sync_dirty_bitmap() clears migration dirty bits without
# resetting TCG's TLB "notdirty" state, so writes through a TLB entry that was
# already dirty go unlogged after the second pass and the destination ends up
# with stale pages, proxy or not (seen with 7.2.22; 10.0.2 does not show it).
# Flushing the entry after each write makes every write take the logged path.
_BOOT_CODE = bytes.fromhex("fa31c08ed0bc007cbb00208ec326ff060000260f013e000081c3000181fb00a072e9ebe4")


def boot_image(path: Path) -> Path:
    """A 1 MiB raw disk whose boot sector runs the dirtying loop."""
    sector = bytearray(512)
    sector[: len(_BOOT_CODE)] = _BOOT_CODE
    sector[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.write(sector)
        f.truncate(MiB)
    return path


@dataclass(frozen=True)
class Machine:
    """An x86 guest: machine type, RAM size and how main RAM splits into backends."""

    kind: str  # "pc" or "q35"
    ram: int
    #: Sizes of the NUMA memdevs m0, m1, ... that make up main RAM, in order;
    #: empty: one backend called "mem".
    memdevs: tuple[int, ...] = ()

    def backends(self) -> list[tuple[str, int]]:
        if not self.memdevs:
            return [("mem", self.ram)]
        assert sum(self.memdevs) == self.ram
        return [(f"m{i}", size) for i, size in enumerate(self.memdevs)]

    def split(self) -> tuple[int, int]:
        """(below 4 GiB, above 4 GiB): hw/i386/pc_piix.c and pc_q35.c of QEMU 7.2 and 10.0."""
        if self.kind == "q35":
            lowmem = 0x80000000 if self.ram >= 0xB0000000 else 0xB0000000
        else:
            lowmem = 0xE0000000
            if self.ram >= lowmem:
                lowmem = 0xC0000000
        below = min(self.ram, lowmem)
        return below, self.ram - below

    def layout(self) -> RamLayout:
        """GPA -> (backend, offset) of main RAM: [0, below) and [4G, 4G + above)."""
        below, above = self.split()
        spans = [(0, 0, below)]  # (gpa, main-RAM offset, size)
        if above:
            spans.append((FOUR_G, below, above))
        ranges: list[RamRange] = []
        start = 0
        for name, size in self.backends():
            for gpa, off, n in spans:
                lo, hi = max(off, start), min(off + n, start + size)
                if lo < hi:
                    ranges.append(RamRange(gpa + lo - off, hi - lo, name, lo - start))
            start += size
        return RamLayout(tuple(ranges), dict(self.backends()))

    def argv(self, files: dict[str, Path]) -> list[str]:
        args = ["-machine", self.kind, "-m", f"{self.ram // MiB}M"]
        for name, size in self.backends():
            args += ["-object", f"memory-backend-file,id={name},size={size // MiB}M,mem-path={files[name]},share=on"]
        if self.memdevs:
            for i, (name, _) in enumerate(self.backends()):
                args += ["-numa", f"node,nodeid={i},memdev={name}"]
        else:
            args[1] += ",memory-backend=mem"
        return args


@dataclass
class Vm:
    """One QEMU process, its RAM files and its QMP connection."""

    machine: Machine
    workdir: Path
    name: str
    incoming: bool
    running: bool = False
    boot: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    qmp: QEMUMonitorProtocol | None = None
    files: dict[str, Path] = field(default_factory=dict)
    log: Path | None = None
    #: Where the RAM files go (default: workdir). Postcopy in QEMU 10.0 wants tmpfs.
    ram_dir: Path | None = None
    #: More QEMU arguments (e.g. a second -qmp monitor for the collector).
    extra_args: list[str] = field(default_factory=list)
    #: The QEMU binary (default ``$FPH_QEMU``); a wrapper that adds its own -L works too.
    qemu: str = QEMU
    #: TCG unless a caller passes vmimage.accel.choose(): these no-OS guests
    #: and the tests over them model TCG's dirty logging (the boot sector's
    #: invlpg, the pre-flight's TCG verdicts on QEMU < 9.0).
    accel: Accel = field(default_factory=lambda: tcg("qemu_pair: the stream tests model TCG's dirty logging"))

    def __post_init__(self) -> None:
        for name, size in self.machine.backends():
            path = (self.ram_dir or self.workdir) / f"{self.name}-{name}.ram"
            with open(path, "wb") as f:
                f.truncate(size)
            self.files[name] = path
        self.log = self.workdir / f"{self.name}.log"

    def start(self) -> None:
        qmp_path = self.workdir / f"{self.name}.qmp"
        argv = [self.qemu, *self.accel.qemu_args(), "-nodefaults", "-no-user-config", "-display", "none", "-smp", "1"]
        if QEMU_DATADIR and self.qemu == QEMU:
            argv += ["-L", QEMU_DATADIR]
        argv += self.machine.argv(self.files)
        if self.boot is not None:
            argv += ["-drive", f"file={self.boot},format=raw,if=ide,index=0,snapshot=on"]
        if self.incoming:
            argv += ["-incoming", "defer", "-S"]
        elif not self.running:
            argv += ["-S"]
        argv += ["-qmp", f"unix:{qmp_path},server=on,wait=off", *self.extra_args]
        assert self.log is not None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: QEMU did not start: {self.log.read_text()}")
            time.sleep(0.02)
        while True:  # the socket file appears at bind(), a moment before listen()
            self.qmp = QEMUMonitorProtocol(str(qmp_path))
            try:
                self.qmp.connect()
                break
            except Exception:
                self.qmp.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def cmd(self, name: str, **args: Any) -> Any:
        assert self.qmp is not None
        return self.qmp.cmd(name, **args)

    def set_caps(self, **caps: bool) -> None:
        self.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()],
        )

    def migration(self) -> dict[str, Any]:
        result: dict[str, Any] = self.cmd("query-migrate")
        return result

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def wait_migration(self, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.migration()
            if info.get("status") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: migration still {info.get('status')!r}: {info}")
            time.sleep(0.05)

    def listen_incoming(self) -> int:
        """Start the incoming side on a free loopback port; returns the port."""
        self.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        for addr in self.migration().get("socket-address", []):
            if addr.get("type") in ("inet", "tcp"):
                return int(addr["port"])
        raise RuntimeError(f"{self.name}: no incoming socket address")

    def exit_code(self, timeout: float) -> int | None:
        """The process's exit status once it exited by itself, None if still running."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.close()
            self.qmp = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def log_text(self) -> str:
        assert self.log is not None
        return self.log.read_text(errors="replace")


def write_gpa(vm: Vm, gpa: int, data: bytes) -> None:
    """Write guest-physical bytes through the RAM files (before QEMU starts)."""
    layout = vm.machine.layout()
    pos = 0
    while pos < len(data):
        r = layout.find(gpa + pos)
        if r is None:
            raise ValueError(f"GPA {gpa + pos:#x} is not RAM")
        n = min(len(data) - pos, r.end - (gpa + pos))
        with open(vm.files[r.block], "r+b") as f:
            f.seek(r.offset + gpa + pos - r.gpa)
            f.write(data[pos : pos + n])
        pos += n


def loop_counter(vm: Vm) -> int:
    """The word the boot-sector loop increments in its first page (read through the RAM file)."""
    r = vm.machine.layout().find(DIRTY_GPA[0])
    assert r is not None
    with open(vm.files[r.block], "rb") as f:
        f.seek(r.offset + DIRTY_GPA[0] - r.gpa)
        return int.from_bytes(f.read(2), "little")


def wait_loop_running(vm: Vm, timeout: float = 30) -> None:
    """Until the guest's loop is seen incrementing (SeaBIOS has booted the sector)."""
    deadline = time.monotonic() + timeout
    last = loop_counter(vm)
    while True:
        time.sleep(0.05)
        now = loop_counter(vm)
        if now != last:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{vm.name}: the guest loop does not run: {vm.status()}")
        last = now


def pattern(gpa: int, pages: int, seed: int) -> bytes:
    """Non-zero, page-unique content: every page differs from every other."""
    rng = np.random.default_rng(seed ^ (gpa >> 12))
    out = rng.integers(1, 256, size=pages * PAGE, dtype=np.uint8)
    words = out.view(np.uint64)
    words[:: PAGE // 8] = np.arange(gpa >> 12, (gpa >> 12) + pages, dtype=np.uint64) | (1 << 63)
    return out.tobytes()


def hint_pages(layout: RamLayout, spans: list[tuple[int, int]]) -> dict[str, set[int]]:
    """(block -> pages) covered by GPA spans, each trimmed to mapped RAM (holes dropped)."""
    out: dict[str, set[int]] = {}
    for start, end in spans:
        for r in layout.ranges:
            lo, hi = max(start, r.gpa), min(end, r.end)
            lo = -(-lo // PAGE) * PAGE
            hi = hi // PAGE * PAGE
            if lo < hi:
                first = (r.offset + lo - r.gpa) // PAGE
                out.setdefault(r.block, set()).update(range(first, first + (hi - lo) // PAGE))
    return out


@dataclass
class PageDiff:
    """How the destination's RAM differs from the source's, per block."""

    #: Pages that differ and are zero on the destination.
    zeroed: dict[str, set[int]]
    #: Pages that differ otherwise (always a failure).
    other: dict[str, set[int]]
    #: Pages non-zero on the source, per block (for "was there anything to rewrite").
    nonzero: dict[str, int]


def compare_ram(src: Vm, dst: Vm) -> PageDiff:
    zeroed: dict[str, set[int]] = {}
    other: dict[str, set[int]] = {}
    nonzero: dict[str, int] = {}
    for name, size in src.machine.backends():
        with open(src.files[name], "rb") as fa, open(dst.files[name], "rb") as fb:
            step = 64 * MiB
            nz = 0
            for off in range(0, size, step):
                pa = np.fromfile(fa, dtype=np.uint8, count=step).reshape(-1, PAGE)
                pb = np.fromfile(fb, dtype=np.uint8, count=step).reshape(-1, PAGE)
                diff = np.flatnonzero((pa != pb).any(axis=1))
                nz += int(pa.any(axis=1).sum())
                if diff.size:
                    bz = ~pb[diff].any(axis=1)
                    base = off // PAGE
                    if bz.any():
                        zeroed.setdefault(name, set()).update(int(base + i) for i in diff[bz])
                    if not bz.all():
                        other.setdefault(name, set()).update(int(base + i) for i in diff[~bz])
            nonzero[name] = nz
    return PageDiff(zeroed, other, nonzero)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Tap:
    """A verbatim TCP relay that records what goes through each way (test instrument)."""

    def __init__(self, target_port: int, record: Path) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.target = target_port
        self.record = record
        self.forward = 0
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._serve, daemon=True)
        t.start()
        self._threads.append(t)

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        up = socket.create_connection(("127.0.0.1", self.target))
        out = open(self.record, "wb")

        def pump(a: socket.socket, b: socket.socket, rec: Any) -> None:
            while True:
                try:
                    d = a.recv(1 << 20)
                except OSError:
                    d = b""
                if not d:
                    with contextlib.suppress(OSError):
                        b.shutdown(socket.SHUT_WR)
                    break
                if rec is not None:
                    rec.write(d)
                    self.forward += len(d)
                try:
                    b.sendall(d)
                except OSError:
                    break
            if rec is not None:
                rec.close()

        for a, b, rec in ((conn, up, out), (up, conn, None)):
            t = threading.Thread(target=pump, args=(a, b, rec), daemon=True)
            t.start()
            self._threads.append(t)

    def join(self, timeout: float = 30) -> None:
        for t in self._threads:
            t.join(timeout)
        self.listener.close()
