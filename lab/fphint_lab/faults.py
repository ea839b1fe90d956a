"""Faults injected into a running fphint migration, and the phase of the
stream each one hits, observed rather than guessed (issue 9, item 5).

Kinds (:class:`Kind`): the collector daemon SIGKILLed (and restarted), the
destination QEMU SIGKILLed, the link reset both ways, the link stalled (the
relay stops forwarding), the guest agent SIGKILLed inside the guest, the
collector's QMP session of the source cut.

Phases (:class:`Phase`), and how each is recognised from what the test can
see (the source's QMP events on the test's own monitor, with QEMU's
timestamps; the link relay's byte counts; the agent relay's):

* ``setup``: the link is held from its first connection (``LinkRelay(...,
  stalled=True)``): the fault hits once the source has connected and before
  a single byte, so no page, has reached the destination;
* ``first_pass``: after ``MIGRATION_PASS`` 1, before 2, with some MiB across;
* ``later_pass``: after ``MIGRATION_PASS`` 2 (the source cannot converge:
  ``downtime-limit`` 1 ms, as QEMU's tests force non-convergence), mid-pass;
* ``switchover``: just after the source's ``STOP`` (the END section is on its
  way); the agent cannot be killed in a stopped guest, so its switchover case
  is killed at the moment the source is allowed to converge, and the guest
  stops while it is dead;
* ``mid_report`` (agent only): the agent relay stalls the agent's connection
  the moment the collector's hint request has passed it (a tap decodes the
  gRPC messages, :class:`RequestSpotter`), the agent is
  SIGKILLed while its answer is held, and the connection is then reset: the
  collector sees a report that never ended.

:func:`observed_phase` classifies an injection afterwards from the event
timestamps, so a test asserts the phase it hit, not the one it aimed at.
:data:`OUTCOMES` says which ends of the source's migration are correct for
each case: where two are (a fault at the switchover may come too late to stop
the migration) the test accepts either.
"""

from __future__ import annotations

import enum
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fphint.v1 import hints_pb2

from .linkrelay import LinkRelay
from .unixrelay import UnixRelay

MiB = 1 << 20


class Kind(enum.Enum):
    DAEMON = "daemon_killed"
    DESTINATION = "destination_killed"
    RESET = "link_reset"
    STALL = "link_stall"
    AGENT = "agent_killed"
    QMP = "source_qmp_cut"


class Phase(enum.Enum):
    SETUP = "setup"
    FIRST_PASS = "first_pass"
    LATER_PASS = "later_pass"
    SWITCHOVER = "switchover"
    MID_REPORT = "mid_report"


STREAM_PHASES = (Phase.SETUP, Phase.FIRST_PASS, Phase.LATER_PASS, Phase.SWITCHOVER)

#: Every case of the campaign: each kind in each phase, the agent also mid-report.
CASES: tuple[tuple[Kind, Phase], ...] = tuple(
    [(k, p) for k in Kind for p in STREAM_PHASES] + [(Kind.AGENT, Phase.MID_REPORT)]
)

FAILED = frozenset({"failed"})
STOPPED = frozenset({"failed", "cancelled"})
COMPLETED = frozenset({"completed"})


def outcomes(kind: Kind, phase: Phase) -> frozenset[str]:
    """The source's final migration states that are correct for a case.

    A fault that breaks the stream fails the migration and the source runs on;
    at the switchover it may also come after the destination has everything
    (with ``return-path`` the source completes only once the destination said
    so). A stall is cancelled by the collector's stall detector, or failed by
    its proxy when the source's QMP no longer answers (a source writing its
    END section holds QEMU's lock). The agent is never waited for. Losing QMP
    only stops rewriting: the stream goes on and completes, unless the proxy
    gives up on a source it cannot follow.
    """
    if kind is Kind.AGENT:
        return COMPLETED
    if kind is Kind.QMP:
        return COMPLETED | FAILED
    if kind is Kind.STALL:
        return STOPPED
    return FAILED | COMPLETED if phase is Phase.SWITCHOVER else FAILED


# Section: what the test sees


def event_time(ev: Mapping[str, Any]) -> float:
    """QEMU's timestamp of a QMP event (host realtime), as time.time()."""
    ts = ev.get("timestamp") or {}
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


@dataclass(frozen=True)
class Timeline:
    """One migration's source events: when each pass began, STOP, the end."""

    passes: tuple[tuple[float, int], ...] = ()
    stop: float | None = None
    end: float | None = None
    end_status: str = ""

    @classmethod
    def of(cls, events: Sequence[Mapping[str, Any]]) -> Timeline:
        passes: list[tuple[float, int]] = []
        stop = end = None
        status = ""
        for ev in events:
            name, data = ev.get("event"), ev.get("data") or {}
            if name == "MIGRATION_PASS":
                passes.append((event_time(ev), int(data.get("pass", 0))))
            elif name == "STOP" and stop is None and end is None:
                stop = event_time(ev)
            elif name == "MIGRATION" and data.get("status") in ("completed", "failed", "cancelled") and end is None:
                end, status = event_time(ev), str(data["status"])
        return cls(tuple(passes), stop, end, status)

    def last_pass(self, t: float) -> int:
        return max((n for ts, n in self.passes if ts <= t), default=0)


