"""The fault campaign's host-side pieces, without a guest: the request
spotter finds hint requests in a real collector's HTTP/2 stream to an agent
(frames split anywhere), the phase classifier reads QEMU's event
timestamps, the matrix covers every kind in every phase, and the Unix relay
cuts a QMP-like session while accepting the next one. The rig's own checks
are shown to catch planted faults: a guest left stopped on the source, a
workload that lost bytes, an outcome the case does not allow, a corrupted or
unhinted-zeroed page on the destination."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from fphint.v1 import hints_pb2
from fphint_lab import faults
from fphint_lab.faults import Kind, Phase, RequestSpotter, Timeline, observed_phase
from fphint_lab.unixrelay import UnixRelay
from fphint_lab.vm import tally


def frame(ftype: int, stream: int, payload: bytes, flags: int = 0) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big") + payload


def grpc_message(msg: hints_pb2.CollectorMessage) -> bytes:
    body = msg.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def test_spotter_counts_requests_on_the_attach_stream_only() -> None:
    spotter = RequestSpotter()
    feed = spotter.tap(0, False)
    assert feed is not None and spotter.tap(0, True) is None  # only collector -> agent
    request = grpc_message(hints_pb2.CollectorMessage(request=hints_pb2.HintRequest(epoch=7, deadline_ms=500)))
    closed = grpc_message(hints_pb2.CollectorMessage(closed=hints_pb2.EpochClosed(epoch=6)))
    stream = b"".join(
        [
            frame(4, 0, b"\x00" * 12),  # SETTINGS
            frame(6, 0, b"\x00" * 8),  # PING
            frame(8, 0, b"\x00\x00\x10\x00"),  # WINDOW_UPDATE
            frame(0, 1, closed),
            frame(0, 3, request),  # a Report call's stream: not the Attach call
            frame(0, 1, request[:10]),  # one message over two DATA frames, one padded
            frame(0, 1, b"\x02" + request[10:] + b"\x00\x00", flags=0x8),
        ]
    )
    for i in range(0, len(stream), 7):  # split at arbitrary places
        feed(memoryview(stream[i : i + 7]))
    assert spotter.requests == [7]


def test_armed_spotter_fires_once() -> None:
    spotter = RequestSpotter()
    feed = spotter.tap(0, False)
    assert feed is not None
    fired = spotter.arm()
    msg = grpc_message(hints_pb2.CollectorMessage(request=hints_pb2.HintRequest(epoch=3)))
    feed(memoryview(frame(0, 1, msg)))
    assert fired.is_set() and spotter.armed_epoch == 3
    feed(memoryview(frame(0, 1, msg)))
    assert spotter.requests == [3, 3] and spotter.armed_epoch == 3


def ev(name: str, t: float, **data: object) -> dict[str, object]:
    return {"event": name, "data": data, "timestamp": {"seconds": int(t), "microseconds": int((t % 1) * 1e6)}}


def test_phase_from_event_timestamps() -> None:
    tl = Timeline.of(
        [
            ev("MIGRATION", 99.0, status="setup"),
            ev("MIGRATION_PASS", 100.0, **{"pass": 1}),
            ev("MIGRATION_PASS", 110.5, **{"pass": 2}),
            ev("MIGRATION_PASS", 111.0, **{"pass": 3}),
            ev("STOP", 120.0),
            ev("MIGRATION", 121.0, status="completed"),
        ]
    )
    assert (tl.stop, tl.end, tl.end_status) == (120.0, 121.0, "completed")
    assert observed_phase(100.2, tl, 0) == "setup"  # nothing reached the destination
    assert observed_phase(105.0, tl, 1 << 20) == "first_pass"
    assert observed_phase(110.6, tl, 1 << 20) == "later_pass"
    assert observed_phase(120.01, tl, 1 << 20) == "switchover"
    assert observed_phase(121.5, tl, 1 << 20) == "after_end"


def test_matrix_and_outcomes() -> None:
    assert len(faults.CASES) == 25 and len(set(faults.CASES)) == 25
    for kind in Kind:
        for phase in faults.STREAM_PHASES:
            assert (kind, phase) in faults.CASES
    assert (Kind.AGENT, Phase.MID_REPORT) in faults.CASES
    assert faults.outcomes(Kind.AGENT, Phase.SWITCHOVER) == {"completed"}
    assert faults.outcomes(Kind.DAEMON, Phase.FIRST_PASS) == {"failed"}
    assert faults.outcomes(Kind.RESET, Phase.SWITCHOVER) == {"failed", "completed"}


def test_unix_relay_cuts_and_accepts_again(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "qmp.sock"))
    server.listen(4)

    def echo() -> None:
        while True:
            try:
                c, _ = server.accept()
            except OSError:
                return
            threading.Thread(
                target=lambda c=c: [c.sendall(d) for d in iter(lambda: c.recv(100), b"")], daemon=True
            ).start()

    threading.Thread(target=echo, daemon=True).start()
    with UnixRelay(tmp_path / "relay.sock", tmp_path / "qmp.sock") as relay:
        for _ in range(2):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(5)
            c.connect(str(relay.path))
            c.sendall(b"hi")
            assert c.recv(10) == b"hi"
            deadline = time.monotonic() + 5
            while relay.open_connections() != 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert relay.cut() == 1
            assert c.recv(10) == b""  # the session ends
            c.close()
    server.close()


def test_tally_lines_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tally.ENV, str(tmp_path / "t.jsonl"))
    tally.migration("t", corrupted_pages=0, ram_compared=True, workload_ok=True, verified_bytes=5)
    tally.record(tally.FAULT, {"kind": "link_reset", "survived": True})
    found = tally.parse([*(tmp_path / "t.jsonl").read_text().splitlines(), "noise fphint-migration {bad"])
    assert [m["verified_bytes"] for m in found[tally.MIGRATION]] == [5]
    assert found[tally.FAULT] == [{"kind": "link_reset", "survived": True}]


# Section: the rig's checks catch planted faults (no guest: stand-in VMs whose
# RAM files and answers the test chooses)


class StandInVM:
    """Answers what FaultRig's checks ask a VM; ``state`` and ``ok`` are the plants."""

    def __init__(self, name: str, ram: Path, state: str = "running", ok: bool = True) -> None:
        self.name, self.ram_path, self.state, self.ok = name, ram, state, ok
        self.exitcode: int | None = None
        self.commands: list[str] = []

    def is_running(self) -> bool:
        return True

    def status(self) -> str:
        return self.state

    def boot_id(self) -> str:
        return "boot-1"

    def kernel_trouble(self) -> list[str]:
        return []

    def workload(self, script: str, *args: str, timeout: float = 0, check: bool = True) -> dict[str, object]:
        return {"ok": self.ok, "workers": [{"bytes_verified": 4096}]}

    def cmd(self, name: str, *args: object, **kw: object) -> dict[str, object]:
        self.commands.append(name)
        return {}

    def shutdown(self, hard: bool = False) -> None:
        pass


