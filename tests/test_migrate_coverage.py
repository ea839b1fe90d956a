"""Coverage per epoch (host_collector/migrate/coverage.py) and the relay's tap that feeds it.

The counter is checked against hand-computed figures on a scripted timeline
(each number below is derived in the comment beside it), and the tap against
the proxy's own account over loopback: every PAGE record reaches it exactly
once, END records flagged, rewritten indices exactly the records zeroed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from host_collector.layout import RamLayout, RamRange
from host_collector.migrate.coverage import CoverageCounter
from host_collector.proxy.results import ProxyOutcome
from tests.stream_helpers import FixedGate, run_proxy, typical_stream

PAGES = 1000
LAYOUT = RamLayout(
    ranges=(RamRange(0, PAGES * 4096, "pc.ram", 0), RamRange(1 << 32, 16 * 4096, "extra", 0)),
    blocks={"pc.ram": PAGES * 4096, "extra": 16 * 4096},
)


@dataclass
class FakeEpoch:
    id: int
    opened_at: float
    first_chunk_at: float | None = None
    masks: dict[str, npt.NDArray[np.bool_]] = field(default_factory=dict)

    def free(self, block: str, pages: range | list[int]) -> None:
        m = self.masks.setdefault(block, np.zeros(LAYOUT.block_pages(block), dtype=np.bool_))
        m[list(pages)] = True

    def blocks(self) -> list[str]:
        return sorted(self.masks)

    def free_mask(self, block: str) -> npt.NDArray[np.bool_] | None:
        return self.masks.get(block)


def recs(block: str, pages: range | list[int]) -> list[tuple[int, int, str, int]]:
    return [(0, 4104, block, p) for p in pages]


def scripted() -> tuple[CoverageCounter, dict[str, bool]]:
    stopped = {"now": False}
    cov = CoverageCounter(LAYOUT, guest_stopped=lambda: stopped["now"])
    # epoch 1 opens at 10.0, reports at 10.05 (50 ms), frees pages 0-99
    e1 = FakeEpoch(101, 10.0, 10.05)
    cov.epoch_opened(1, e1)
    cov.batch(10.01, recs("pc.ram", range(0, 20)), None, False)  # before the report: 20 free pages sent
    # after it: pages 20-59 sent (40 free), 30 of them rewritten (indices 0-29 -> pages 20-49)
    cov.batch(10.06, recs("pc.ram", range(20, 60)), list(range(30)), False)
    cov.batch(10.07, recs("pc.ram", range(500, 510)), None, False)  # not free: not counted
    e1.free("pc.ram", range(0, 100))
    # epoch 2 opens at 10.5 (epoch 1 lasted 500 ms), never reports, lasts 300 ms
    e2 = FakeEpoch(102, 10.5, None)
    cov.epoch_opened(2, e2)
    cov.epoch_released(e1)  # released after the next epoch opened: its window is complete
    cov.batch(10.6, recs("pc.ram", range(100, 110)), None, False)  # a silent epoch frees nothing
    # epoch 3 opens at 10.8, reports at 11.0 (200 ms), frees 200-209 (pc.ram) and 0-3 of 'extra'
    e3 = FakeEpoch(103, 10.8, 11.0)
    cov.epoch_opened(3, e3)
    cov.epoch_released(e2)
    # one batch spanning both blocks, after the report; records 1 and 2 rewritten (pc.ram 3, extra 2): a
    # rewrite counted in the wrong block would also mark pc.ram 2 or extra 3
    cov.batch(11.1, [(0, 0, "pc.ram", 2), (0, 0, "pc.ram", 3), (0, 0, "extra", 2), (0, 0, "extra", 3)], [1, 2], False)
    e3.free("pc.ram", [2, 3, *range(200, 210)])
    e3.free("extra", range(0, 4))
    # the guest stops; the final sync opens epoch 4, which nobody can answer
    stopped["now"] = True
    e4 = FakeEpoch(104, 11.5, None)
    cov.epoch_opened(4, e4)
    cov.epoch_released(e3)
    # END section: pc.ram 205-207 (free in epoch 3, the last answered) and 900
    cov.batch(11.6, recs("pc.ram", [205, 206, 207, 900]), None, True)
    cov.epoch_released(e4)
    return cov, stopped


def test_scripted_timeline_gives_the_hand_computed_figures() -> None:
    cov, _ = scripted()
    c = cov.report(started_at=9.0, ended_at=11.9)
    e1, e2, e3, e4 = c.epochs
    assert (e1.epoch, e1.sync, e1.opened_at_s) == (101, 1, 1.0)
    assert abs(e1.first_report_ms - 50) < 1e-6 and e1.reported and abs(e1.duration_ms - 500) < 1e-6
    assert e1.reported_free_pages == 100 and e1.records == 70
    assert (e1.sent_after_open, e1.rewritten_after_open) == (60, 30)
    assert (e1.sent_after_report, e1.rewritten) == (40, 30)
    assert not e2.reported and e2.first_report_ms == -1 and abs(e2.duration_ms - 300) < 1e-6
    assert (e2.sent_after_open, e2.sent_after_report, e2.reported_free_pages) == (0, 0, 0)
    assert e3.reported and abs(e3.first_report_ms - 200) < 1e-6
    assert (e3.sent_after_report, e3.rewritten) == (4, 2)  # both blocks counted, each rewrite in its block
    assert e4.after_stop and not e4.reported and abs(e4.duration_ms - 400) < 1e-6
    assert (c.sent_after_report, c.rewritten) == (44, 32)
    assert abs(c.fraction - 32 / 44) < 1e-9 and abs(c.fraction_after_open - 32 / 64) < 1e-9
    assert abs(c.first_report_ms - 50) < 1e-6 and c.first_report_goal_met
    assert not c.fraction_goal_met
    # epoch 2 (300 ms, silent) counts; epoch 4 lasted 400 ms silent but the guest was stopped
    assert c.epochs_over_200ms_without_report == 1 and not c.report_every_epoch_goal_met
    assert c.end_section_records == 4 and c.end_section_reported_free == 3


def test_a_late_report_counts_nothing_as_sent_after_it_and_fails_the_first_report_goal() -> None:
    cov = CoverageCounter(LAYOUT)
    e = FakeEpoch(1, 0.0, 0.3)  # 300 ms to answer
    cov.epoch_opened(1, e)
    cov.batch(0.1, recs("pc.ram", range(10)), list(range(10)), False)  # rewritten by an older epoch's hints
    e.free("pc.ram", range(10))
    cov.epoch_released(e)
    c = cov.report(0.0, 0.25)  # the stream ended before the report: epoch 1 never had one in time
    assert c.epochs[0].first_report_ms > 299 and not c.epochs[0].reported
    assert c.sent_after_report == 0 and c.fraction == -1 and not c.fraction_goal_met
    assert c.sent_after_open == 10 and c.rewritten_after_open == 10
    assert not c.first_report_goal_met
    assert c.epochs_over_200ms_without_report == 1


def test_records_before_any_epoch_and_an_unreleased_epoch_count_as_nothing_free() -> None:
    cov = CoverageCounter(LAYOUT)
    cov.batch(0.5, recs("pc.ram", range(5)), None, False)
    e = FakeEpoch(1, 1.0, 1.01)
    e.free("pc.ram", range(100))
    cov.epoch_opened(1, e)
    cov.batch(1.1, recs("pc.ram", range(5)), None, False)
    c = cov.report(0.0, 2.0)  # never released: its bitmaps were never handed over
    assert c.records_before_first_epoch == 5
    assert c.epochs[0].records == 5 and c.epochs[0].sent_after_report == 0


def test_the_window_limit_is_counted() -> None:
    cov = CoverageCounter(LAYOUT, limit=2)
    for i in range(4):
        cov.epoch_opened(i + 1, FakeEpoch(i + 1, float(i), float(i)))
    c = cov.report(0.0, 5.0)
    assert len(c.epochs) == 2 and c.epochs_not_tracked == 2


def test_the_relays_tap_sees_every_record_once_and_exactly_the_rewrites() -> None:
    b = typical_stream({("pc.ram", 1), ("pc.ram", 20)})
    gate = FixedGate({("pc.ram", 1), ("pc.ram", 20)})
    seen: list[tuple[str, int, bool, bool]] = []
    times: list[float] = []

    def tap(t: float, pages: list[tuple[int, int, str, int]], rw: list[int] | None, final: bool) -> None:
        times.append(t)
        marks = set(rw or [])
        seen.extend((blk, pg, i in marks, final) for i, (_, _, blk, pg) in enumerate(pages))

    res, out, _ = run_proxy(bytes(b.orig), gate, tap=tap, chunks=[50, 4000, 9000])
    assert res.outcome is ProxyOutcome.FINISHED and out == bytes(b.want)
    assert [(blk, pg) for blk, pg, _, _ in seen] == [(blk, pg) for _, _, blk, pg in b.pages]
    assert {(blk, pg) for blk, pg, rw, _ in seen if rw} == gate.rewritten
    assert sum(rw for _, _, rw, _ in seen) == res.stats.pages_rewritten == 2
    end_at = next(i for i, r in enumerate(seen) if r[3])
    assert all(r[3] for r in seen[end_at:]) and not any(r[2] for r in seen[end_at:])
    assert times == sorted(times)


def test_the_text_report_shows_each_epoch_and_the_goals() -> None:
    from fphint.v1 import admin_pb2
    from host_collector.migrate.console import render_report

    cov, _ = scripted()
    r = admin_pb2.MigrationReport(vm="vm", outcome="completed", rewriting=True)
    r.coverage.CopyFrom(cov.report(9.0, 11.9))
    text = render_report(r)
    assert "first report 50 ms; 32 of 44 reported-free pages sent after a report rewritten (72.7%" in text
    assert (
        "goals: first report <= 100 ms met, >= 90 % rewritten NOT met, a report in every epoch > 200 ms NOT met" in text
    )
    assert "sync 2: at 1.50 s for 300 ms, no report;" in text and "sync 4:" in text and "guest stopped" in text


def test_the_queue_is_bounded_and_counted_the_same_in_bulk() -> None:
    from host_collector.migrate.coverage import DRAIN_BATCHES

    cov = CoverageCounter(LAYOUT)
    e = FakeEpoch(1, 0.0, 0.0)
    cov.epoch_opened(1, e)
    for i in range(DRAIN_BATCHES + 10):  # nobody drains: the tap itself does, once
        cov.batch(0.5, recs("pc.ram", [i % PAGES]), [0] if i % 2 else None, False)
    assert len(cov._queue) < DRAIN_BATCHES
    cov.drain()
    assert not cov._queue
    e.free("pc.ram", range(PAGES))
    cov.epoch_released(e)
    c = cov.report(0.0, 1.0)
    assert c.epochs[0].records == DRAIN_BATCHES + 10
    assert c.sent_after_report == PAGES and c.rewritten == PAGES // 2  # odd pages were rewritten (34 wraps)
