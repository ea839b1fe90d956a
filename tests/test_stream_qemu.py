"""Real QEMU (TCG, no guest OS) migrating through the proxy.

Every test compares the two RAM files page by page: equal everywhere except
the pages the proxy zeroed, which must be hinted pages the source sent with
content. ``FPH_QEMU``/``FPH_QEMU_DATADIR`` select another QEMU build
(fphint_lab/qemu_pair.py).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fphint_lab.qemu_pair import (
    PAGE,
    GiB,
    Machine,
    MiB,
    Tap,
    Vm,
    boot_image,
    compare_ram,
    hint_pages,
    pattern,
    wait_loop_running,
    write_gpa,
)
from host_collector.proxy.migration_proxy import MigrationProxy
from host_collector.proxy.results import ProxyOutcome, ProxyResult
from host_collector.rewrite.gate import NoHints
from host_collector.stream.wire import Phase
from tests.stream_helpers import FixedGate, SteppedGate

pytestmark = pytest.mark.qemu


def _version() -> tuple[int, int]:
    import subprocess

    from fphint_lab.qemu_pair import QEMU

    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


VERSION = _version()


class Pair:
    """A source and a destination QEMU for one machine, plus the proxy between them."""

    def __init__(self, workdir: Path, machine: Machine, running: bool, ram_dir: Path | None = None) -> None:
        self.machine = machine
        boot = boot_image(workdir / "boot.img") if running else None
        self.src = Vm(machine, workdir, "src", incoming=False, running=running, boot=boot, ram_dir=ram_dir)
        self.dst = Vm(machine, workdir, "dst", incoming=True, boot=boot, ram_dir=ram_dir)
        self.proxy: MigrationProxy | None = None

    def fill(self, spans: list[tuple[int, int]], seed: int = 7) -> None:
        """Write page-unique non-zero patterns over GPA spans (before start)."""
        for start, end in spans:
            write_gpa(self.src, start, pattern(start, (end - start) // PAGE, seed))

    def start(self) -> None:
        self.src.start()
        self.dst.start()

    def migrate(
        self,
        gate: Any,
        *,
        caps: dict[str, bool] | None = None,
        params: dict[str, Any] | None = None,
        wait: bool = True,
        via: Tap | None = None,
        **proxy_kw: Any,
    ) -> ProxyResult | None:
        all_caps = {"return_path": True, "events": True, **(caps or {})}
        for vm in (self.src, self.dst):
            vm.set_caps(**all_caps)
        self.src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30, **(params or {})})
        port = self.dst.listen_incoming()
        self.proxy = MigrationProxy("tcp:127.0.0.1:0", f"tcp:127.0.0.1:{port}", gate, **proxy_kw)
        self.proxy.start()
        uri = self.proxy.listen_address if via is None else f"tcp:127.0.0.1:{via.port}"
        self.src.cmd("migrate", uri=uri)
        if not wait:
            return None
        return self.finish()

    def finish(self, timeout: float = 120) -> ProxyResult:
        assert self.proxy is not None
        self.src.wait_migration(("completed", "failed", "cancelled"), timeout)
        res = self.proxy.wait(30)
        assert res is not None, f"proxy still running: {self.proxy.stats()}"
        return res

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        for vm in (self.src, self.dst):
            vm.kill()
            for f in vm.files.values():
                f.unlink(missing_ok=True)  # up to 4.5 GiB each (sparse): do not keep them around


@pytest.fixture
def pairs(tmp_path: Path) -> Iterator[Any]:
    """Makes Pairs; guests up to 256 MiB keep their RAM files on tmpfs (/dev/shm)."""
    made: list[Pair] = []
    shm = Path(tempfile.mkdtemp(prefix="fph-stream-test-", dir="/dev/shm"))

    def make(machine: Machine, running: bool = False) -> Pair:
        d = tmp_path / f"p{len(made)}"
        d.mkdir()
        ram_dir = shm if machine.ram <= 256 * MiB else None
        p = Pair(d, machine, running, ram_dir)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
    shutil.rmtree(shm, ignore_errors=True)


def assert_completed(p: Pair, res: ProxyResult) -> None:
    assert res.outcome is ProxyOutcome.FINISHED, res
    assert p.src.migration()["status"] == "completed", p.src.migration()
    assert p.dst.wait_migration(("completed", "failed"), 30)["status"] == "completed", p.dst.log_text()


def assert_ram(p: Pair, rewritten: set[tuple[str, int]]) -> set[tuple[str, int]]:
    """Destination RAM == source RAM except pages zeroed by the proxy; returns the zeroed pages."""
    diff = compare_ram(p.src, p.dst)
    assert not any(diff.other.values()), {k: sorted(v)[:8] for k, v in diff.other.items()}
    zeroed = {(blk, pg) for blk, pages in diff.zeroed.items() for pg in pages}
    assert zeroed <= rewritten, sorted(zeroed - rewritten)[:8]
    return zeroed


MACHINES = {
    # pc, main RAM from two NUMA memdevs: a RAMBlock ends at GPA 512 MiB
    "pc-1G-numa": Machine("pc", 1 * GiB, (512 * MiB, 512 * MiB)),
    "q35-1G": Machine("q35", 1 * GiB),
    # q35 above 4 GiB: 2 GiB below the hole, 2.5 GiB above 4 GiB, one RAMBlock
    "q35-4.5G": Machine("q35", 4 * GiB + 512 * MiB),
    # pc above 4 GiB: 3 GiB below, 1.5 GiB above
    "pc-4.5G": Machine("pc", 4 * GiB + 512 * MiB),
}


def _spans(m: Machine) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(patterned GPA spans, hinted GPA spans): hints cross block ends and holes; neighbours stay."""
    below, above = m.split()
    margin = 16 * PAGE
    fills = [(16 * MiB, 16 * MiB + 256 * PAGE)]
    hints = [(16 * MiB + 64 * PAGE, 16 * MiB + 192 * PAGE)]
    start = 0
    for _, size in m.backends()[:-1]:  # the end of each memdev but the last
        start += size
        fills.append((start - 64 * PAGE, start + 64 * PAGE))
        hints.append((start - 8 * PAGE, start + 8 * PAGE))
    # the last pages below the hole (hint runs on into the hole)
    fills.append((below - 64 * PAGE, below))
    hints.append((below - 8 * PAGE, below + 1 * MiB))
    if above:
        # from the hole into RAM above 4 GiB, and over the end of RAM
        end = 4 * GiB + above
        fills.append((4 * GiB, 4 * GiB + 64 * PAGE))
        hints.append((4 * GiB - 1 * MiB, 4 * GiB + 8 * PAGE))
        fills.append((end - 64 * PAGE, end))
        hints.append((end - 8 * PAGE, end + margin))
    return fills, hints


