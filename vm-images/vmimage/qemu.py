"""QEMU command lines for booting an fphint image (KVM where a guest runs on it, else TCG).

One function, :func:`qemu_argv`, used by the test harness and by
``build.py --show-command``, so what the docs show is what the tests run.

The guest's devices and wiring:

* RAM is a ``memory-backend-file`` with ``share=on`` (normally in /dev/shm):
  its file *is* guest RAM, which lets a test compare source and destination
  page by page after a migration; or, where nothing compares it
  (``Endpoints.shared_ram``), an anonymous ``memory-backend-ram``. The
  RAMBlock is named ``mem`` either way, so the two migrate into each other.
* ttyS0 is the kernel and systemd console, written to a log file only.
* ttyS1 is a root shell (autologin) on a Unix socket: the harness's command
  channel, free of console messages.
* QMP on a Unix socket.
* virtio-blk root disk (a qcow2 overlay over the cached raw image),
  virtio-net on user-mode networking: the guest is 10.0.2.15 and reaches the
  host's 127.0.0.1:PORT at 10.0.2.2:PORT.
* fw_cfg ``opt/org.fphint/token`` and ``opt/org.fphint/collector`` carry the
  VM's token and the collector address to the agent.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .accel import Accel, choose

#: Debian's QEMU (7.2 on bookworm).
QEMU = "qemu-system-x86_64"
#: QEMU 10.0 unpacked by scripts/install-qemu10.sh (a wrapper adding its -L).
QEMU10 = Path(os.environ.get("FPH_QEMU10_DIR", "/var/cache/fphint/qemu-10.0")) / "bin" / "qemu-system-x86_64"
#: Environment variable naming the QEMU binary to use instead.
QEMU_ENV = "FPH_QEMU"

#: fw_cfg names the agent reads under /sys/firmware/qemu_fw_cfg/by_name/<name>/raw.
FW_CFG_TOKEN = "opt/org.fphint/token"
FW_CFG_COLLECTOR = "opt/org.fphint/collector"

#: The guest's view of the host's loopback under user-mode networking.
HOST_FROM_GUEST = "10.0.2.2"

#: Name of the guest RAM's memory backend (and so of its RAMBlock).
RAM_BACKEND_ID = "mem"

#: Kernel arguments every boot gets. panic=-1 plus QEMU's -no-reboot turn a
#: guest panic into QEMU exiting, which the harness notices at once instead of
#: waiting for a timeout.
KERNEL_ARGS = (
    "root=/dev/vda",
    "rw",
    "console=ttyS0,115200",
    "net.ifnames=0",
    "panic=-1",
)

Balloon = Literal["none", "plain", "hint", "report"]


@dataclass(frozen=True)
class GuestConfig:
    """What a guest is: shared by a migration's source and destination."""

    kernel: Path
    initrd: Path
    disk: Path
    disk_format: str = "qcow2"
    mem_mib: int = 1024
    smp: int = 1
    #: Extra kernel arguments, e.g. ("init_on_free=1",).
    append: tuple[str, ...] = ()
    #: fw_cfg token / collector address for the agent; None: not provided.
    token: str | None = None
    collector: str | None = None
    #: virtio-balloon variant: none, plain, free-page hinting, free-page reporting.
    balloon: Balloon = "none"
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Endpoints:
    """What one QEMU process owns: its RAM file, sockets and logs."""

    name: str
    mem_path: Path
    qmp: Path
    shell: Path
    shell_log: Path
    console_log: Path
    #: Start with ``-incoming defer`` (a migration destination).
    incoming: bool = False
    #: Start with ``-S``: CPUs stay stopped until QMP ``cont``; for a
    #: destination, after the migration completes.
    paused: bool = False
    #: A second QMP monitor, for fphint's collector (QEMU serves one client
    #: per monitor, and the harness keeps the first).
    aux_qmp: Path | None = None
    extra_args: tuple[str, ...] = field(default=())
    #: RAM in the shared file ``mem_path``, which tests read and compare; False:
    #: anonymous RAM (``memory-backend-ram``), as most deployments run guests.
    #: On a destination that matters: a ZERO record makes QEMU read the page,
    #: which allocates a tmpfs page but maps the shared zero page of anonymous
    #: memory.
    shared_ram: bool = True


