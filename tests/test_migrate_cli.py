"""`fph-collector migrate` and `proxy` end to end: a real daemon process, a real
agent, real QEMU (TCG, no guest OS, RAM in files), the CLI as a subprocess.

Every completed migration is checked page by page: the destination's RAM
equals the source's except for pages the proxy zeroed, which must be hinted
pages that had content, and their number must be the report's
``pages_rewritten`` (a paused source sends each page once).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fphint_lab.migrate_harness import (
    QEMU10,
    AgentThread,
    Daemon,
    StallingSource,
    dest_vm,
    fixed_agent,
    has_qemu10,
    pages_in,
    report_of,
    source_vm,
)
from fphint_lab.qemu_pair import (
    Machine,
    MiB,
    Vm,
    boot_image,
    compare_ram,
    free_port,
    pattern,
    wait_loop_running,
    write_gpa,
)

from .qmp_launcher import TCG_FIXED, qemu_version

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

VM = "vm1"
MACHINE = Machine("pc", 256 * MiB)
FILLED = [(8 * MiB, 200 * MiB)]
#: Hinted: content the stream carries (rewritable) and zero pages (already ZERO records).
HINTED = [(100 * MiB, 180 * MiB), (220 * MiB, 240 * MiB)]


class Setup:
    """A daemon, a source with the collector's monitor, a destination; cleaned up by the fixture."""

    def __init__(self, tmp: Path, shm: Path) -> None:
        self.tmp = tmp
        self.shm = shm
        self.daemon = Daemon([VM], log_dir=tmp)
        self.vms: list[Vm] = []
        self.agents: list[AgentThread] = []

    def start_daemon(self) -> Daemon:
        self.daemon.start()
        return self.daemon

    def pair(self, *, running: bool = False, qemu: str | None = None, dest_qmp: bool = False) -> tuple[Vm, Vm]:
        boot = boot_image(self.tmp / "boot.img") if running else None
        src = source_vm(self.daemon, VM, MACHINE, self.tmp, running=running, boot=boot, qemu=qemu, ram_dir=self.shm)
        extra = ["-qmp", f"unix:{self.daemon.dir}/dst.fphint.qmp,server=on,wait=off"] if dest_qmp else []
        dst = dest_vm(MACHINE, self.tmp, boot=boot, qemu=qemu, ram_dir=self.shm, extra_args=extra)
        self.vms += [src, dst]
        for start, end in FILLED:
            write_gpa(src, start, pattern(start, (end - start) // 4096, seed=11))
        src.start()
        dst.start()
        if running:
            wait_loop_running(src)
        return src, dst

    def agent(self, agent: AgentThread) -> AgentThread:
        self.agents.append(agent)
        self.daemon.wait_attached(VM)
        return agent

    def close(self) -> None:
        for a in self.agents:
            a.close()
        for vm in self.vms:
            vm.kill()
        self.daemon.stop()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    shm = Path(tempfile.mkdtemp(prefix="fph-migrate-test-", dir="/dev/shm"))
    s = Setup(tmp_path, shm)
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(shm, ignore_errors=True)


#: A paused source with QEMU's default downtime limit may send the tail of its
#: only pass after the stop (END section: never rewritten); 0 keeps it in PART sections.
PAUSED = ("--downtime-limit", "0")


def migrate(s: Setup, dst: Vm, *extra: str, timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    port = dst.listen_incoming()
    proc = s.daemon.run(
        "migrate", VM, "--to", f"tcp:127.0.0.1:{port}", "--max-bandwidth", "2G", "--json", *extra, timeout=timeout
    )
    return proc.returncode, report_of(proc), proc.stderr


def assert_hinted_pages_zeroed(src: Vm, dst: Vm, report: dict[str, Any]) -> set[int]:
    diff = compare_ram(src, dst)
    assert not diff.other, f"pages differ with content on the destination: {sorted(diff.other.get('mem', []))[:10]}"
    # A zeroed page had content on the source (a difference): it must be a hinted one. (A running
    # guest's firmware may have written some hinted pages outside FILLED before the migration.)
    zeroed = diff.zeroed.get("mem", set())
    wrong = zeroed - pages_in(HINTED)
    assert not wrong, f"zeroed but not hinted: {len(wrong)} pages, first {sorted(wrong)[:10]}"
    assert len(zeroed) == report["pages_rewritten"]
    return zeroed


def test_paused_source_hinted_pages_arrive_zero(setup: Setup) -> None:
    s = setup
    s.start_daemon()
    src, dst = s.pair(dest_qmp=True)
    s.agent(fixed_agent(s.daemon, VM, HINTED))
    port = dst.listen_incoming()
    proc = s.daemon.run(
        "migrate",
        VM,
        "--to",
        f"tcp:127.0.0.1:{port}",
        "--max-bandwidth",
        "2G",
        "--dest-qmp",
        f"unix:{s.daemon.dir}/dst.fphint.qmp",
        "--json",
        *PAUSED,
    )
    assert proc.returncode == 0, (proc.stderr, proc.stdout)
    r = report_of(proc)
    assert r["outcome"] == "completed" and r["source_status"] == "completed", r
    assert r["rewriting"] and r["agent_attached"] and r["agent_source"] == "fixed"
    assert r["preflight"]["safe"] and r["preflight"]["destination_checked"]
    assert r["destination_status"] == "completed"
    zeroed = assert_hinted_pages_zeroed(src, dst, r)
    hinted_content = pages_in(HINTED) & pages_in(FILLED)
    assert len(zeroed) >= len(hinted_content) // 2, (len(zeroed), len(hinted_content), r)
    assert r["epochs"] and max(e["hint_pages"] for e in r["epochs"]) == len(pages_in(HINTED))
    assert any(e["request_sent"] and e["request_to_last_chunk_s"] >= 0 for e in r["epochs"])
    assert r["proxy_outcome"] == "finished" and r["source_bytes"] > r["destination_bytes"]
    assert r["source_bytes"] - r["destination_bytes"] == 4095 * r["pages_rewritten"]  # PAGE 4096 -> ZERO 1 byte
    assert r["downtime_ms"] >= 0 and r["wall_s"] > 0
    # Coverage: a paused source sends each page once, every rewrite is of a hinted page and
    # in some epoch's window, so the windows' rewrites add up to the proxy's count.
    cov = r["coverage"]
    assert cov["epochs"] and cov["epochs"][0]["reported"] and cov["first_report_ms"] >= 0, cov
    assert sum(e["rewritten_after_open"] for e in cov["epochs"]) == r["pages_rewritten"], cov
    assert sum(e["sent_after_open"] for e in cov["epochs"]) >= r["pages_rewritten"]
    assert (
        sum(e["records"] for e in cov["epochs"]) + cov["records_before_first_epoch"] + cov["end_section_records"]
        == r["page_records"]
    ), (cov, r["page_records"])
    assert r["timing"]["polls"] == r["polls"] > 0
    assert r["same_sync_rule"]  # TCG: rule (b)'s same-sync case in use (§7.2 concerns KVM)
    # The checker catches a destination page zeroed without a hint, and one with wrong content.
    for fault, where in ((b"\0" * 4096, 20 * MiB), (b"\1" * 4096, 120 * MiB)):
        with open(dst.files["mem"], "r+b") as f:
            f.seek(where)
            f.write(fault)
        with pytest.raises(AssertionError):
            assert_hinted_pages_zeroed(src, dst, r)


def test_unsafe_capability_means_plain_relay_with_the_reason(setup: Setup) -> None:
    s = setup
    s.start_daemon()
    src, dst = s.pair()
    src.set_caps(xbzrle=True)
    s.agent(fixed_agent(s.daemon, VM, HINTED))
    rc, r, err = migrate(s, dst, *PAUSED)
    assert rc == 0, err
    assert r["outcome"] == "completed" and not r["rewriting"] and r["pages_rewritten"] == 0
    assert "source: capability xbzrle: XBZRLE deltas" in r["plain_relay_reason"], r["plain_relay_reason"]
    assert [p["setting"] for p in r["preflight"]["problems"]] == ["capability xbzrle"]
    assert not r["epochs"]  # no epoch was even opened
    assert "coverage" not in r  # nothing to cover on a plain relay
    # The destination's return-path capability was never set, yet it answers on the return path.
    assert r["return_bytes"] > 0 and not r["preflight"]["destination_checked"]
    diff = compare_ram(src, dst)
    assert not diff.zeroed and not diff.other


@pytest.mark.parametrize("agent", ["none", "never answers"])
def test_no_agent_or_a_silent_one_gives_a_plain_migration(setup: Setup, agent: str) -> None:
    s = setup
    s.start_daemon()
    src, dst = s.pair()
    if agent == "never answers":
        stalling = StallingSource()
        s.agent(AgentThread(s.daemon, VM, stalling))
    rc, r, err = migrate(s, dst, "--hint-deadline-ms", "2000", *PAUSED)
    assert rc == 0, err
    assert r["outcome"] == "completed" and r["rewriting"] and r["pages_rewritten"] == 0
    assert r["agent_attached"] == (agent != "none")
    assert r["epochs"], r
    for e in r["epochs"]:
        assert e["hint_pages"] == 0 and e["request_to_last_chunk_s"] == -1
        assert e["request_sent"] == (agent != "none")
    cov = r["coverage"]
    assert cov["epochs"] and not any(e["reported"] for e in cov["epochs"]), cov
    assert cov["first_report_ms"] == -1 and cov["fraction"] == -1 and not cov["first_report_goal_met"]
    if agent == "never answers":
        assert stalling.calls >= 1  # it was asked
    diff = compare_ram(src, dst)
    assert not diff.zeroed and not diff.other


def test_destination_not_listening_fails_cleanly_and_the_vm_migrates_later(setup: Setup) -> None:
    s = setup
    s.start_daemon()
    src, dst = s.pair(running=True)
    nobody = free_port()
    proc = s.daemon.run("migrate", VM, "--to", f"tcp:127.0.0.1:{nobody}", "--json")
    assert proc.returncode == 1, proc.stderr
    r = report_of(proc)
    assert r["outcome"] == "failed" and r["source_status"] == "failed"
    assert f"cannot connect to the destination tcp:127.0.0.1:{nobody}" in r["message"], r["message"]
    assert r["source_runstate"] == "running" and src.status() == "running"
    wait_loop_running(src)
    # The text form says the same.
    proc = s.daemon.run("migrate", VM, "--to", f"tcp:127.0.0.1:{nobody}")
    assert proc.returncode == 1 and "migration FAILED: cannot connect to the destination" in proc.stdout
    rc, r, err = migrate(s, dst)  # and the same VM migrates for real afterwards
    assert rc == 0 and r["outcome"] == "completed", (err, r)
    if qemu_version() < TCG_FIXED:  # a running TCG guest is never rewritten there
        assert "accelerator TCG" in r["plain_relay_reason"], r["plain_relay_reason"]
    else:
        assert r["plain_relay_reason"] == ""
    diff = compare_ram(src, dst)
    assert not diff.other and (qemu_version() >= TCG_FIXED or not diff.zeroed)


def _slow_migration(s: Setup) -> tuple[Vm, Vm, Any]:
    src, dst = s.pair(running=True)
    port = dst.listen_incoming()
    cli = s.daemon.popen("migrate", VM, "--to", f"tcp:127.0.0.1:{port}", "--max-bandwidth", "16M", "--json")
    end = time.monotonic() + 30
    while src.migration().get("ram", {}).get("transferred", 0) < 4 * MiB:
        assert time.monotonic() < end and cli.poll() is None, (cli.poll(), src.migration())
        time.sleep(0.05)
    return src, dst, cli


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_daemon_killed_mid_migration_source_keeps_running(setup: Setup, how: str) -> None:
    s = setup
    s.start_daemon()
    src, _dst, cli = _slow_migration(s)
    assert any(c["capability"] == "return-path" and c["state"] for c in src.cmd("query-migrate-capabilities"))
    assert s.daemon.proc is not None
    s.daemon.proc.send_signal(getattr(signal, how))
    info = src.wait_migration(("failed", "cancelled", "completed"), 30)
    # Killed: the proxy's sockets die with it. Stopped: it cancels the migration first.
    assert info["status"] == ("failed" if how == "SIGKILL" else "cancelled"), info
    assert src.status() == "running"
    wait_loop_running(src)
    out, err = cli.communicate(timeout=30)
    assert cli.returncode == 1 and err.strip(), (cli.returncode, out, err)


def test_ctrl_c_cancels_the_migration_and_the_vm_keeps_running(setup: Setup) -> None:
    s = setup
    s.start_daemon()
    src, _dst, cli = _slow_migration(s)
    cli.send_signal(signal.SIGINT)
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 1, (out, err)
    r = report_of(subprocess.CompletedProcess([], cli.returncode, out, err))
    assert r["outcome"] == "cancelled" and r["source_status"] == "cancelled", r
    assert "cancelled by the operator" in r["message"]
    assert r["source_runstate"] == "running" and src.status() == "running"
    wait_loop_running(src)


def test_a_command_that_dies_cancels_its_migration(setup: Setup) -> None:
    s = setup
    s.start_daemon()
    src, _dst, cli = _slow_migration(s)
    cli.kill()  # no goodbye: the daemon only sees the call end
    cli.communicate(timeout=30)
    info = src.wait_migration(("failed", "cancelled", "completed"), 30)
    assert info["status"] == "cancelled", info
    assert src.status() == "running"
    wait_loop_running(src)
    end = time.monotonic() + 10  # the daemon logs it as it winds the job up
    while "the admin call ended before the migration did" not in s.daemon.log_text():
        assert time.monotonic() < end, "the daemon never said why it cancelled"
        time.sleep(0.1)


def _ready_address(cli: subprocess.Popen[str], migration: int) -> str:
    assert cli.stderr is not None
    line = cli.stderr.readline()
    assert f"(migration {migration})" in line and "proxy listening on tcp:127.0.0.1:" in line, line
    return line.split("proxy listening on ")[1].split()[0]


def test_standing_proxy_serves_the_orchestrators_migrations(setup: Setup) -> None:
    s = setup
    s.start_daemon()
    src, dst = s.pair()
    s.agent(fixed_agent(s.daemon, VM, HINTED))
    port = free_port()  # the destination listens there only from the second migration on
    cli = s.daemon.popen(
        "proxy", VM, "--listen", "tcp:127.0.0.1:0", "--to", f"tcp:127.0.0.1:{port}", "--count", "2", "--json"
    )
    address = _ready_address(cli, 1)
    # The orchestrator (this test) issues migrate itself, twice.
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 2 << 30, "downtime-limit": 0})
    src.cmd("migrate", uri=address)
    assert src.wait_migration(("completed", "failed"), 30)["status"] == "failed"
    assert _ready_address(cli, 2) == address  # the same port again
    dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    src.cmd("migrate", uri=address)
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 1, (out, err)  # one of the two failed
    r1, r2 = (json.loads(line) for line in out.strip().splitlines())
    assert r1["outcome"] == "failed" and f"cannot connect to the destination tcp:127.0.0.1:{port}" in r1["message"]
    assert r1["source_runstate"] == "paused" or r1["source_runstate"] == "prelaunch", r1
    assert r2["outcome"] == "completed" and not r2["issued_migrate"] and r2["migration"] == 2, r2
    assert r2["rewriting"], r2["plain_relay_reason"]
    zeroed = assert_hinted_pages_zeroed(src, dst, r2)
    assert len(zeroed) >= len(pages_in(HINTED) & pages_in(FILLED)) // 2, r2


def test_standing_proxy_checks_the_settings_again_once_the_migration_starts(setup: Setup) -> None:
    s = setup
    s.start_daemon()
    src, dst = s.pair()
    s.agent(fixed_agent(s.daemon, VM, HINTED))
    port = dst.listen_incoming()
    cli = s.daemon.popen(
        "proxy", VM, "--listen", "tcp:127.0.0.1:0", "--to", f"tcp:127.0.0.1:{port}", "--count", "1", "--json"
    )
    address = _ready_address(cli, 1)  # armed: pre-flight found nothing wrong
    src.set_caps(xbzrle=True)  # the orchestrator changes a setting just before migrate
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 2 << 30, "downtime-limit": 0})
    src.cmd("migrate", uri=address)
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, (out, err)
    r = json.loads(out.strip().splitlines()[-1])
    assert r["outcome"] == "completed" and not r["rewriting"] and r["pages_rewritten"] == 0, r
    assert "capability xbzrle" in r["plain_relay_reason"] and "once the migration started" in r["plain_relay_reason"]
    assert not r["preflight"]["safe"]
    diff = compare_ram(src, dst)
    assert not diff.zeroed and not diff.other