def observed_phase(t: float, timeline: Timeline, forwarded: int) -> str:
    """The phase of the stream at time ``t`` (time.time()), given the bytes the
    link had forwarded to the destination then."""
    if timeline.end is not None and t >= timeline.end:
        return "after_end"
    if forwarded == 0:
        return Phase.SETUP.value
    if timeline.stop is not None and t >= timeline.stop:
        return Phase.SWITCHOVER.value
    n = timeline.last_pass(t)
    if n <= 1:
        return Phase.FIRST_PASS.value
    return Phase.LATER_PASS.value


@dataclass
class Injection:
    """What was done, when, and what the test saw at that moment."""

    kind: Kind
    aimed: Phase
    at: float = 0.0
    forwarded: int = 0
    source_pass: int = 0
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def phase(self, timeline: Timeline) -> str:
        if self.aimed is Phase.MID_REPORT:
            # Recognised from the agent relay (see Injector.agent_mid_report).
            return Phase.MID_REPORT.value if self.extra.get("request_bytes", 0) > 0 else "no_request_seen"
        if self.aimed is Phase.SWITCHOVER and self.kind is Kind.AGENT:
            stop = timeline.stop
            return Phase.SWITCHOVER.value if stop is not None and 0 <= stop - self.at < 30 else "no_stop_after_kill"
        return observed_phase(self.at, timeline, self.forwarded)


class PhaseTimeout(Exception):
    pass


class Watcher:
    """Waits for a phase of one migration from the source's events (read by
    ``events``, the test's QMP monitor of the source) and the link's counts."""

    def __init__(
        self,
        events: Callable[[], list[dict[str, Any]]],
        link: LinkRelay,
        start: int,
        alive: Callable[[], bool] = lambda: True,
    ) -> None:
        self.events = events
        self.link = link
        self.start = start
        self.alive = alive

    def timeline(self) -> Timeline:
        return Timeline.of(self.events()[self.start :])

    def forwarded(self) -> int:
        return self.link.stats().main.forward_bytes

    def until(self, what: str, ready: Callable[[Timeline], bool], timeout: float, poll: float = 0.005) -> Timeline:
        deadline = time.monotonic() + timeout
        while True:
            tl = self.timeline()
            if ready(tl):
                return tl
            if tl.end is not None:
                raise PhaseTimeout(f"the migration ended ({tl.end_status}) before {what}")
            if not self.alive():
                raise PhaseTimeout(f"the migration's driver exited before {what}")
            if time.monotonic() > deadline:
                raise PhaseTimeout(f"no {what} within {timeout:.0f} s: {tl}, {self.forwarded()} B forwarded")
            time.sleep(poll)

    def connected(self, timeout: float = 60.0) -> None:
        """Until the (held) link has the stream's connection."""
        self.until("connection on the link", lambda tl: bool(self.link.stats().connections), timeout)

    def first_pass(self, min_bytes: int, timeout: float = 60.0) -> None:
        self.until(
            f"first pass with {min_bytes / MiB:.0f} MiB across",
            lambda tl: tl.last_pass(time.time()) == 1 and self.forwarded() >= min_bytes,
            timeout,
        )

    def later_pass(self, min_bytes_into: int = MiB, timeout: float = 120.0) -> int:
        """Until a pass >= 2 has begun and ``min_bytes_into`` crossed since; the pass."""
        tl = self.until("MIGRATION_PASS 2", lambda tl: tl.last_pass(time.time()) >= 2, timeout)
        base = self.forwarded()
        self.until("bytes of a later pass", lambda tl: self.forwarded() >= base + min_bytes_into, timeout)
        return tl.last_pass(time.time())

    def stopped(self, timeout: float = 120.0) -> None:
        self.until("STOP", lambda tl: tl.stop is not None, timeout, poll=0.002)


# Section: the injectors


@dataclass
class Target:
    """What the faults act on, for one migration."""

    link: LinkRelay
    kill_daemon: Callable[[], None]
    destination_pid: Callable[[], int | None]
    qmp: UnixRelay
    #: Kills the agent inside the (running) source guest.
    kill_agent: Callable[[], None]
    agent_link: LinkRelay | None = None


