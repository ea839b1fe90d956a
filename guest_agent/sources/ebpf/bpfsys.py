"""The two bpf(2) operations bcc 0.26's Python API lacks.

* ``BPF_PROG_TEST_RUN`` of a raw-tracepoint program: runs it once, now, on
  this CPU with the given u64 arguments (kernel net/bpf/test_run.c,
  ``bpf_prog_test_run_raw_tp``: no data in/out, at most 12 arguments).
* ``mmap`` of a ``BPF_F_MMAPABLE`` array map: user space reads results and
  clears bitmaps in place, with no syscall per element.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform

BPF_MAP_CREATE = 0
BPF_PROG_TEST_RUN = 10
BPF_MAP_TYPE_ARRAY = 2
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}
_libc = ctypes.CDLL(None, use_errno=True)


class _TestRunAttr(ctypes.Structure):
    """``union bpf_attr``'s ``test`` member (include/uapi/linux/bpf.h)."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


def sys_bpf_number() -> int:
    machine = platform.machine()
    try:
        return _SYS_BPF[machine]
    except KeyError:
        raise OSError(f"bpf(2) syscall number unknown for {machine}") from None


class TestRunner:
    """Runs one loaded raw-tracepoint program with two u64 arguments.

    The attribute block and argument array are allocated once; a run costs a
    single syscall.
    """

    NARGS = 2

    def __init__(self, prog_fd: int) -> None:
        self._nr = sys_bpf_number()
        self._args = (ctypes.c_uint64 * self.NARGS)()
        self._attr = _TestRunAttr(
            prog_fd=prog_fd,
            ctx_size_in=ctypes.sizeof(self._args),
            ctx_in=ctypes.addressof(self._args),
        )
        self._attr_ref = ctypes.byref(self._attr)
        self._attr_size = ctypes.sizeof(self._attr)

    def run(self, a0: int = 0, a1: int = 0) -> int:
        """Run the program; return its return value.

        :raise OSError: when the kernel refuses the run.
        """
        self._args[0] = a0
        self._args[1] = a1
        if _libc.syscall(self._nr, BPF_PROG_TEST_RUN, self._attr_ref, self._attr_size) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
        return int(self._attr.retval)


def bpf_refusal() -> str:
    """Try the cheapest bpf(2) call, creating a one-entry array map; return
    why it failed, or "" (seccomp, LSMs and sysctls can refuse what the
    capabilities allow)."""
    attr = (ctypes.c_uint32 * 30)(BPF_MAP_TYPE_ARRAY, 4, 8, 1)
    try:
        nr = sys_bpf_number()
    except OSError as e:
        return str(e)
    fd = _libc.syscall(nr, BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        return f"bpf(BPF_MAP_CREATE) failed: {os.strerror(err)}"
    os.close(fd)
    return ""


def map_array(map_fd: int, value_size: int, max_entries: int) -> mmap.mmap:
    """Map a BPF_F_MMAPABLE array map's values into this process, read-write."""
    elem = (value_size + 7) & ~7
    length = elem * max_entries
    length = (length + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
    return mmap.mmap(map_fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