@pytest.mark.parametrize("name", list(MACHINES))
def test_hinted_pages_arrive_zero_everything_else_intact(pairs: Any, name: str) -> None:
    m = MACHINES[name]
    if m.ram > 4 * GiB and os.environ.get("FPH_STREAM_SKIP_BIG"):
        pytest.skip("FPH_STREAM_SKIP_BIG set")
    p: Pair = pairs(m)
    fills, hints = _spans(m)
    p.fill(fills)
    free = hint_pages(m.layout(), hints)
    filled = hint_pages(m.layout(), fills)
    expect = {(b, pg) for b, pages in free.items() for pg in pages if pg in filled.get(b, set())}
    p.start()
    gate = FixedGate(free)
    # A zero downtime limit keeps the whole first pass in PART sections (QEMU
    # then completes once nothing is left); records in the END section are
    # never rewritten, whatever the gate says.
    res = p.migrate(gate, params={"downtime-limit": 0})
    assert res is not None
    assert_completed(p, res)
    zeroed = assert_ram(p, gate.rewritten)
    assert zeroed == expect
    assert res.stats.pages_rewritten == len(expect) and res.stats.fallback_reason is None
    # Each block end and hole was really crossed: both sides of every boundary hinted.
    blocks = {b for b, _ in expect}
    assert blocks == {name for name, _ in m.backends()}


def test_no_hints_destination_gets_exactly_the_source_bytes(pairs: Any, tmp_path: Path) -> None:
    m = Machine("q35", 256 * MiB)
    p: Pair = pairs(m, running=True)
    p.fill([(8 * MiB, 12 * MiB)])
    p.start()
    wait_loop_running(p.src)  # so pages are re-sent in later passes
    # source -> tap -> proxy -> tap -> destination
    for vm in (p.src, p.dst):
        vm.set_caps(return_path=True, events=True)
    p.src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
    dport = p.dst.listen_incoming()
    after = Tap(dport, tmp_path / "after.bin")
    p.proxy = MigrationProxy("tcp:127.0.0.1:0", f"tcp:127.0.0.1:{after.port}", NoHints())
    p.proxy.start()
    before = Tap(int(p.proxy.listen_address.rsplit(":", 1)[1]), tmp_path / "before.bin")
    p.src.cmd("migrate", uri=f"tcp:127.0.0.1:{before.port}")
    res = p.finish()
    before.join()
    after.join()
    assert_completed(p, res)
    sent = (tmp_path / "before.bin").read_bytes()
    got = (tmp_path / "after.bin").read_bytes()
    assert len(sent) > 1 * MiB and sent == got
    assert res.stats.source_bytes == res.stats.destination_bytes == len(sent)
    assert res.stats.return_bytes > 0  # PONG and SHUT came back
    assert res.stats.phase is Phase.DEVICE_STATE and res.stats.page_records > 1024
    assert assert_ram(p, set()) == set()


