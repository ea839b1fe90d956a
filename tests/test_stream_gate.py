"""The gate contract's defaults (host_collector.rewrite.gate.RewriteGate) as the proxy uses them.

A gate writes four methods; the proxy also calls ``oracle_until``,
``stop_holding`` and ``guest_stopped`` on every gate, so their defaults must
give the answers a gate with nothing more to say would give: one oracle per
record, nothing to stop holding, pacing left to the proxy's own bounds.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import pytest

from host_collector.proxy.results import ProxyOutcome
from host_collector.rewrite.gate import NEVER, NoHints, PageOracle, RewriteGate
from tests.stream_helpers import run_proxy, typical_stream
from tests.test_stream_proxy import HINTED, iteration_pages


class MinimalGate(RewriteGate):
    """Only the four required methods. Confirms, every ``tick`` seconds, what it
    had received one tick earlier (so records wait, and a paced proxy asks
    ``guest_stopped``); counts every ``oracle_for``."""

    def __init__(self, free: set[tuple[str, int]], tick: float = 0.005) -> None:
        self.free = free
        self.asked: list[int] = []
        self._total = 0
        self._decided = 0
        self._listeners: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._confirm, args=(tick,), daemon=True)
        self._thread.start()

    def _confirm(self, tick: float) -> None:
        pending = 0
        while not self._stop.wait(tick):
            self._decided, pending = pending, self._total
            for cb in list(self._listeners):
                cb()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def received(self, total: int) -> None:
        self._total = total

    def decided_through(self) -> int:
        return self._decided

    def oracle_for(self, end: int) -> PageOracle | None:
        self.asked.append(end)
        return self

    def is_free(self, block: str, page: int) -> bool:
        return (block, page) in self.free

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)


def test_the_defaults_answer_as_a_gate_with_nothing_more_to_say() -> None:
    gate = MinimalGate(set())
    try:
        assert gate.oracle_until(4096) == (gate, 4096)  # oracle_for's answer, promised for `end` only
        assert gate.asked == [4096]
        assert gate.guest_stopped is False
        gate.stop_holding()
        gate.remove_listener(lambda: None)
        assert gate.decided_through() == 0  # stop_holding changed nothing it did not have
    finally:
        gate.close()


def test_a_gate_missing_a_required_method_cannot_be_made() -> None:
    class NoOracle(RewriteGate):
        def received(self, total: int) -> None:
            pass

        def decided_through(self) -> int:
            return NEVER

        def add_listener(self, callback: Callable[[], None]) -> None:
            pass

    with pytest.raises(TypeError, match="oracle_for"):
        NoOracle()  # type: ignore[abstract]


def test_a_gate_with_only_the_required_methods_works_with_the_proxy() -> None:
    """Held records, a paced source (readahead below the stream), the END
    section's stop_holding: every default is called, and the result is the
    expected stream with each iteration record judged exactly once."""
    b = typical_stream(HINTED)
    gate = MinimalGate(HINTED)
    try:
        res, out, _ = run_proxy(
            bytes(b.orig), gate, chunks=[3000] * 20, pause=0.002, hold_seconds=30.0, readahead_bytes=16 << 10
        )
    finally:
        gate.close()
    assert res.outcome is ProxyOutcome.FINISHED
    assert out == bytes(b.want)
    assert res.stats.pages_rewritten == 5 and res.stats.pages_released_unjudged == 0
    assert res.stats.pages_held > 0  # records did wait for the gate
    # The default oracle_until promises nothing past `end`: one oracle_for per record.
    assert gate.asked == [end for _, end, _, _ in iteration_pages(b)]


class WindowGate(RewriteGate):
    """Decides everything at once; its answer holds for windows of ``width`` bytes.

    Records each ``oracle_until`` call with the byte count of the read it judges.
    """

    def __init__(self, free: set[tuple[str, int]], width: int) -> None:
        self.free = free
        self.width = width
        self.total = 0
        self.calls: list[tuple[int, int]] = []  # (received total, end)
        self.per_record = 0

    def received(self, total: int) -> None:
        self.total = total

    def decided_through(self) -> int:
        return NEVER

    def oracle_for(self, end: int) -> PageOracle | None:
        self.per_record += 1
        return self

    def window(self, end: int) -> int:
        return math.ceil(end / self.width)

    def oracle_until(self, end: int) -> tuple[PageOracle | None, int]:
        self.calls.append((self.total, end))
        return self, self.window(end) * self.width

    def is_free(self, block: str, page: int) -> bool:
        return (block, page) in self.free

    def add_listener(self, callback: Callable[[], None]) -> None:
        pass


@pytest.mark.parametrize("width", [1 << 12, 50_000, NEVER])
def test_a_gate_overriding_oracle_until_is_asked_once_per_window(width: int) -> None:
    """Once per window within each read the proxy judges (a new read asks
    again: the proxy keeps no answer between reads), never per record."""
    b = typical_stream(HINTED)
    gate = WindowGate(HINTED, width)
    res, out, _ = run_proxy(bytes(b.orig), gate, chunks=[20_000] * 10)
    assert res.outcome is ProxyOutcome.FINISHED and out == bytes(b.want)
    assert gate.per_record == 0
    ends = [end for _, end, _, _ in iteration_pages(b)]
    asked = [(total, gate.window(end)) for total, end in gate.calls]
    assert len(asked) == len(set(asked))  # no window twice in one read
    assert {w for _, w in asked} == {gate.window(e) for e in ends}  # every window that holds a record
    assert {end for _, end in gate.calls} <= set(ends)
    reads = {total for total, _ in gate.calls}
    assert len(gate.calls) < len(ends) or width == 1 << 12  # a 4 KiB window holds one record
    if width == NEVER:
        assert len(gate.calls) == len(reads)  # one window: one question per read


def test_no_hints_is_one_window_for_the_whole_stream() -> None:
    gate = NoHints()
    assert gate.oracle_until(1) == (None, NEVER) and gate.decided_through() == NEVER
    assert gate.guest_stopped is False
