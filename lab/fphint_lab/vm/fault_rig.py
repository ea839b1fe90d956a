"""The fault campaign's rig: one guest boot, the collector daemon (with the
witness), and the relays the faults act on; runs one fault case and the clean
fphint migration after it. Shared by tests/vm/test_e2e_faults.py (a subset)
and bench/faults.py (every case).

A case (fphint_lab/faults.py names the kinds and phases):

1. the guest at the head of the chain runs the churn workload and has
   garbage in its free memory; the source is set not to converge
   (``downtime-limit`` 1 ms) so every phase lasts until the test moves on;
2. ``fph-collector migrate`` starts over a 400 Mbit/s link to a paused
   destination; the test waits for the phase, injects the fault, then lets
   the source converge;
3. the source's migration ends in one of the states the case allows; the
   guest then runs on the source (intact: the workload verifies every byte it
   kept, same boot id, kernel log clean) or, where the migration legitimately
   completed, on the destination after the page-by-page RAM comparison with
   the witness;
4. the abort-then-prove-the-source-usable step (QEMU's
   test_multifd_tcp_cancel): a clean fphint migration of the same guest
   completes, rewrites pages, and passes the same RAM comparison and checks.

Network layout: the guest's agent reaches the daemon through an agent relay
(a LinkRelay without a rate, whose tap spots hint requests); the daemon's QMP
session of the source goes through a UnixRelay that can cut it. The agent is
the real one with its kpageflags source, run by a transient systemd unit that
restarts it (the image's unit, eBPF, takes minutes to come back under TCG).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from vmimage.qemu import collector_address

from .. import faults
from ..faults import Injection, Injector, Kind, Phase, RequestSpotter, Target, Watcher
from ..linkrelay import GIGABIT, LinkRelay
from ..unixrelay import UnixRelay
from . import tally
from .fphint_daemon import CollectorDaemon, DaemonError, parse_report
from .harness import VM, MigrationError, VMError, VMFactory, start_incoming, wait_incoming
from .qmp import QMPError
from .ramcompare import PAGE, compare_ram_files
from .scenarios import NO_AGENT, guest_problems, set_switchover_bandwidth

LOG = logging.getLogger(__name__)
MiB = 1 << 20

VM_NAME = "guest"
TOKEN = "fault-campaign-token-" + "0123456789abcdef"
AGENT_UNIT = "fph-agent-faults"
FAULT_RATE = 400e6
CLEAN_RATE = GIGABIT
NON_CONVERGE_MS = 1
CONVERGE_MS = 1000
DEFAULT_DOWNTIME_MS = 300
FIRST_PASS_BYTES = 24 * MiB
CHURN = ("--workers", "1", "--loop-mib", "8", "--keep-mib", "16", "--dwell", "0.3")
FILL_MIB = 128


@dataclass
class CaseResult:
    """One fault case: what was hit, how the migration ended, what the checks found."""

    kind: str
    aimed: str
    observed: str = ""
    allowed: list[str] = field(default_factory=list)
    source_outcome: str = ""
    guest_on: str = ""
    cli_rc: int | None = None
    report_outcome: str = ""
    report_message: str = ""
    injection: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: tally records (JSON) of the migrations checked in this case.
    migrations: list[str] = field(default_factory=list)
    verified_bytes: int = 0
    recovery: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def survived(self) -> bool:
        return not self.problems and self.source_outcome in self.allowed and self.observed == self.aimed

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["survived"] = self.survived
        return d


class FaultRig:
    def __init__(self, factory: VMFactory, *, mem_mib: int = 768) -> None:
        self.factory = factory
        self.mem_mib = mem_mib
        work = factory.rundir / "faults"
        work.mkdir(parents=True, exist_ok=True)
        self.daemon = CollectorDaemon(work / "collector", {VM_NAME: TOKEN}, witness=True)
        self.spotter = RequestSpotter()
        self.agent_link: LinkRelay | None = None
        self.qmp = UnixRelay(work / "source-qmp.sock")
        self.vm: VM | None = None
        self.boot_id = ""
        self.hops = 0
        self.log: list[str] = []

    # Section: lifecycle

    def start(self) -> FaultRig:
        self.daemon.start()
        self.agent_link = LinkRelay(
            ("127.0.0.1", self.daemon.port), rate_bps=None, rcvbuf=None, tap=self.spotter.tap
        ).start()
        self.spotter.link = self.agent_link
        self.daemon.point_qmp(VM_NAME, self.qmp.path)
        return self

    def close(self) -> None:
        self.daemon.stop()
        if self.agent_link is not None:
            self.agent_link.close()
        self.qmp.close()

    def note(self, text: str) -> None:
        LOG.warning("%s", text)
        self.log.append(text)
        print(text, flush=True)

    def current(self) -> VM:
        """The running guest at the head of the chain (booted on first use, or again if hurt)."""
        if self.vm is not None and self.vm.is_running() and not guest_problems(self.vm, self.boot_id):
            return self.vm
        if self.vm is not None:
            self.vm.shutdown(hard=True)
        assert self.agent_link is not None
        vm = self.factory.boot(
            f"boot{len(self.factory.vms)}",
            token=TOKEN,
            mem_mib=self.mem_mib,
            collector=collector_address(self.agent_link.address[1]),
            append=(NO_AGENT,),
        )
        vm.run("modprobe -q qemu_fw_cfg || true")
        vm.run(
            f"systemd-run --unit {AGENT_UNIT} --property=Restart=always --property=RestartSec=1 "
            "--setenv=PYTHONUNBUFFERED=1 /opt/fphint/bin/fph-agent --source kpageflags --log-format json run"
        )
        self.vm = vm
        self.boot_id = vm.boot_id()
        info = self.daemon.wait_attached(VM_NAME, 180)
        self.note(f"booted {vm.name} (QEMU {vm.qemu_version}); agent attached, source {info.get('chosen_source')!r}")
        return vm

    def restart_daemon(self) -> None:
        """After a SIGKILL: a fresh daemon on the same port and registry (the
        witness numbering starts again, so the old files go)."""
        self.daemon.stop()
        shutil.rmtree(self.daemon.witness_dir, ignore_errors=True)
        self.daemon.start()
        self.daemon.point_qmp(VM_NAME, self.qmp.path)

    def kill_agent(self, vm: VM) -> None:
        vm.run(f"systemctl kill --signal=SIGKILL {AGENT_UNIT}", timeout=30)

    def destination(self, src: VM) -> VM:
        self.hops += 1
        return self.factory.destination(src, f"hop{self.hops}", paused=True)

    # Section: the guest's workload

    def prepare(self, vm: VM, fill: bool = True) -> None:
        """Churn running (workers an interrupted case left are checked and
        stopped first), and, with ``fill``, garbage in free memory."""
        started = _start_churn(vm)
        if not started.get("ok"):
            vm.run("python3 -m fphint_lab.guest.churn check > /dev/null 2>&1", timeout=180, check=False)
            started = _start_churn(vm)
        if not started.get("ok"):
            raise AssertionError(f"churn did not start: {started}")
        if not fill:
            return
        filled = vm.workload("fill.py", str(FILL_MIB), timeout=300)
        if filled.get("bad_pages"):
            raise AssertionError(f"fill.py read back bad pages: {filled}")

    def verify(self, vm: VM) -> tuple[list[str], int]:
        """Guest health and the workload's verification of every byte; (problems, bytes verified)."""
        problems = guest_problems(vm, self.boot_id)
        if problems:
            return problems, 0
        check = vm.workload("churn.py", "check", timeout=180, check=False)
        verified = sum(int(w.get("bytes_verified", 0)) for w in check.get("workers", []))
        if not check.get("ok"):
            problems.append(f"{vm.name}: workload verification failed: {check}")
        problems += guest_problems(vm, self.boot_id)
        return problems, verified

    def compare(self, src: VM, dst: VM) -> tuple[int, int, str]:
        """(differing pages, bad pages, description) of the two RAM files, with the witness."""
        witness = self.daemon.witness(VM_NAME)
        pages = src.ram_path.stat().st_size // PAGE
        diff = compare_ram_files(src.ram_path, dst.ram_path, rewritten=witness.allowed("mem", pages))
        return diff.differing, diff.bad_count, "" if diff.ok else diff.describe()

    def advance(self, src: VM, dst: VM) -> VM:
        """The (paused) destination becomes the head of the chain."""
        dst.cmd("cont")
        src.shutdown()
        self.vm = dst
        return dst

    # Section: the clean migration

    def clean_migration(self, test: str) -> tuple[dict[str, Any], list[str], str]:
        """fph-collector migrate of the head guest (churning, garbage in free
        memory) at 1 Gbit/s to a paused destination; RAM comparison with the
        witness; then on the destination the workload's check. Returns (figures,
        problems, tally record)."""
        src = self.current()
        self.daemon.wait_attached(VM_NAME, 120)
        self.prepare(src)
        set_switchover_bandwidth(src, CLEAN_RATE)
        src.cmd("migrate-set-parameters", {"downtime-limit": DEFAULT_DOWNTIME_MS})
        self.qmp.retarget(src.aux_qmp)
        dst = self.destination(src)
        with LinkRelay(start_incoming(dst), rate_bps=CLEAN_RATE) as link:
            call = self.daemon.migrate(VM_NAME, link.uri, dest_qmp=dst.aux_qmp, timeout=300)
            if not call.completed:
                return (
                    {"rc": call.rc, "report": dict(call.report)},
                    [
                        f"clean migration after the fault did not complete: exit {call.rc}: "
                        f"{call.report.get('outcome')} {call.report.get('message')} {call.stderr[-1500:]}"
                    ],
                    "",
                )
            wait_incoming(dst, 60)
        rep = call.report
        figures = {
            "pages_rewritten": rep.get("pages_rewritten"),
            "dirty_sync_count": rep.get("dirty_sync_count"),
            "wall_s": round(call.wall_s, 2),
            "agent_source": rep.get("agent_source"),
        }
        problems: list[str] = []
        if not rep.get("rewriting") or not int(rep.get("pages_rewritten") or 0):
            problems.append(f"the clean migration rewrote nothing: {rep.get('plain_relay_reason')!r} {figures}")
        differing, bad, desc = self.compare(src, dst)
        figures.update(differing_pages=differing, bad_pages=bad)
        if bad:
            problems.append(f"clean migration: RAM comparison: {desc}")
        vm = self.advance(src, dst)
        more, verified = self.verify(vm)
        problems += more
        record = tally.migration(
            test,
            corrupted_pages=bad,
            ram_compared=True,
            workload_ok=not more,
            verified_bytes=verified,
            role="clean after fault",
        )
        return figures, problems, record

    # Section: one fault case

    def run_case(self, kind: Kind, phase: Phase, test: str = "fault") -> CaseResult:
        t0 = time.monotonic()
        res = CaseResult(kind.value, phase.value, allowed=sorted(faults.outcomes(kind, phase)))
        src = self.current()
        self.daemon.wait_attached(VM_NAME, 120)
        self.prepare(src, fill=False)  # free memory holds garbage enough from earlier fills and churn
        set_switchover_bandwidth(src, FAULT_RATE)
        src.cmd("migrate-set-parameters", {"downtime-limit": NON_CONVERGE_MS})
        self.qmp.retarget(src.aux_qmp)
        dst = self.destination(src)
        start = len(src.qmp.events())
        inj = Injection(kind, phase)
        link = LinkRelay(start_incoming(dst), rate_bps=FAULT_RATE, stalled=phase is Phase.SETUP).start()
        daemon_killed = False

        def kill_daemon() -> None:
            nonlocal daemon_killed
            daemon_killed = True
            self.daemon.kill()

        assert self.agent_link is not None
        injector = Injector(
            Target(link, kill_daemon, lambda: dst.pid, self.qmp, lambda: self.kill_agent(src), self.agent_link)
        )
        cli = self.daemon.start_migrate(VM_NAME, link.uri, dest_qmp=dst.aux_qmp)
        watch = Watcher(src.qmp.events, link, start, alive=lambda: cli.poll() is None)
        try:
            self._reach_and_inject(injector, watch, inj, src, link)
            status = self._wait_terminal(src, 240)
        except BaseException:
            cli.kill()
            try:
                src.cmd("migrate_cancel", timeout=10)
            except QMPError:
                pass
            raise
        finally:
            link.close()  # cuts what a stall left hanging (the proxy then ends at once)
        out, err = cli.communicate(timeout=180)
        report = parse_report(out)
        res.cli_rc = cli.returncode
        res.report_outcome = str(report.get("outcome", ""))
        res.report_message = str(report.get("message") or err.strip()[-300:])
        res.source_outcome = status
        timeline = watch.timeline()
        res.observed = inj.phase(timeline)
        res.injection = {
            "detail": inj.detail,
            "forwarded_mib": round(inj.forwarded / MiB, 1),
            "source_pass": timeline.last_pass(inj.at),
            **inj.extra,
        }
        if timeline.stop is not None:
            res.injection["stop_minus_injection_s"] = round(timeline.stop - inj.at, 3)
        if phase is Phase.MID_REPORT:
            res.injection["epochs"] = [
                e for e in report.get("epochs", []) if e.get("epoch") == inj.extra.get("request_epoch")
            ]
        if kind is Kind.DAEMON:
            self.restart_daemon()
        res.problems += self._settle(res, src, dst, status, test, witness_ok=not daemon_killed)
        if not res.problems:
            self.daemon.wait_attached(VM_NAME, 120)
            res.recovery, more, record = self.clean_migration(test)
            res.problems += more
            if record:
                res.migrations.append(record)
        res.wall_s = round(time.monotonic() - t0, 1)
        tally.record(
            tally.FAULT,
            {
                "test": test,
                "kind": res.kind,
                "aimed": res.aimed,
                "observed": res.observed,
                "source_outcome": res.source_outcome,
                "guest_on": res.guest_on,
                "survived": res.survived,
                "problems": res.problems[:3],
            },
        )
        self.note(
            f"fault {kind.value} @ {phase.value}: observed {res.observed}, source {status} "
            f"(allowed {res.allowed}), guest on the {res.guest_on}, CLI {res.cli_rc} {res.report_outcome} "
            f"{res.report_message[:160]!r}; {res.injection}; recovery {res.recovery}; "
            f"problems {res.problems}; {res.wall_s} s"
        )
        return res

    def _reach_and_inject(self, injector: Injector, watch: Watcher, inj: Injection, src: VM, link: LinkRelay) -> None:
        kind, phase = inj.kind, inj.aimed
        if phase is Phase.SETUP:
            watch.connected()
            injector.inject(inj)
            if kind is not Kind.STALL:
                link.resume()
            self._converge(src)
            return
        if phase is Phase.FIRST_PASS:
            watch.first_pass(FIRST_PASS_BYTES)
            injector.inject(inj)
            self._converge(src)
            return
        watch.later_pass()
        if phase is Phase.LATER_PASS:
            injector.inject(inj)
            self._converge(src)
        elif phase is Phase.MID_REPORT:
            injector.agent_mid_report(inj, self.spotter)
            self._converge(src)
        elif kind is Kind.AGENT:  # switchover: dead when the guest stops
            injector.inject(inj)
            self._converge(src)
        else:
            self._converge(src)
            watch.stopped()
            injector.inject(inj)

    def _converge(self, src: VM) -> None:
        try:
            src.cmd("migrate-set-parameters", {"downtime-limit": CONVERGE_MS}, timeout=10)
        except QMPError as exc:  # a stalled switchover holds QEMU's lock; the migration ends anyway
            LOG.warning("converge: %s", exc)

    def _wait_terminal(self, src: VM, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = str(src.cmd("query-migrate", timeout=10).get("status"))
            except QMPError:
                status = "(no answer)"  # QEMU's lock is held during the END section
            if status in ("completed", "failed", "cancelled"):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"source still {status} {timeout:.0f} s after the fault")
            time.sleep(0.1)

    def _settle(self, res: CaseResult, src: VM, dst: VM, status: str, test: str, *, witness_ok: bool) -> list[str]:
        """Where the guest lives after the fault, and is it intact."""
        problems: list[str] = []
        if status not in res.allowed:
            problems.append(f"source ended {status}, allowed {res.allowed}")
        if status == "completed" and dst.is_running():
            try:
                wait_incoming(dst, 60)
            except MigrationError as exc:
                return [*problems, f"source completed but the destination did not: {exc}"]
            res.guest_on = "destination"
            differing, bad, desc = -1, 0, ""
            compared = False
            if witness_ok:
                try:
                    differing, bad, desc = self.compare(src, dst)
                    compared = True
                except DaemonError as exc:
                    problems.append(f"no witness for a completed migration: {exc}")
            if bad:
                problems.append(f"RAM comparison after the fault: {desc}")
            vm = self.advance(src, dst)
            more, verified = self.verify(vm)
            problems += more
            res.verified_bytes = verified
            res.migrations.append(
                tally.migration(
                    test,
                    corrupted_pages=bad,
                    ram_compared=compared,
                    workload_ok=not more,
                    verified_bytes=verified,
                    role=f"{res.kind} at {res.aimed}",
                    differing_pages=differing,
                )
            )
            return problems
        if status == "completed":
            # Completed, then the destination died: the source has the whole
            # guest in postmigrate; resuming it there is the orchestrator's move.
            src.cmd("cont")
        res.guest_on = "source"
        dst.shutdown(hard=True)
        state = src.status()
        if state != "running":
            problems.append(f"the guest is {state} on the source after the fault")
        more, verified = self.verify(src)
        res.verified_bytes = verified
        return problems + more


def _start_churn(vm: VM) -> dict[str, Any]:
    try:
        started: dict[str, Any] = vm.workload("churn.py", "start", *CHURN, timeout=180, check=False)
    except (ValueError, VMError) as exc:  # e.g. workers of an interrupted case still live
        return {"ok": False, "error": str(exc)}
    return started
