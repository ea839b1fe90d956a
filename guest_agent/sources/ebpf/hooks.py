"""The exit hooks (allocation tracepoints, compaction ranges, the isolation
kprobe): attached only while a scan runs or the agent tracks.

Attached, even with the gate closed, they cost every page allocation a BPF
call: ~5 % of a loop that does nothing but allocate pages, on this machine
(bench/tracking_cost.py), against the goal of ≤ 1 % for an idle agent. So
the source attaches them when a scan starts (if they are not attached yet:
tracking keeps them) and detaches them when the gate closes.

Attaching races with allocations already inside a tracepoint: a CPU that
read the tracepoint's old probe list misses our program for that one call,
and (no fence on its side) its free-list update may not yet be visible to
the scan that follows. So after attaching, the source waits for an RCU grace
period (``membarrier(MEMBARRIER_CMD_GLOBAL)`` runs ``synchronize_rcu``):
every tracepoint call that began before has ended, its updates are visible,
and every later call runs our program. Only then does a scan open its gate.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import time
from dataclasses import dataclass, field

from .program import LoadedProgram

log = logging.getLogger(__name__)

MEMBARRIER_CMD_GLOBAL = 1
_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}
_libc = ctypes.CDLL(None, use_errno=True)


def grace_period() -> None:
    """Wait for an RCU grace period (membarrier's global command does it).

    :raise OSError: the kernel has no membarrier (the caller must then keep
        its hooks attached for good).
    """
    nr = _SYS_MEMBARRIER.get(platform.machine())
    if nr is None:
        raise OSError(f"membarrier syscall number unknown for {platform.machine()}")
    if _libc.syscall(nr, MEMBARRIER_CMD_GLOBAL, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"membarrier(MEMBARRIER_CMD_GLOBAL): {os.strerror(err)}")


@dataclass
class Hooks:
    """The hooks open() found attachable: raw tracepoints and kprobes."""

    prog: LoadedProgram
    raw: list[tuple[str, str]] = field(default_factory=list)  # (tracepoint, program)
    kprobes: list[tuple[str, str]] = field(default_factory=list)  # (function, program)
    attached: bool = False
    #: False when no grace period can be had: the hooks then stay attached.
    detachable: bool = True
    #: Seconds the last attach took (attach and grace period).
    attach_s: float = 0.0

    def names(self) -> list[str]:
        return [f"kprobe:{fn}" for fn, _ in self.kprobes] + [tp for tp, _ in self.raw]

    def attach(self) -> None:
        """Attach every hook (if not attached), then wait for a grace period."""
        if self.attached:
            return
        t0 = time.monotonic()
        try:
            for fn, prog in self.kprobes:
                self.prog.attach_kprobe(fn, prog)
            for tp, prog in self.raw:
                self.prog.attach_raw(tp, prog)
            self.attached = True
            grace_period()
        except OSError as e:
            if not self.attached:
                self._detach_some()
                raise
            # Attached, but no grace period to be had: sleep past any
            # tracepoint call in flight and never detach again.
            log.warning("no RCU grace period from membarrier (%s): exit hooks stay attached", e)
            self.detachable = False
            time.sleep(0.05)
        self.attach_s = time.monotonic() - t0

    def detach(self) -> None:
        """Detach every hook (not while the gate may be open: the caller knows)."""
        if self.attached and self.detachable:
            self._detach_some()
            self.attached = False

    def _detach_some(self) -> None:
        for fn, _ in self.kprobes:
            if self.prog.attached("kprobe:" + fn):
                self.prog.detach_kprobe(fn)
        for tp, _ in self.raw:
            if self.prog.attached("raw:" + tp):
                self.prog.detach_raw(tp)
