"""The daemons as real processes: `fph-collector serve` and `fph-agent run`
with the kpageflags source on this machine's kernel, a collector restart under
a connected agent, metrics over HTTP, graceful exit, CLI errors."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fphint.v1 import admin_pb2, admin_pb2_grpc
from fphint_lab.demo import buddyinfo_pages, write_config
from guest_agent.sources.kpageflags import KpageflagsSource

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemons:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.metrics_port = free_port()
        self.cfg = write_config(work, secrets.token_urlsafe(24))
        # Listen on TCP instead of the demo's unix socket, so a restart reuses the port.
        text = self.cfg.read_text().replace(
            f'listen = ["unix:{work}/agents.sock"]', f'listen = ["tcp:127.0.0.1:{self.port}"]'
        )
        self.cfg.write_text(text)
        self.collector: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None

    def start_collector(self) -> None:
        self.collector = subprocess.Popen(
            [
                PY,
                "-m",
                "host_collector",
                "--log-format",
                "json",
                "serve",
                "--config",
                str(self.cfg),
                "--metrics",
                f"127.0.0.1:{self.metrics_port}",
            ],
            stderr=open(self.work / "collector.log", "ab"),
        )

    def start_agent(self) -> None:
        self.agent = subprocess.Popen(
            [
                PY,
                "-m",
                "guest_agent",
                "--source",
                "kpageflags",
                "run",
                "--collector",
                f"tcp:127.0.0.1:{self.port}",
                "--token-file",
                str(self.work / "token"),
                "--config",
                str(self.work / "none.toml"),
            ],
            stderr=open(self.work / "agent.log", "ab"),
        )

    def admin(self) -> admin_pb2_grpc.CollectorAdminStub:
        return admin_pb2_grpc.CollectorAdminStub(grpc.insecure_channel(f"unix:{self.work}/admin.sock"))

    def wait_attached(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                vms = self.admin().ListVMs(admin_pb2.ListVMsRequest(), timeout=1).vms
                if vms and vms[0].attached:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"agent not attached after {timeout}s; logs in {self.work}")

    def stop(self) -> None:
        for p in (self.agent, self.collector):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(tmp_path)
    yield d
    d.stop()


@pytest.mark.root
@pytest.mark.slow
def test_collector_restart_under_a_connected_agent(daemons: Daemons) -> None:
    daemons.start_collector()
    daemons.start_agent()
    daemons.wait_attached(30)
    req = admin_pb2.CollectHintsRequest(vm="this-host", deadline_ms=5000, close_on_snapshot=True)
    first = daemons.admin().CollectHints(req, timeout=15)
    assert first.free_pages > 0 and first.agent_source == "kpageflags"
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{daemons.metrics_port}/metrics", timeout=5).read().decode()
    assert 'fphint_pages_hinted_total{vm="this-host"}' in metrics
    assert "fphint_request_to_last_chunk_seconds_bucket" in metrics

    assert daemons.collector is not None
    daemons.collector.send_signal(signal.SIGKILL)
    daemons.collector.wait()
    time.sleep(1.5)  # the agent is now retrying with backoff
    assert daemons.agent is not None and daemons.agent.poll() is None
    daemons.start_collector()
    daemons.wait_attached(30)
    second = daemons.admin().CollectHints(req, timeout=15)
    assert second.free_pages > 0 and second.epoch > first.epoch

    # Graceful stop: both exit by themselves on SIGTERM, with status 0.
    for p in (daemons.agent, daemons.collector):
        p.send_signal(signal.SIGTERM)
    assert daemons.agent.wait(15) == 0
    assert daemons.collector.wait(15) == 0
    log = (daemons.work / "collector.log").read_text()
    assert '"msg": "collector stopping"' in log and '"msg": "agent attached"' in log


@pytest.mark.root
def test_kpageflags_totals_match_buddyinfo() -> None:
    """kpageflags is a per-page snapshot taken over ~0.1-0.5 s; /proc/buddyinfo
    is read just before and just after. Free memory moves while we read (this
    machine runs other work), so we accept the scan if its total lies within
    the before/after bracket widened by 1% of the larger value, in one of five
    tries; a wrong flag bit or a dropped block would miss by far more."""
    src = KpageflagsSource()
    tries = []
    for _ in range(5):
        before = buddyinfo_pages()
        snap = src.snapshot()
        after = buddyinfo_pages()
        lo, hi = min(before, after), max(before, after)
        slack = 0.01 * hi
        tries.append((before, snap.pages, after))
        if lo - slack <= snap.pages <= hi + slack:
            break
    else:
        raise AssertionError(f"kpageflags totals never matched buddyinfo: {tries}")
    assert snap.complete and snap.ranges and all(s % 4096 == 0 and n % 4096 == 0 for s, n in snap.ranges)
    src.close()


def test_cli_reports_bad_config_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "c.toml"
    bad.write_text('[[vm]]\nname = "x"\ntoken = "short"\n')
    p = subprocess.run(
        [PY, "-m", "host_collector", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 2 and "token must be at least 16" in p.stderr
    p = subprocess.run(
        [PY, "-m", "guest_agent", "run", "--collector", "nowhere"], capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 2 and "--collector" in p.stderr


@pytest.mark.root
def test_agent_probe_reports_facts() -> None:
    p = subprocess.run(
        [PY, "-m", "guest_agent", "--source", "kpageflags", "probe"], capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 0, p.stderr
    assert '"chosen_source": "kpageflags"' in p.stdout and f'"page_size": {os.sysconf("SC_PAGE_SIZE")}' in p.stdout


@pytest.mark.parametrize(
    "unit", ["guest_agent/systemd/fph-agent.service", "host_collector/systemd/fph-collector.service"]
)
def test_systemd_units_verify(unit: str) -> None:
    import shutil

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run(["systemd-analyze", "verify", str(root / unit)], capture_output=True, text=True, timeout=60)
    # The binaries are installed elsewhere (guest image, host package); anything else is an error.
    problems = [ln for ln in (p.stdout + p.stderr).splitlines() if ln and "is not executable" not in ln]
    assert not problems, problems
