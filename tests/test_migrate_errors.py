"""`fph-collector migrate`/`proxy` refusing bad requests with clear messages
(a real daemon process, no QEMU), and the standing proxy's HeldGate."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fphint_lab.migrate_harness import Daemon
from host_collector.migrate.console import parse_size
from host_collector.rewrite.epoch_gate import EpochGate
from host_collector.rewrite.gate import NEVER
from host_collector.rewrite.held import HeldGate
from host_collector.rewrite.ledger import EpochOracle

from .qmp_fake_collector import FakeCollector, FakeEpoch


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    d = Daemon(["gone"], no_qmp=["plain"])  # "gone": a QMP path nobody listens on
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.mark.parametrize(
    ("args", "rc", "message"),
    [
        (("migrate", "nope", "--to", "tcp:127.0.0.1:1"), 2, "no VM named 'nope' in the registry"),
        (("migrate", "plain", "--to", "tcp:127.0.0.1:1"), 2, "VM 'plain' has no QMP monitor in the registry"),
        (("migrate", "gone", "--to", "tcp:127.0.0.1:1"), 1, "cannot reach the QMP monitor of 'gone'"),
        (("migrate", "gone", "--to", "vsock:3:1"), 2, "migration streams use tcp:HOST:PORT or unix:PATH"),
        (("migrate", "gone", "--to", "tcp:127.0.0.1:1", "--max-bandwidth", "lots"), 2, "'lots' is not a size"),
        (("proxy", "gone", "--to", "tcp:127.0.0.1:1", "--listen", "bogus"), 2, "proxy listen address"),
        (("proxy", "plain", "--to", "tcp:127.0.0.1:1", "--listen", "tcp:127.0.0.1:0"), 2, "no QMP monitor"),
        (("cancel", "gone"), 1, "nothing to cancel for gone"),
    ],
)
def test_cli_errors_are_clear(daemon: Daemon, args: tuple[str, ...], rc: int, message: str) -> None:
    proc = daemon.run(*args, timeout=60)
    assert proc.returncode == rc, (proc.returncode, proc.stderr)
    assert message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("fph-collector: ") and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_unreachable_qmp_names_the_socket(daemon: Daemon) -> None:
    proc = daemon.run("migrate", "gone", "--to", "tcp:127.0.0.1:1", "--json", timeout=60)
    assert proc.returncode == 1 and f"no socket at {daemon.qmp('gone')}" in proc.stderr, proc.stderr


def test_no_daemon_is_a_clear_error(daemon: Daemon, tmp_path: object) -> None:
    cmd = daemon.cli("migrate", "gone", "--to", "tcp:127.0.0.1:1")
    cmd[-1] = "unix:/nonexistent/fph-migrate-admin.sock"
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "cannot reach the collector's admin socket unix:/nonexistent/fph-migrate-admin.sock" in proc.stderr


def test_parse_size() -> None:
    assert parse_size("123") == 123
    assert parse_size("64K") == 64 << 10
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("8GiB") == 8 << 30
    for bad in ("", "G", "-1M", "1X"):
        with pytest.raises(ValueError):
            parse_size(bad)


def _gate() -> tuple[HeldGate, EpochGate[FakeEpoch]]:
    inner = EpochGate(None, FakeCollector(), "vm1")  # type: ignore[arg-type]  # never started: no QMP needed
    led = inner.ledger
    led.on_pass(1)
    led.received(100)
    led.on_poll(100, 1)
    return HeldGate(inner), inner


def test_held_gate_decides_nothing_until_cleared() -> None:
    held, inner = _gate()
    woken: list[int] = []
    held.add_listener(lambda: woken.append(1))
    assert inner.decided_through() == 100
    assert held.decided_through() == 0 and held.oracle_for(50) is None and held.oracle_until(50) == (None, 50)
    held.clear()
    assert woken == [1] and held.decided_through() == 100
    o, through = held.oracle_until(50)
    assert isinstance(o, EpochOracle) and o.syncs == (1,) and through == 100
    held.refuse("too late")  # no effect once cleared
    assert held.state == "cleared" and held.decided_through() == 100


def test_held_gate_refused_never_rewrites_and_stops_the_epochs() -> None:
    held, inner = _gate()
    held.refuse("capability xbzrle")
    assert held.decided_through() == NEVER and held.oracle_for(50) is None and held.oracle_until(50) == (None, NEVER)
    assert inner.failure is not None and "xbzrle" in inner.failure
    held.clear()  # no effect once refused
    assert held.state == "refused"


@pytest.mark.parametrize("spec", ["unix:/run/qemu/vm1.qmp", "/run/qemu/vm1.qmp", "tcp:127.0.0.1:4444"])
def test_registry_takes_a_qmp_monitor(spec: str) -> None:
    from host_collector.config import parse

    cfg = parse({"vm": [{"name": "vm1", "token": "t" * 20, "qmp": spec}]}, "c.toml")
    assert cfg.vms[0].qmp == spec


@pytest.mark.parametrize("spec", ["vsock:3:4444", "127.0.0.1:4444", "unix:", 7])
def test_registry_refuses_a_bad_qmp_monitor(spec: object) -> None:
    from host_collector.config import ConfigError, parse

    with pytest.raises(ConfigError, match=r"c\.toml: vm 'vm1'.*qmp"):
        parse({"vm": [{"name": "vm1", "token": "t" * 20, "qmp": spec}]}, "c.toml")


def test_a_source_slow_to_answer_in_its_completion_is_not_lost() -> None:
    """QEMU's completion holds the lock query-migrate needs while it writes the final pass;
    behind a slow link one poll can time out. The run waits (a note says so) instead of
    declaring the source lost and failing a migration that completes."""
    import asyncio
    from typing import Any

    from host_collector.migrate import run as run_mod
    from host_collector.proxy.results import ProxyStats
    from host_collector.qmp.session import QmpError, QmpTimeout

    class Src:
        def __init__(self, script: list[Any]) -> None:
            self.script = script

        async def execute(self, cmd: str, args: Any = None, *, timeout_s: float | None = None) -> Any:
            item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
            if isinstance(item, Exception):
                raise item
            return item

    class Proxy:
        def stats(self) -> ProxyStats:
            return ProxyStats()

        def wait(self, timeout: float | None = None) -> None:
            return None

    def follow(script: list[Any]) -> tuple[Any, run_mod.MigrationRun]:
        plan = run_mod.Plan(vm="vm", source_qmp="unix:/nowhere", to="tcp:127.0.0.1:1")
        mr = run_mod.MigrationRun(None, plan, Src(script), None, lambda ev: None)  # type: ignore[arg-type]
        return asyncio.run(mr._follow(Proxy())), mr  # type: ignore[arg-type]

    timeout = QmpTimeout("QMP vm source: query-migrate not answered within 5 s")
    info, mr = follow([{"status": "device"}, timeout, timeout, {"status": "completed"}])
    assert info == {"status": "completed"} and not mr.source_lost
    assert any("timed out" in n for n in mr._notes)
    info, mr = follow([{"status": "active"}, QmpError("QMP vm source: query-migrate: ConnectionResetError")])
    assert mr.source_lost and info == {"status": "active"}