def default_binary() -> str:
    """The QEMU that runs test guests: ``$FPH_QEMU``, else QEMU 10.0 when
    installed, else Debian's.

    QEMU before 9.0 under TCG loses guest writes during a live migration (the
    dirty-bitmap sync does not reset the TCG TLB; fixed upstream for 9.0), so
    a running guest must only be migrated with the newer one.
    """
    chosen = os.environ.get(QEMU_ENV)
    if chosen:
        return chosen
    if os.access(QEMU10, os.X_OK):
        return str(QEMU10)
    return QEMU


@functools.cache
def qemu_version(binary: str) -> str:
    """``binary``'s version, e.g. "10.0.2" (or "unknown: why")."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown: {exc}"
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    return m.group(1) if m else f"unknown: {out.strip()[:80]!r}"


def fw_cfg_string(value: str) -> str:
    """Escape a value for QEMU's option syntax (a comma is written twice)."""
    if "\0" in value:
        raise ValueError("fw_cfg string values cannot contain NUL")
    return value.replace(",", ",,")


def collector_address(port: int) -> str:
    """The address a guest uses for a collector listening on host 127.0.0.1:port."""
    return f"tcp:{HOST_FROM_GUEST}:{port}"


def qemu_argv(guest: GuestConfig, ep: Endpoints, binary: str | None = None, accel: Accel | None = None) -> list[str]:
    """The full QEMU command line for one process of ``guest`` (binary: see
    :func:`default_binary`; accel: :func:`vmimage.accel.choose` unless given)."""
    binary = binary or default_binary()
    accel = accel or choose(binary, guest.kernel)
    mem = f"{guest.mem_mib}M"
    argv = [
        binary,
        "-name", f"fphvm-{ep.name},debug-threads=on",
        *accel.qemu_args(),
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-no-reboot",
        "-msg", "timestamp=on",
        "-smp", str(guest.smp),
        "-m", mem,
        "-object",
        f"memory-backend-file,id={RAM_BACKEND_ID},size={mem},mem-path={ep.mem_path},share=on"
        if ep.shared_ram
        else f"memory-backend-ram,id={RAM_BACKEND_ID},size={mem}",
        "-machine", f"q35,memory-backend={RAM_BACKEND_ID}",
        "-kernel", str(guest.kernel),
        "-initrd", str(guest.initrd),
        "-append", " ".join((*KERNEL_ARGS, *guest.append)),
        "-drive", f"file={guest.disk},format={guest.disk_format},if=virtio,cache=writeback",
        "-netdev", "user,id=net0",
        "-device", "virtio-net-pci,netdev=net0,romfile=",
        "-chardev", f"file,id=console0,path={ep.console_log}",
        "-serial", "chardev:console0",
        "-chardev", f"socket,id=shell0,path={ep.shell},server=on,wait=off,logfile={ep.shell_log}",
        "-serial", "chardev:shell0",
        "-qmp", f"unix:{ep.qmp},server=on,wait=off",
    ]  # fmt: skip
    if ep.aux_qmp is not None:
        argv += ["-qmp", f"unix:{ep.aux_qmp},server=on,wait=off"]
    if guest.token is not None:
        argv += ["-fw_cfg", f"name={FW_CFG_TOKEN},string={fw_cfg_string(guest.token)}"]
    if guest.collector is not None:
        argv += ["-fw_cfg", f"name={FW_CFG_COLLECTOR},string={fw_cfg_string(guest.collector)}"]
    argv += _balloon_args(guest.balloon)
    argv += guest.extra_args
    if ep.paused:
        argv.append("-S")
    if ep.incoming:
        argv += ["-incoming", "defer"]
    argv += ep.extra_args
    return argv


def _balloon_args(balloon: Balloon) -> list[str]:
    if balloon == "none":
        return []
    if balloon == "plain":
        return ["-device", "virtio-balloon-pci,id=balloon0"]
    if balloon == "hint":
        # QEMU refuses free-page-hint without an iothread.
        return [
            "-object", "iothread,id=balloon-iothread",
            "-device", "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=balloon-iothread",
        ]  # fmt: skip
    if balloon == "report":
        return ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on"]
    raise ValueError(f"unknown balloon variant {balloon!r}")
