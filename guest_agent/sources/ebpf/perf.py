"""Attach a tracepoint or kprobe BPF program through perf_event_open.

bcc did this for us; the agent now holds only fds, so it asks the kernel
directly. One perf event on CPU 0 is enough: the kernel runs a tracepoint's
BPF programs for every firing on any CPU (they hang off the event, not the
perf event), and a second perf event would run the program twice.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import platform

PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 1 << 3
#: _IO('$', 0) and _IOW('$', 8, __u32) from include/uapi/linux/perf_event.h.
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
_SYS_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "ppc64le": 319, "s390x": 331, "riscv64": 241}
_libc = ctypes.CDLL(None, use_errno=True)


class _PerfEventAttr(ctypes.Structure):
    """The first (PERF_ATTR_SIZE_VER1) part of ``struct perf_event_attr``."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
    ]


#: Where the kprobe PMU publishes its perf type (kernels with CONFIG_KPROBES).
KPROBE_PMU_TYPE = "/sys/bus/event_source/devices/kprobe/type"


def tracepoint_id(tracefs: str, event: str) -> int:
    """The id of ``category:name`` in tracefs."""
    category, _, name = event.partition(":")
    with open(os.path.join(tracefs, "events", category, name, "id")) as f:
        return int(f.read().strip())


def _open_and_attach(attr: _PerfEventAttr, what: str, prog_fd: int) -> int:
    try:
        nr = _SYS_PERF_EVENT_OPEN[platform.machine()]
    except KeyError:
        raise OSError(f"perf_event_open syscall number unknown for {platform.machine()}") from None
    fd = int(_libc.syscall(nr, ctypes.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open({what}): {os.strerror(err)}")
    try:
        fcntl.ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def attach_tracepoint(tracefs: str, event: str, prog_fd: int) -> int:
    """Run ``prog_fd`` on ``category:name``; closing the returned fd detaches it.

    :raise OSError: event unknown, or the kernel refuses.
    """
    attr = _PerfEventAttr(
        type=PERF_TYPE_TRACEPOINT,
        size=ctypes.sizeof(_PerfEventAttr),
        config=tracepoint_id(tracefs, event),
        sample_period=1,
        wakeup_events=1,
    )
    return _open_and_attach(attr, event, prog_fd)


def attach_kprobe(function: str, prog_fd: int, pmu_type_file: str = KPROBE_PMU_TYPE) -> int:
    """Run ``prog_fd`` at the entry of kernel function ``function``; closing the
    returned fd detaches it.

    :raise OSError: no kprobe PMU (kernel without kprobes), unknown or
        unprobeable function, or the kernel refuses.
    """
    try:
        with open(pmu_type_file) as f:
            pmu = int(f.read().strip())
    except (OSError, ValueError) as e:
        raise OSError(f"no kprobe PMU ({pmu_type_file}: {e})") from None
    name = ctypes.create_string_buffer(function.encode())
    attr = _PerfEventAttr(
        type=pmu,
        size=ctypes.sizeof(_PerfEventAttr),
        sample_period=1,
        wakeup_events=1,
        config1=ctypes.addressof(name),
        config2=0,
    )
    return _open_and_attach(attr, f"kprobe {function}", prog_fd)