def stand_in_rig(tmp_path: Path) -> Any:
    from fphint_lab.vm import fault_rig

    rig = fault_rig.FaultRig(cast(Any, SimpleNamespace(rundir=tmp_path)))
    rig.boot_id = "boot-1"
    return rig


def settle(rig: Any, src: StandInVM, dst: StandInVM, status: str, kind: Kind = Kind.RESET) -> Any:
    from fphint_lab.vm.fault_rig import CaseResult

    res = CaseResult(
        kind.value,
        Phase.LATER_PASS.value,
        observed=Phase.LATER_PASS.value,
        allowed=sorted(faults.outcomes(kind, Phase.SWITCHOVER)),
        source_outcome=status,
    )
    res.problems += rig._settle(res, src, dst, status, "planted", witness_ok=True)
    return res


def test_a_guest_stopped_on_the_source_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fphint_lab.vm import fault_rig
    from fphint_lab.vm.fphint_daemon import Witness

    rig = stand_in_rig(tmp_path)
    monkeypatch.setattr(fault_rig, "wait_incoming", lambda vm, timeout: None)
    monkeypatch.setattr(rig.daemon, "witness", lambda vm: Witness({}, {}))
    try:
        ram = tmp_path / "src.ram"
        ram.write_bytes(b"\1" * 4096 * 4)
        good = settle(rig, StandInVM("src", ram), StandInVM("dst", ram), "failed")
        assert good.problems == [] and good.survived and good.guest_on == "source"
        stopped = settle(rig, StandInVM("src", ram, state="paused"), StandInVM("dst", ram), "failed")
        assert not stopped.survived
        assert any("paused on the source" in p for p in stopped.problems), stopped.problems
        lost = settle(rig, StandInVM("src", ram, ok=False), StandInVM("dst", ram), "failed")
        assert not lost.survived and any("workload verification failed" in p for p in lost.problems)
        wrong = settle(rig, StandInVM("src", ram), StandInVM("dst", ram), "completed", kind=Kind.STALL)
        assert not wrong.survived and any("allowed" in p for p in wrong.problems)  # a stall must not complete
    finally:
        rig.qmp.close()


@pytest.mark.parametrize("plant", ["flipped", "zeroed_unhinted"])
def test_a_corrupted_page_on_the_destination_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plant: str
) -> None:
    from fphint_lab.vm import fault_rig
    from fphint_lab.vm.fphint_daemon import Witness

    rig = stand_in_rig(tmp_path)
    monkeypatch.setattr(fault_rig, "wait_incoming", lambda vm, timeout: None)
    monkeypatch.setattr(rig.daemon, "witness", lambda vm: Witness({}, {}))  # nothing was rewritten
    try:
        page = 4096
        data = bytes(range(1, 256)) * (page * 8 // 255) + b"\1" * (page * 8 % 255)
        src, dst = tmp_path / "src.ram", tmp_path / "dst.ram"
        src.write_bytes(data)
        dst.write_bytes(data)
        clean = settle(rig, StandInVM("src", src), StandInVM("dst", dst), "completed")
        assert clean.problems == [] and clean.guest_on == "destination"
        assert json.loads(clean.migrations[0])["corrupted_pages"] == 0
        bad = bytearray(data)
        if plant == "flipped":
            bad[5 * page + 17] ^= 0xFF
        else:
            bad[5 * page : 6 * page] = bytes(page)  # zeroed without a hint: not allowed either
        dst.write_bytes(bytes(bad))
        res = settle(rig, StandInVM("src", src), StandInVM("dst", dst), "completed")
        assert not res.survived
        assert any("RAM comparison after the fault" in p for p in res.problems), res.problems
        assert json.loads(res.migrations[0])["corrupted_pages"] == 1
    finally:
        rig.qmp.close()
