"""The answering path first: the agent's scheduling priority and locked memory.

A hint is worth something only while its epoch is open (100-500 ms in QEMU's
later passes), and a guest whose vCPU is saturated gives a normal process
only its fair share. So, when serving:

* every thread of the agent (the asyncio loop and gRPC's own threads, and
  any they start later: threads inherit it) runs ``SCHED_FIFO`` at a low
  real-time priority (``LOOP_RT``), the scanner thread one below
  (``SCAN_RT``): a request is answered before an older request's scan goes
  on, and both before the guest's ordinary tasks. Or, with ``nice``, at nice
  -20 and -10.
* Bounded: real-time is used only while the kernel's RT throttling is on
  (``sched_rt_runtime_us`` not -1: the guest keeps at least 5 % of each
  second); ``RLIMIT_RTTIME`` limits how long one thread may run without
  blocking: past the soft limit SIGXCPU demotes every agent thread to normal
  (logged), past the hard limit the kernel kills the agent (systemd restarts
  it). Raised only after the source is open: the BPF loader child (the
  one process the agent starts) compiles at the unit's nice 5.
* The pages it has touched are locked (``mlockall(MCL_CURRENT | MCL_ONFAULT)``,
  plus ``MCL_FUTURE`` with CAP_IPC_LOCK or no RLIMIT_MEMLOCK): a busy guest's
  reclaim never makes the answering path fault its code back in from disk,
  and nothing is faulted in early (plain MCL_CURRENT would read every mapped
  page, ~10 MiB more of gRPC's library for each migration to send).

``mode="off"`` leaves all of it alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import threading
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

MODES = ("rt", "nice", "off")
LOOP_RT, SCAN_RT = 2, 1
LOOP_NICE, SCAN_NICE = -20, -10
#: RLIMIT_RTTIME: microseconds of CPU without a blocking call (soft, hard).
RTTIME_US = (1_000_000, 3_000_000)
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
RT_RUNTIME = "/proc/sys/kernel/sched_rt_runtime_us"


@dataclass
class Priority:
    """What :func:`raise_agent` did, for the logs and the attach facts."""

    mode: str = "off"
    scheduling: str = "normal"
    memory: str = "not locked"
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.scheduling}; memory {self.memory}" + (f" ({'; '.join(self.notes)})" if self.notes else "")


_current = Priority()


def current() -> Priority:
    return _current


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


def _rt_throttled(path: str = RT_RUNTIME) -> bool:
    try:
        with open(path) as f:
            return int(f.read().strip()) >= 0
    except (OSError, ValueError):
        return False


def _set_rt(tid: int, prio: int) -> None:
    # No SCHED_RESET_ON_FORK: it applies to new threads too, and gRPC's
    # event-engine and timer threads, started later by the loop thread, are
    # the answering path as much as the loop is. The agent starts no child
    # process once it has raised itself (the BPF loader child runs at open).
    os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(prio))


def _set_nice(tid: int, nice: int) -> None:
    os.setpriority(os.PRIO_PROCESS, tid, nice)


def demote_all(why: str) -> None:
    """Every agent thread back to normal scheduling (the bound's last step)."""
    for tid in _threads():
        try:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass
    _current.scheduling = f"normal (demoted: {why})"
    log.error("agent threads demoted to normal scheduling: %s", why)


def _on_sigxcpu(signum: int, frame: FrameType | None) -> None:
    demote_all("a real-time thread ran past RLIMIT_RTTIME without blocking")


def raise_agent(mode: str, lock_memory: bool = True) -> Priority:
    """Raise every thread of this process (call from the main thread, after
    the imports and before serving); the scanner thread lowers itself with
    :func:`scanner_thread`."""
    global _current
    if mode not in MODES:
        raise ValueError(f"unknown priority mode {mode!r}; choose from {', '.join(MODES)}")
    p = Priority(mode)
    if mode == "rt" and not _rt_throttled():
        p.notes.append(f"RT throttling is off ({RT_RUNTIME}): nice instead of real-time")
        mode = "nice"
    if mode == "rt":
        try:
            resource.setrlimit(resource.RLIMIT_RTTIME, RTTIME_US)
            signal.signal(signal.SIGXCPU, _on_sigxcpu)
            for tid in _threads():
                _set_rt(tid, LOOP_RT)
            p.scheduling = f"SCHED_FIFO {LOOP_RT} (scanner {SCAN_RT}), RLIMIT_RTTIME {RTTIME_US[0] // 1000} ms"
        except (OSError, ValueError) as e:
            p.notes.append(f"real-time refused ({e}): nice instead")
            mode = "nice"
    if mode == "nice":
        try:
            for tid in _threads():
                _set_nice(tid, LOOP_NICE)
            p.scheduling = f"nice {LOOP_NICE} (scanner {SCAN_NICE})"
        except OSError as e:
            p.notes.append(f"nice refused ({e})")
    p.mode = mode
    if lock_memory and mode != "off":
        p.memory = _lock_memory()
    _current = p
    log.info("agent priority: %s", p.describe())
    return p


CAP_IPC_LOCK = 14


def _may_lock_everything() -> bool:
    """MCL_FUTURE only without a limit to hit: past RLIMIT_MEMLOCK every later
    allocation would fail, so it needs CAP_IPC_LOCK or no limit."""
    if resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] == resource.RLIM_INFINITY:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError):
        pass
    return False


def _lock_memory() -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    tries = [(MCL_CURRENT | MCL_ONFAULT, "locked on fault (current mappings)")]
    if _may_lock_everything():
        tries.insert(0, (MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT, "locked on fault (current and future)"))
    err = 0
    for flags, what in tries:
        if libc.mlockall(flags) == 0:
            return what
        err = ctypes.get_errno()
    return f"not locked (mlockall: {os.strerror(err)})"


def scanner_thread() -> None:
    """Run in the scanner thread: one step below the answering path."""
    tid = threading.get_native_id()
    try:
        if _current.mode == "rt" and not _current.scheduling.startswith("normal"):
            _set_rt(tid, SCAN_RT)
        elif _current.mode in ("rt", "nice"):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            _set_nice(tid, SCAN_NICE)
    except OSError as e:
        log.warning("scanner thread keeps its priority: %s", e)
