"""Guest-side pieces that need no collector: token discovery, safety facts,
source selection, backoff, range limiting, kpageflags run extraction, the
chunk encoder, snapshots derived from parts."""

from __future__ import annotations

import gzip
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from fphint import ranges
from fphint.v1 import hints_pb2
from guest_agent import discovery
from guest_agent.agent import Backoff
from guest_agent.chunks import ChunkEncoder
from guest_agent.facts import GuestSafety, Paths, detect_safety
from guest_agent.selection import select_source
from guest_agent.sources.base import FreePageSource, Part, Probe, ScanSummary, SourceUnavailable, WholeScan
from guest_agent.sources.kpageflags import BLOCK_PFNS, KPF_BUDDY, KPF_NOPAGE, KpageflagsSource


def smbios11(*strings: str) -> bytes:
    body = b"".join(s.encode() + b"\0" for s in strings) + b"\0"
    return bytes([11, 5, 0, 0, len(strings)]) + body


@pytest.fixture
def places(tmp_path: Path) -> discovery.Places:
    return discovery.Places(
        env={}, config_file=tmp_path / "agent.toml", fw_cfg_dir=tmp_path / "fw", dmi_dir=tmp_path / "dmi"
    )


def test_discovery_order(places: discovery.Places, tmp_path: Path) -> None:
    assert discovery.discover("token", None, places) is None
    (tmp_path / "dmi" / "11-0").mkdir(parents=True)
    (tmp_path / "dmi" / "11-0" / "raw").write_bytes(smbios11("vendor=x", "org.fphint.token=from-smbios"))
    assert discovery.discover("token", None, places) == discovery.Found("from-smbios", "SMBIOS OEM string")
    fw = tmp_path / "fw" / "opt" / "org.fphint" / "token"
    fw.mkdir(parents=True)
    (fw / "raw").write_bytes(b"from-fwcfg\0")
    assert discovery.discover("token", None, places).value == "from-fwcfg"  # type: ignore[union-attr]
    places.config_file.write_text('token = "from-config"\ncollector = "tcp:10.0.2.2:7420"\n')
    assert discovery.discover("token", None, places).value == "from-config"  # type: ignore[union-attr]
    assert discovery.discover("collector", None, places).value == "tcp:10.0.2.2:7420"  # type: ignore[union-attr]
    env_places = discovery.Places({"FPHINT_TOKEN": "from-env"}, places.config_file, places.fw_cfg_dir, places.dmi_dir)
    assert discovery.discover("token", None, env_places).value == "from-env"  # type: ignore[union-attr]
    assert discovery.discover("token", "from-cli", env_places).source == "command line"  # type: ignore[union-attr]


def test_systemd_credential_oem_string(places: discovery.Places, tmp_path: Path) -> None:
    (tmp_path / "dmi" / "11-1").mkdir(parents=True)
    (tmp_path / "dmi" / "11-1" / "raw").write_bytes(smbios11("io.systemd.credential:fphint.collector=vsock:2:7420"))
    assert discovery.discover("collector", None, places).value == "vsock:2:7420"  # type: ignore[union-attr]


def test_bad_config_file(places: discovery.Places) -> None:
    places.config_file.write_text("token = [1]\n")
    with pytest.raises(discovery.DiscoveryError, match="must be a string"):
        discovery.discover("token", None, places)


