"""Facts about the running kernel read from /proc and /sys.

Every path is a field of :class:`KernelPaths` so tests can point a check at a
prepared file instead of the live one (the kernel itself is never mocked: the
tests that count run against it).
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

PAGE_SHIFT = 12


@dataclass(frozen=True)
class KernelPaths:
    btf: str = "/sys/kernel/btf/vmlinux"
    iomem: str = "/proc/iomem"
    memory_blocks: str = "/sys/devices/system/memory"
    kallsyms: str = "/proc/kallsyms"
    kpageflags: str = "/proc/kpageflags"
    tracefs: str = "/sys/kernel/tracing"
    securityfs: str = "/sys/kernel/security"
    cmdline: str = "/proc/cmdline"
    config_gz: str = "/proc/config.gz"
    cpuinfo: str = "/proc/cpuinfo"
    status: str = "/proc/self/status"
    dev: str = "/dev"
    meminfo: str = "/proc/meminfo"


PfnRanges = list[tuple[int, int]]


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def ram_pfn_ranges(iomem: str = "/proc/iomem") -> PfnRanges:
    """[start, end) PFN ranges of "System RAM" resources, merged and sorted.

    Only whole pages inside RAM count. Returns [] when addresses are hidden
    (not root: every address reads 0).
    """
    found: PfnRanges = []
    for line in _read(iomem).splitlines():
        addr, sep, name = line.strip().partition(" : ")
        if not sep or not name.startswith("System RAM"):
            continue
        lo_s, _, hi_s = addr.partition("-")
        lo, hi = int(lo_s, 16), int(hi_s, 16) + 1
        if hi <= 1:
            continue
        start, end = -(-lo >> PAGE_SHIFT), hi >> PAGE_SHIFT
        if end > start:
            found.append((start, end))
    return merge(found)


def online_pfn_ranges(memory_blocks: str = "/sys/devices/system/memory") -> PfnRanges | None:
    """PFN ranges of memory blocks in state "online", or None if the kernel
    has no memory-block sysfs (no hotplug: all RAM is online from boot).

    A hot-added block has uninitialised struct pages until it is onlined, so
    the scanner never reads outside these ranges.
    """
    try:
        names = os.listdir(memory_blocks)
        with open(os.path.join(memory_blocks, "block_size_bytes")) as f:
            block_pages = int(f.read(), 16) >> PAGE_SHIFT
    except FileNotFoundError:
        return None
    found: PfnRanges = []
    for name in names:
        if not name.startswith("memory") or not name[6:].isdigit():
            continue
        try:
            with open(os.path.join(memory_blocks, name, "state"), "rb") as f:
                online = f.read().startswith(b"online")
        except OSError:
            continue
        if online:
            first = int(name[6:]) * block_pages
            found.append((first, first + block_pages))
    return merge(found)


def merge(ranges: PfnRanges) -> PfnRanges:
    out: PfnRanges = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def intersect(a: PfnRanges, b: PfnRanges) -> PfnRanges:
    out: PfnRanges = []
    i = j = 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def scan_pfn_ranges(paths: KernelPaths) -> PfnRanges:
    """RAM that is online: where a free buddy block can be."""
    ram = ram_pfn_ranges(paths.iomem)
    online = online_pfn_ranges(paths.memory_blocks)
    return ram if online is None else intersect(ram, online)


def kallsyms_address(name: str, kallsyms: str = "/proc/kallsyms") -> int | None:
    """Address of a kernel symbol, or None if unlisted or hidden (reads 0)."""
    pat = re.compile(r"^([0-9a-f]+) \S " + re.escape(name) + r"$", re.M)
    m = pat.search(_read(kallsyms))
    if not m:
        return None
    addr = int(m.group(1), 16)
    return addr or None


def tracefs_ready(tracefs: str) -> bool:
    return os.path.isdir(os.path.join(tracefs, "events"))


def mount_fs(fstype: str, target: str) -> None:
    """mount(2) a pseudo filesystem without spawning mount(8)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(fstype.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def umount(target: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(target.encode(), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def ensure_tracefs(tracefs: str) -> str:
    """Make tracefs available at ``tracefs``, mounting it if absent.

    :return: "" if it was there, else a note saying it was mounted.
    :raise OSError: when it is absent and cannot be mounted.
    """
    if tracefs_ready(tracefs):
        return ""
    mount_fs("tracefs", tracefs)
    if not tracefs_ready(tracefs):
        raise OSError(errno.ENOENT, "mounted tracefs has no events/", tracefs)
    return f"mounted tracefs at {tracefs}"


def lockdown_mode(securityfs: str) -> str | None:
    """The active lockdown mode ("none", "integrity", "confidentiality"), or
    None if the kernel has no lockdown LSM. Mounts securityfs for the read if
    needed and unmounts it again."""
    path = os.path.join(securityfs, "lockdown")
    mounted = False
    if not os.path.exists(path):
        if os.path.ismount(securityfs) or not os.path.isdir(securityfs):
            return None
        try:
            mount_fs("securityfs", securityfs)
            mounted = True
        except OSError:
            return None
    try:
        if not os.path.exists(path):
            return None
        m = re.search(r"\[(\w+)\]", _read(path))
        return m.group(1) if m else None
    finally:
        if mounted:
            umount(securityfs)


def effective_caps(status: str = "/proc/self/status") -> int:
    m = re.search(r"^CapEff:\s*([0-9a-f]+)$", _read(status), re.M)
    return int(m.group(1), 16) if m else 0


CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


def bpf_capable(status: str = "/proc/self/status") -> bool:
    """CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON: what tracing programs that
    read kernel memory need."""
    caps = effective_caps(status)
    return bool(caps >> CAP_SYS_ADMIN & 1) or bool(caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1)


def kernel_release() -> str:
    return os.uname().release