def _hinted_pair(pairs: Any, running: bool = False, ram: int = 128 * MiB) -> tuple[Pair, dict[str, set[int]]]:
    m = Machine("q35", ram)
    p: Pair = pairs(m, running=running)
    p.fill([(8 * MiB, 8 * MiB + 512 * PAGE)])
    free = hint_pages(m.layout(), [(8 * MiB, 8 * MiB + 256 * PAGE)])
    return p, free


CAPS = {
    # 7.2 shows multifd by its extra connections; 10.0 by a MULTIFD_FLUSH in
    # the setup section, which may reach the parser before they are accepted.
    "multifd": ({"multifd": True}, "extra connection|MULTIFD_FLUSH"),
    "postcopy-ram": ({"postcopy_ram": True}, r"POSTCOPY_ADVISE \(length 16\)"),
    "dirty-bitmaps": ({"dirty_bitmaps": True}, r"POSTCOPY_ADVISE \(length 0\)"),
    "compress": ({"compress": True}, "compressed page"),
}


@pytest.mark.parametrize("cap", list(CAPS))
def test_capabilities_that_defeat_rewriting_fall_back_before_any_rewrite(pairs: Any, cap: str) -> None:
    caps, reason = CAPS[cap]
    if cap == "compress" and VERSION >= (9, 1):
        pytest.skip("compress was removed in QEMU 9.1")
    p, free = _hinted_pair(pairs)
    p.start()
    gate = FixedGate(free)
    res = p.migrate(gate, caps=caps)
    assert res is not None
    assert_completed(p, res)
    assert res.stats.fallback_reason is not None and re.search(reason, res.stats.fallback_reason), res.stats
    assert res.stats.pages_rewritten == 0 and not gate.rewritten
    assert assert_ram(p, set()) == set()
    if cap == "multifd":
        assert res.stats.extra_connections == 2 and res.stats.extra_bytes > 0


def _expect_aborted(p: Pair, res: ProxyResult, reason: str) -> None:
    assert res.outcome is ProxyOutcome.ABORTED, res
    assert res.stats.abort_reason is not None and reason in res.stats.abort_reason, res.stats
    assert p.src.migration()["status"] == "failed"
    code = p.dst.exit_code(30)
    assert code is not None and code > 0, (code, p.dst.log_text())


@pytest.mark.skipif(VERSION >= (9, 1), reason="compress was removed in QEMU 9.1")
def test_compress_with_a_hinted_first_page_never_completes_rewritten(pairs: Any) -> None:
    """With compress the first page of a block still goes as PAGE, right before COMPRESS_PAGE records.

    If that PAGE was judged (and zeroed) before the COMPRESS_PAGE arrived the
    proxy must abort; if both came in one read it falls back first and nothing
    is rewritten. Which one happens is QEMU's timing; a completed migration
    with a rewrite would be the bug.
    """
    m = Machine("q35", 128 * MiB)
    p: Pair = pairs(m)
    p.fill([(0, 64 * PAGE)])
    p.start()
    gate = FixedGate({"mem": {0}})
    res = p.migrate(gate, caps={"compress": True})
    assert res is not None
    if gate.rewritten:
        _expect_aborted(p, res, "compressed page")
        assert gate.rewritten == {("mem", 0)}
        assert p.src.status() == "prelaunch"  # never started, and the failed migration left it so
    else:
        assert_completed(p, res)
        assert res.stats.fallback_reason is not None and "compressed page" in res.stats.fallback_reason
        assert assert_ram(p, set()) == set()