def fake_paths(tmp: Path, cmdline: str = "", flags: str = "fpu", config: str = "") -> Paths:
    (tmp / "cmdline").write_text(cmdline)
    (tmp / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    (tmp / "meminfo").write_text("MemTotal:        1000 kB\n")
    (tmp / "config.gz").write_bytes(gzip.compress(config.encode()))
    (tmp / "dev").mkdir(exist_ok=True)
    return Paths(tmp / "cmdline", tmp / "config.gz", tmp / "cpuinfo", tmp / "meminfo", tmp / "dev")


def test_safety_detection(tmp_path: Path) -> None:
    ok = detect_safety(fake_paths(tmp_path, "root=/dev/vda ro", "fpu hypervisor"))
    assert ok.refusals == [] and not ok.init_on_free
    poison = detect_safety(fake_paths(tmp_path, "page_poison=1 -- page_poison=0"))
    assert poison.page_poisoning and "poisoning" in poison.refusals[0]
    after_dashes = detect_safety(fake_paths(tmp_path, "quiet -- page_poison=1"))
    assert not after_dashes.page_poisoning
    sev = detect_safety(fake_paths(tmp_path, "", "fpu sev sev_es hypervisor"))
    assert sev.memory_encryption == "sev-es,sev" and "encryption" in sev.refusals[0]
    host_cpu = detect_safety(fake_paths(tmp_path, "", "fpu sev sev_es"))  # a host advertising SEV
    assert host_cpu.memory_encryption == ""
    p = fake_paths(tmp_path)
    (p.dev / "tdx_guest").write_text("")
    assert detect_safety(p).memory_encryption == "tdx"
    (p.dev / "tdx_guest").unlink()
    iof = detect_safety(fake_paths(tmp_path, "", config="CONFIG_INIT_ON_FREE_DEFAULT_ON=y\n"))
    assert iof.init_on_free and iof.refusals == []
    assert not detect_safety(
        fake_paths(tmp_path, "init_on_free=0", config="CONFIG_INIT_ON_FREE_DEFAULT_ON=y\n")
    ).init_on_free


class Fake(FreePageSource):
    name = "fake"

    def __init__(self, available: bool = True, opens: bool = True) -> None:
        self.available, self.opens = available, opens

    def probe(self) -> Probe:
        return Probe(self.name, self.available, "" if self.available else "not here")

    def open(self) -> None:
        if not self.opens:
            raise SourceUnavailable("self-test failed")

    def parts(self, deadline: float | None = None) -> Iterator[Part]:
        yield WholeScan([], 0)


def test_selection_falls_back_in_order() -> None:
    facs = {"ebpf": lambda: Fake(opens=False), "kpageflags": lambda: Fake()}
    sel = select_source("auto", GuestSafety(), facs)  # type: ignore[arg-type]
    assert sel.source is not None
    assert [(s.name, s.available, s.reason) for s in sel.statuses] == [
        ("ebpf", False, "self-test failed"),
        ("kpageflags", True, ""),
    ]

    def broken() -> FreePageSource:
        raise ImportError("No module named 'bcc'")

    sel = select_source("auto", GuestSafety(), {"ebpf": broken, "kpageflags": lambda: Fake(available=False)})
    assert sel.source is None and "No module named 'bcc'" in sel.refusal and "not here" in sel.refusal
    refuse = select_source("auto", GuestSafety(refusals=["page poisoning is on"]), facs)  # type: ignore[arg-type]
    assert refuse.source is None and refuse.refusal == "page poisoning is on"
    assert select_source("none", GuestSafety(), facs).refusal.startswith("hinting disabled")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        select_source("bogus", GuestSafety(), facs)  # type: ignore[arg-type]


def test_backoff_grows_with_jitter_and_resets() -> None:
    b = Backoff(0.5, 8, random.Random(1))
    delays = [b.next() for _ in range(8)]
    assert all(0.25 <= d <= 0.5 for d in delays[:1])
    assert all(4 <= d <= 8 for d in delays[5:])
    assert len(set(delays)) == len(delays)  # jittered
    b.reset()
    assert b.next() <= 0.5


def kpageflags_file(tmp: Path, buddy: set[int], n: int) -> Path:
    data = bytearray(8 * n)
    for pfn in range(n):
        flags = (1 << KPF_BUDDY) if pfn in buddy else (1 << 5) | (1 << KPF_NOPAGE) * (pfn % 7 == 3)
        struct.pack_into("<Q", data, 8 * pfn, flags)
    p = tmp / "kpageflags"
    p.write_bytes(bytes(data))
    return p


def test_kpageflags_runs_cross_block_boundaries(tmp_path: Path) -> None:
    n = BLOCK_PFNS + 100
    buddy = {0, 1, 2, 10} | set(range(BLOCK_PFNS - 5, BLOCK_PFNS + 3)) | {n - 1}
    src = KpageflagsSource(str(kpageflags_file(tmp_path, buddy, n)), page_size=4096)
    snap = src.snapshot()
    assert snap.pages == len(buddy) and snap.complete
    assert list(snap.ranges) == [
        (0, 3 * 4096),
        (10 * 4096, 4096),
        ((BLOCK_PFNS - 5) * 4096, 8 * 4096),
        ((n - 1) * 4096, 4096),
    ]
    assert snap.details == {"pfns_read": float(n), "blocks": 2.0}
    assert snap.source == "kpageflags" and snap.started <= snap.finished
    src.close()


def test_kpageflags_stops_at_deadline(tmp_path: Path) -> None:
    src = KpageflagsSource(str(kpageflags_file(tmp_path, {1}, 64)), page_size=4096)
    snap = src.snapshot(deadline=0.0)
    assert not snap.complete and snap.pages == 0


def test_kpageflags_probe_explains(tmp_path: Path) -> None:
    p = KpageflagsSource(str(tmp_path / "missing")).probe()
    assert not p.available and "cannot open" in p.reason


def test_one_encoder_makes_the_chunks_of_a_call() -> None:
    rs = [(i * 8192, 4096) for i in range(5)]
    stats = hints_pb2.AgentStats(cpu_seconds=1.0)
    enc = ChunkEncoder(9, hints_pb2.REPORT_KIND_LIVE, per_chunk=2)
    msgs = list(enc.whole(rs, stats))
    assert [(m.epoch, m.seq, m.kind, m.end, m.HasField("stats")) for m in msgs] == [
        (9, 0, hints_pb2.REPORT_KIND_LIVE, False, False),
        (9, 1, hints_pb2.REPORT_KIND_LIVE, False, False),
        (9, 2, hints_pb2.REPORT_KIND_LIVE, True, True),
    ]
    state = ranges.CodecState()  # the collector decodes the call with one state
    assert [r for m in msgs for r in ranges.decode(list(m.ranges), state)] == rs
    assert enc.ended and enc.seq == 3
    with pytest.raises(ValueError, match="already ended"):
        enc.chunk([])
    empty = list(ChunkEncoder(1, hints_pb2.REPORT_KIND_SNAPSHOT, 4).whole([]))
    assert [(m.seq, m.end, list(m.ranges)) for m in empty] == [(0, True, [])]
    # Chunks made one by one continue the same state: starts are deltas across chunks.
    step = ChunkEncoder(1, hints_pb2.REPORT_KIND_SNAPSHOT, 4)
    first, second = step.chunk(rs[:1]), step.chunk(rs[1:2], end=True)
    assert list(second.ranges) == [8192, 4096] and (first.seq, second.seq) == (0, 1)
    with pytest.raises(ValueError, match="at most 4"):
        ChunkEncoder(1, hints_pb2.REPORT_KIND_SNAPSHOT, 4).chunk(rs)
    with pytest.raises(ValueError, match="stats"):
        ChunkEncoder(1, hints_pb2.REPORT_KIND_SNAPSHOT, 4).chunk(rs[:1], stats=stats)
    with pytest.raises(ranges.RangeError):  # unsorted across chunks is refused before it is sent
        bad = ChunkEncoder(1, hints_pb2.REPORT_KIND_SNAPSHOT, 4)
        bad.chunk(rs[2:3])
        bad.chunk(rs[:1])


class TwoParts(FreePageSource):
    """Parts only, as every source is written: the snapshot is derived in the base class."""

    name = "two"

    def __init__(self) -> None:
        self.scans = 0

    def probe(self) -> Probe:
        return Probe(self.name, True)

    def parts(self, deadline: float | None = None) -> Iterator[Part]:
        self.scans += 1
        yield WholeScan([(0, 4096), (8192, 4096)], 2)
        yield WholeScan([(12288, 4096)], 1)  # touches the run before it, across the part boundary

    def scan_summary(self) -> ScanSummary:
        return ScanSummary(complete=False, details={"scans": float(self.scans)})


def test_snapshot_is_the_parts_joined() -> None:
    src = TwoParts()
    snap = src.snapshot()
    assert list(snap.ranges) == [(0, 4096), (8192, 8192)] and snap.pages == 3
    assert not snap.complete and snap.details == {"scans": 1.0} and snap.source == "two"
    plain = Fake().snapshot()  # the default summary: complete, no figures
    assert plain.complete and plain.details == {} and list(plain.ranges) == [] and plain.pages == 0
