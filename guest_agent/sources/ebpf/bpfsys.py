"""The bpf(2) operations the agent uses on the programs and maps a loader
child handed it (the agent itself never loads bcc or LLVM).

* ``BPF_PROG_TEST_RUN`` of a raw-tracepoint program: runs it once, now, on
  this CPU with the given u64 arguments (kernel net/bpf/test_run.c,
  ``bpf_prog_test_run_raw_tp``: no data in/out, at most 12 arguments).
* ``mmap`` of a ``BPF_F_MMAPABLE`` array map: user space reads results and
  clears bitmaps in place, with no syscall per element.
* ``BPF_OBJ_GET_INFO_BY_FD``: what a received fd really is.
* ``BPF_RAW_TRACEPOINT_OPEN``: attach; closing the returned fd detaches.
* Element lookup, iteration and deletion for the one hash map read here.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
from dataclasses import dataclass

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_KPROBE = 2
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
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


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_uint64], what: str) -> int:
    """bpf(cmd, attr); the result, or OSError naming ``what``."""
    ret = int(_libc.syscall(sys_bpf_number(), cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _attr() -> ctypes.Array[ctypes.c_uint64]:
    """A zeroed ``union bpf_attr`` (128 bytes covers every command used here)."""
    return (ctypes.c_uint64 * 16)()


def _info(fd: int, words: int) -> list[int]:
    """The first ``words`` u32 of the object's bpf_map_info/bpf_prog_info."""
    buf = (ctypes.c_uint32 * words)()
    attr = _attr()
    attr[0] = fd | (ctypes.sizeof(buf) << 32)  # bpf_fd, info_len
    attr[1] = ctypes.addressof(buf)
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"BPF_OBJ_GET_INFO_BY_FD({fd})")
    return list(buf)


@dataclass(frozen=True)
class MapInfo:
    type: int
    key_size: int
    value_size: int
    max_entries: int


def map_info(fd: int) -> MapInfo:
    """Type and sizes of a map (bpf_map_info: type, id, key, value, entries)."""
    w = _info(fd, 6)
    return MapInfo(w[0], w[2], w[3], w[4])


def prog_type(fd: int) -> int:
    """The BPF_PROG_TYPE_* of a program fd (the first word of bpf_prog_info)."""
    return _info(fd, 2)[0]


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """Attach a raw-tracepoint program; closing the returned fd detaches it."""
    cname = ctypes.create_string_buffer(name.encode())
    attr = _attr()
    attr[0] = ctypes.addressof(cname)
    attr[1] = prog_fd
    return _bpf(BPF_RAW_TRACEPOINT_OPEN, attr, f"BPF_RAW_TRACEPOINT_OPEN({name})")


def _elem_attr(
    fd: int, key: ctypes.Array[ctypes.c_char], value: ctypes.Array[ctypes.c_char] | None
) -> ctypes.Array[ctypes.c_uint64]:
    attr = _attr()
    attr[0] = fd
    attr[1] = ctypes.addressof(key)
    attr[2] = ctypes.addressof(value) if value is not None else 0
    return attr


def hash_items(fd: int, key_size: int, value_size: int, limit: int = 1 << 16) -> dict[bytes, bytes]:
    """Every (key, value) of a hash map, at most ``limit`` of them.

    Keys deleted meanwhile end the walk early (the kernel restarts from the
    first key); the caller only counts votes, so that is harmless.
    """
    out: dict[bytes, bytes] = {}
    key = ctypes.create_string_buffer(key_size)
    nxt = ctypes.create_string_buffer(key_size)
    val = ctypes.create_string_buffer(value_size)
    attr = _elem_attr(fd, key, nxt)
    attr[1] = 0  # NULL key: the first one
    while len(out) < limit:
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr, "BPF_MAP_GET_NEXT_KEY")
        except OSError as e:
            if e.errno == errno.ENOENT:
                break
            raise
        if nxt.raw in out:
            break
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(fd, nxt, val), "BPF_MAP_LOOKUP_ELEM")
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        else:
            out[nxt.raw] = val.raw
        ctypes.memmove(key, nxt, key_size)
        attr[1] = ctypes.addressof(key)
    return out


def hash_delete(fd: int, keys: list[bytes]) -> None:
    """Delete these keys (absent ones are fine)."""
    for k in keys:
        key = ctypes.create_string_buffer(k, len(k))
        try:
            _bpf(BPF_MAP_DELETE_ELEM, _elem_attr(fd, key, None), "BPF_MAP_DELETE_ELEM")
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