@pytest.mark.skipif(not has_qemu10(), reason=f"QEMU 10.0 not at {QEMU10} (scripts/install-qemu10.sh)")
def test_running_source_on_qemu10_rewrites_and_stays_exact(setup: Setup) -> None:
    s = setup
    s.start_daemon()
    src, dst = s.pair(running=True, qemu=QEMU10)
    s.agent(fixed_agent(s.daemon, VM, HINTED))
    # QEMU stops the guest once what is left is below bandwidth x downtime-limit and sends
    # that in the END section, which is never rewritten: keep the limit small.
    rc, r, err = migrate(s, dst, "--downtime-limit", "10")
    assert rc == 0, (err, r)
    assert r["outcome"] == "completed" and r["rewriting"], r
    assert r["preflight"]["source_version"].startswith("10.0")
    zeroed = assert_hinted_pages_zeroed(src, dst, r)
    assert zeroed, json.dumps(r, indent=1)
    assert r["return_bytes"] > 0  # return path used although only the source's capability is on


def test_switchover_bandwidth_is_set_on_the_source_or_refused_clearly(setup: Setup) -> None:
    """``--switchover-bandwidth`` sets avail-switchover-bandwidth (QEMU >= 8.2); an older
    QEMU refuses the parameter, and the report says so before anything migrates."""
    s = setup
    s.start_daemon()
    src, dst = s.pair()
    version = tuple(src.cmd("query-version")["qemu"][k] for k in ("major", "minor"))
    rc, r, err = migrate(s, dst, "--switchover-bandwidth", "100M", *PAUSED)
    if version >= (8, 2):
        assert rc == 0 and r["outcome"] == "completed", (err, r)
        assert r["switchover_bandwidth"] == 100 * MiB
        assert src.cmd("query-migrate-parameters")["avail-switchover-bandwidth"] == 100 * MiB
    else:
        assert rc != 0 and r["outcome"] == "error", r
        assert "avail-switchover-bandwidth" in r["message"] and r["source_bytes"] == 0, r
    proc = s.daemon.run("migrate", VM, "--to", "tcp:127.0.0.1:1", "--switchover-bandwidth", "0")
    assert proc.returncode == 2 and "must be positive" in proc.stderr