class Injector:
    """Carries out a fault of each kind, recording when (time.time())."""

    def __init__(self, target: Target) -> None:
        self.t = target

    def inject(self, inj: Injection) -> Injection:
        inj.forwarded = self.t.link.stats().main.forward_bytes
        inj.at = time.time()
        kind = inj.kind
        if kind is Kind.DAEMON:
            self.t.kill_daemon()
            inj.detail = "collector daemon SIGKILLed"
        elif kind is Kind.DESTINATION:
            pid = self.t.destination_pid()
            if pid is None:
                raise RuntimeError("no destination QEMU to kill")
            os.kill(pid, signal.SIGKILL)
            inj.detail = f"destination QEMU pid {pid} SIGKILLed"
        elif kind is Kind.RESET:
            inj.detail = f"link reset both ways ({self.t.link.cut()} connections)"
        elif kind is Kind.STALL:
            self.t.link.stall()
            inj.detail = "link stalled: nothing forwarded either way"
        elif kind is Kind.AGENT:
            self.t.kill_agent()
            inj.detail = "agent SIGKILLed in the guest"
        elif kind is Kind.QMP:
            inj.detail = f"collector's QMP session of the source cut ({self.t.qmp.cut()} connections)"
        return inj

    def agent_mid_report(self, inj: Injection, spotter: RequestSpotter, timeout: float = 60.0) -> Injection:
        """Kill the agent while its answer to a hint request is held on the agent link.

        ``spotter`` (the agent link's tap) is armed: the link stalls itself
        right after the next hint request has passed to the agent; the agent
        is then killed, its connection reset, and the link resumed (for the
        restarted agent).
        """
        link = self.t.agent_link
        if link is None:
            raise RuntimeError("mid-report faults need the agent relay")
        fired = spotter.arm()
        if not fired.wait(timeout):
            spotter.disarm()
            raise PhaseTimeout(f"no hint request reached the agent within {timeout:.0f} s")
        inj.extra["request_epoch"] = spotter.armed_epoch
        inj.extra["request_bytes"] = 1
        inj.extra["stalled_at"] = spotter.fired_at
        inj.forwarded = self.t.link.stats().main.forward_bytes
        inj.at = time.time()
        self.t.kill_agent()
        inj.extra["connections_reset"] = link.cut()
        link.resume()
        inj.detail = "agent SIGKILLed while its answer was held on the agent link, then its connection reset"
        return inj


class RequestSpotter:
    """A tap for the agent's link (LinkRelay(..., tap=spotter.tap)): follows
    the HTTP/2 frames from the collector to the agent, decodes the gRPC
    messages of the Attach stream (stream 1 of each connection) and counts the
    hint requests. Armed, it stalls the link right after the next request has
    passed (nothing the agent sends in answer gets through)."""

    def __init__(self) -> None:
        self.link: LinkRelay | None = None
        self.requests: list[int] = []
        self._lock = threading.Lock()
        self._armed: threading.Event | None = None
        self.armed_epoch = 0
        self.fired_at = 0.0

    def tap(self, index: int, forward: bool) -> Callable[[memoryview], None] | None:
        if forward:
            return None
        frames = _Frames(self._on_request)
        return frames.feed

    def arm(self) -> threading.Event:
        with self._lock:
            self._armed = threading.Event()
            self.armed_epoch = 0
            self.fired_at = 0.0
            return self._armed

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    def _on_request(self, epoch: int) -> None:
        with self._lock:
            self.requests.append(epoch)
            armed, self._armed = self._armed, None
            if armed is None:
                return
            if self.link is not None:
                self.link.stall()
            self.armed_epoch = epoch
            self.fired_at = time.time()
        armed.set()


class _Frames:
    """HTTP/2 frames (server to client, no preface) -> gRPC messages of stream 1."""

    def __init__(self, on_request: Callable[[int], None]) -> None:
        self.on_request = on_request
        self.buf = bytearray()
        self.msg = bytearray()

    def feed(self, chunk: memoryview) -> None:
        self.buf += chunk
        buf = self.buf
        while len(buf) >= 9:
            length = int.from_bytes(buf[0:3], "big")
            if len(buf) < 9 + length:
                break
            ftype, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(buf[9 : 9 + length])
            del buf[: 9 + length]
            if ftype == 0 and stream == 1:  # DATA on the Attach call
                if flags & 0x8 and payload:  # PADDED
                    payload = payload[1 : len(payload) - payload[0]]
                self._grpc(payload)

    def _grpc(self, data: bytes) -> None:
        self.msg += data
        while len(self.msg) >= 5:
            n = int.from_bytes(self.msg[1:5], "big")
            if len(self.msg) < 5 + n:
                return
            body = bytes(self.msg[5 : 5 + n])
            del self.msg[: 5 + n]
            try:
                m = hints_pb2.CollectorMessage.FromString(body)
            except Exception:  # not ours to judge: only counting requests
                continue
            if m.WhichOneof("kind") == "request":
                self.on_request(int(m.request.epoch))