def test_xbzrle_after_rewrites_aborts_and_the_guest_keeps_running(pairs: Any) -> None:
    p, free = _hinted_pair(pairs, running=True)
    p.start()
    wait_loop_running(p.src)
    gate = FixedGate(free)
    # At 4 MB/s a 1 ms downtime allows ~4 KiB, far less than the 512 KiB the
    # guest loop dirties: passes repeat until pages hit the XBZRLE cache
    # (sent, cached, then delta-encoded: from the third pass on).
    res = p.migrate(gate, caps={"xbzrle": True}, params={"max-bandwidth": 4_000_000, "downtime-limit": 1}, wait=False)
    assert res is None
    res = p.finish(60)
    _expect_aborted(p, res, "XBZRLE")
    assert gate.rewritten  # the abort came after rewrites, as intended
    _wait_running(p.src)
    wait_loop_running(p.src)


def _wait_running(vm: Vm, timeout: float = 20) -> None:
    """QEMU says the guest runs, and its loop is seen incrementing."""
    deadline = time.monotonic() + timeout
    while vm.status() != "running":
        assert time.monotonic() < deadline, vm.status()
        time.sleep(0.1)
    wait_loop_running(vm, timeout)


@pytest.mark.parametrize("phase", [Phase.SETUP, Phase.ITERATION, Phase.COMPLETION, Phase.DEVICE_STATE])
def test_stream_cut_at_each_phase_source_keeps_running(pairs: Any, phase: Phase) -> None:
    p, free = _hinted_pair(pairs, running=True)
    p.start()
    wait_loop_running(p.src)
    seen: list[tuple[Phase, int]] = []

    def on_phase(ph: Phase, offset: int) -> None:
        seen.append((ph, offset))
        if ph is phase:
            assert p.proxy is not None
            p.proxy.abort(f"cut at {ph.value}")

    res = p.migrate(FixedGate(free), on_phase=on_phase)
    assert res is not None
    _expect_aborted(p, res, f"cut at {phase.value}")
    assert seen[-1][0] is phase
    assert res.stats.destination_bytes <= seen[-1][1]
    _wait_running(p.src)  # and its loop keeps changing the pages it dirties


def test_destination_killed_mid_stream(pairs: Any) -> None:
    p, free = _hinted_pair(pairs, running=True)
    p.start()
    wait_loop_running(p.src)

    def on_phase(ph: Phase, offset: int) -> None:
        if ph is Phase.ITERATION:
            assert p.dst.proc is not None
            p.dst.proc.send_signal(signal.SIGKILL)
            p.dst.proc.wait(10)

    res = p.migrate(FixedGate(free), on_phase=on_phase)
    assert res is not None
    assert res.outcome is ProxyOutcome.BROKEN, res
    assert res.stats.error is not None
    assert p.src.migration()["status"] == "failed"
    _wait_running(p.src)


def test_a_poll_reporting_a_new_sync_count_sends_its_window_unchanged(pairs: Any) -> None:
    m = Machine("q35", 256 * MiB)
    p: Pair = pairs(m)
    spans = [(8 * MiB, 8 * MiB + 256 * PAGE), (100 * MiB, 100 * MiB + 256 * PAGE), (200 * MiB, 200 * MiB + 256 * PAGE)]
    p.fill(spans)
    free = hint_pages(m.layout(), spans)
    p.start()
    gate = SteppedGate(free)
    p.migrate(gate, params={"downtime-limit": 0}, wait=False, hold_bytes=1 << 30, hold_seconds=60)
    assert p.proxy is not None
    # Hold everything until the whole stream is in, then answer two polls:
    # the first saw a new sync count, the second confirms the rest.
    deadline = time.monotonic() + 60
    while p.proxy.stats().phase is not Phase.DEVICE_STATE:
        assert time.monotonic() < deadline, p.proxy.stats()
        time.sleep(0.05)
    time.sleep(0.3)
    st = p.proxy.stats()
    assert st.pages_held == st.page_records > 768 and st.pages_rewritten == 0
    mid = gate.total // 2
    gate.step(mid, confirmed=False)
    gate.step(gate.total, confirmed=True)
    res = p.finish()
    assert_completed(p, res)
    zeroed = assert_ram(p, gate.rewritten)
    asked = {(blk, pg) for _, blk, pg in gate.asked}
    hinted = {(b, pg) for b, pages in free.items() for pg in pages}
    unchanged = hinted - asked
    # Pages whose records ended in the first window were never judged, and arrived intact...
    assert all(end > mid for end, _, _ in gate.asked)
    assert len(gate.none_windows_asked) == len(unchanged) > 100
    # ...while the second window's hinted pages were zeroed.
    assert zeroed == gate.rewritten == hinted & asked and len(zeroed) > 100
