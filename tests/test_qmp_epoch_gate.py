"""The asyncio driver of the epoch gate: polling discipline, event order, failure handling.

A scripted stand-in for the source monitor drives most tests; the last ones
freeze a real QEMU (SIGSTOP on our own PID) to show that a monitor that stops
answering ends rewriting instead of stalling the proxy.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from qemu.qmp import Message

from host_collector.qmp.session import EventQueue, QmpError
from host_collector.rewrite.epoch_gate import EpochGate
from host_collector.rewrite.gate import NEVER
from host_collector.rewrite.ledger import EpochOracle

from .qmp_fake_collector import FakeCollector
from .qmp_launcher import qemu

Reply = Callable[["FakeSource"], Any]


class FakeSource:
    """Answers query-migrate from a script; records when and how often it was asked."""

    def __init__(self, answer: Reply, delay_s: float = 0.0) -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.events: EventQueue | None = None
        self.issued: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.sync = 1
        self.status = "active"

    def listen(self, *names: str) -> EventQueue:
        self.events = EventQueue(names=list(names))
        return self.events

    def unlisten(self, q: EventQueue) -> None:
        self.events = None

    def emit_pass(self, count: int) -> None:
        assert self.events is not None
        self.events._queue.put_nowait(Message({"event": "MIGRATION_PASS", "data": {"pass": count}}))

    async def execute(self, cmd: str, args: Any = None, *, timeout_s: float | None = None) -> Any:
        assert cmd == "query-migrate"
        self.issued.append(time.monotonic())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            return self.answer(self)
        finally:
            self.in_flight -= 1


def counting(src: FakeSource) -> Any:
    return {"status": src.status, "ram": {"dirty-sync-count": src.sync}}


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_polls_only_for_new_bytes_one_at_a_time_and_rate_limited() -> None:
    async def go() -> None:
        src = FakeSource(counting, delay_s=0.01)
        gate = EpochGate(src, FakeCollector(), "vm", poll_interval_s=0.05)  # type: ignore[arg-type]
        await gate.start()
        src.emit_pass(1)
        await asyncio.sleep(0.1)
        assert src.issued == []  # nothing received, nothing to confirm
        for i in range(1, 40):
            gate.received(i * 1000)
            await asyncio.sleep(0.005)
        await until(lambda: gate.decided_through() == 39_000)
        assert src.max_in_flight == 1
        gaps = [b - a for a, b in zip(src.issued, src.issued[1:])]
        assert gaps and min(gaps) >= 0.05 * 0.95
        assert len(src.issued) < 39 // 2  # far fewer polls than received() calls
        n = len(src.issued)
        await asyncio.sleep(0.2)
        assert len(src.issued) == n  # idle when nothing new arrives
        await gate.stop()

    run(go())


def test_events_before_a_reply_are_applied_before_it() -> None:
    """QEMU sends MIGRATION_PASS s before it can answer s; the gate must see them in that order."""

    def answer(src: FakeSource) -> Any:
        src.sync = 2
        src.emit_pass(2)  # on the wire just ahead of the reply
        return counting(src)

    async def go() -> None:
        src = FakeSource(answer)
        coll = FakeCollector()
        gate = EpochGate(src, coll, "vm", poll_interval_s=0.01)  # type: ignore[arg-type]
        await gate.start()
        src.emit_pass(1)
        await until(lambda: gate.ledger.last_pass == 1)
        gate.received(5000)
        await until(lambda: gate.decided_through() == 5000)
        assert gate.ledger.stats.syncs_seen_by_poll_first == 0
        o = gate.oracle_for(4000)
        assert isinstance(o, EpochOracle) and o.syncs == (2,)
        await gate.stop()
        assert all(e.released for e in coll.epochs.values())

    run(go())


def test_setup_state_is_asked_again_not_a_failure() -> None:
    def answer(src: FakeSource) -> Any:
        if len(src.issued) < 3:
            return {"status": "setup"}
        return counting(src)

    async def go() -> None:
        src = FakeSource(answer)
        gate = EpochGate(src, FakeCollector(), "vm", poll_interval_s=0.01)  # type: ignore[arg-type]
        await gate.start()
        src.emit_pass(1)
        gate.received(100)
        await until(lambda: gate.decided_through() == 100)
        assert len(src.issued) == 3 and gate.failure is None
        await gate.stop()

    run(go())


@pytest.mark.parametrize(
    "reply, reason",
    [
        ({"status": "failed", "error-desc": "boom"}, "status 'failed'"),
        ({"status": "active"}, "without a dirty-sync-count"),
        ({"status": "postcopy-active", "ram": {"dirty-sync-count": 1}}, "postcopy-active"),
        ("nonsense", "returned 'nonsense'"),
        (QmpError("QMP x: connection reset"), "connection reset"),
    ],
)
def test_bad_answers_end_rewriting_and_release_the_proxy(reply: Any, reason: str) -> None:
    def answer(src: FakeSource) -> Any:
        if len(src.issued) == 1:
            return counting(src)
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def go() -> None:
        src = FakeSource(answer)
        coll = FakeCollector()
        gate = EpochGate(src, coll, "vm", poll_interval_s=0.01)  # type: ignore[arg-type]
        woken = threading.Event()
        gate.add_listener(woken.set)
        await gate.start()
        src.emit_pass(1)
        gate.received(100)
        await until(lambda: gate.decided_through() == 100)
        gate.received(200)
        await until(lambda: gate.failure is not None)
        assert reason in (gate.failure or "")
        assert woken.is_set()
        assert gate.decided_through() == NEVER
        assert gate.oracle_for(150) is None  # never a verdict past the last good poll
        assert gate.oracle_for(100) is not None  # what was confirmed stays confirmed
        assert not any(e.is_open for e in coll.epochs.values())
        await gate.stop()

    run(go())


def test_received_from_another_thread_wakes_the_poller() -> None:
    async def go() -> None:
        src = FakeSource(counting)
        gate = EpochGate(src, FakeCollector(), "vm", poll_interval_s=0.01)  # type: ignore[arg-type]
        await gate.start()
        src.emit_pass(1)

        def receive_all() -> None:
            for i in range(1, 10_001):
                gate.received(i)

        t = threading.Thread(target=receive_all)
        t.start()
        await asyncio.get_running_loop().run_in_executor(None, t.join)
        await until(lambda: gate.decided_through() == 10_000)
        await gate.stop()

    run(go())


# ---- a real, frozen QEMU ------------------------------------------------------


@pytest.mark.qemu
def test_frozen_qemu_ends_rewriting_within_the_poll_timeout() -> None:
    async def go() -> None:
        async with qemu(["-S", "-machine", "pc", "-m", "64M"], name="frozen") as q:
            src = await q.qmp()
            coll = FakeCollector()
            gate = EpochGate(src, coll, "vm", poll_interval_s=0.01, poll_timeout_s=0.3)
            await gate.start()
            q.proc.send_signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                gate.received(4096)
                assert gate.decided_through() == 0  # received() returned at once
                await until(lambda: gate.failure is not None, timeout_s=5)
                assert time.monotonic() - t0 < 2
                assert "not answered within 0.3 s" in (gate.failure or "")
                assert gate.decided_through() == NEVER and gate.oracle_for(4096) is None
            finally:
                q.proc.send_signal(signal.SIGCONT)
            await gate.stop()

    run(go())


def test_stop_event_says_the_guest_stopped_and_ends_the_wait_for_hints() -> None:
    """QEMU's switchover STOP reaches the gate while the final pass is written
    (the proxy must stop pacing then), and a stopped guest's pending hints
    hold nothing."""

    async def go() -> None:
        src = FakeSource(counting)
        coll = FakeCollector()
        gate = EpochGate(src, coll, "vm", poll_interval_s=0.01)  # type: ignore[arg-type]
        woken: list[int] = []
        gate.add_listener(lambda: woken.append(1))
        await gate.start()
        src.emit_pass(1)
        await until(lambda: gate.ledger.last_pass == 1)
        coll.epochs[max(coll.epochs)].hints_pending = True
        gate.received(5000)
        await until(lambda: gate.ledger.confirmed_through == 5000)
        assert gate.decided_through() == 0 and not gate.guest_stopped
        assert src.events is not None
        n = len(woken)
        src.events._queue.put_nowait(Message({"event": "STOP", "timestamp": {}}))
        await until(lambda: gate.guest_stopped)
        # §3.9: everything is decided now; what no poll covers, by request offsets alone
        assert gate.decided_through() == NEVER and len(woken) > n and gate.ledger.completing
        await gate.stop()

    run(go())


@pytest.mark.parametrize("status", ["device", "pre-switchover"])
def test_the_completions_migration_status_decides_everything_at_once(status: str) -> None:
    """A MIGRATION event of the completion (QEMU 10 enters 'device' there) ends the wait
    for polls just as STOP does; any other status changes nothing."""

    async def go() -> None:
        src = FakeSource(counting)
        coll = FakeCollector()
        gate = EpochGate(src, coll, "vm", poll_interval_s=0.01)  # type: ignore[arg-type]
        await gate.start()
        src.emit_pass(1)
        await until(lambda: gate.ledger.last_pass == 1)
        gate.received(5000)
        await until(lambda: gate.ledger.confirmed_through == 5000)
        assert src.events is not None
        src.events._queue.put_nowait(Message({"event": "MIGRATION", "data": {"status": "active"}}))
        await asyncio.sleep(0.05)
        assert not gate.ledger.completing and gate.decided_through() == 5000
        src.events._queue.put_nowait(Message({"event": "MIGRATION", "data": {"status": status}}))
        await until(lambda: gate.ledger.completing)
        assert gate.decided_through() == NEVER and gate.guest_stopped
        await gate.stop()

    run(go())
