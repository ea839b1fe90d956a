"""fphint's real migration path for VM tests, the benchmark and the demo: the
collector daemon as its own process, its admin socket, the guest agent
attached from inside the guest over slirp, and ``fph-collector migrate VM
--to URI --json`` as an operator runs it.

The daemon runs exactly as shipped (``python -m host_collector serve``)
unless a test asks for the witness (``CollectorDaemon(..., witness=True)``):
then it runs under :mod:`fphint_lab.vm.daemon_witness`, which passes the
daemon a migration observer (host_collector.migrate.observer) recording what
the proxy rewrote and what was hinted. The demo and the benchmark never do.

The registry names each VM's QMP monitor by a path; a chain of test
migrations (A -> B -> C) has a new source each time, so the registry points
at a symlink that :meth:`CollectorDaemon.point_qmp` moves to the current
source's second monitor (``VM.aux_qmp``) before each migration.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from vmimage.qemu import collector_address

from ..linkrelay import LinkRelay
from . import daemon_witness
from .harness import FAST_BANDWIDTH, VM, MigrationError, MigrationResult, _pdeathsig_prefix, wait_incoming
from .scenarios import Outcome

LOG = logging.getLogger(__name__)


class DaemonError(Exception):
    pass


@dataclass(frozen=True)
class MigrateCall:
    """One ``fph-collector migrate`` run: exit status, its report, stderr, seconds."""

    rc: int
    report: Mapping[str, Any]
    stderr: str
    wall_s: float

    @property
    def completed(self) -> bool:
        return self.rc == 0 and self.report.get("outcome") == "completed"


@dataclass(frozen=True)
class Witness:
    """What the daemon's proxy rewrote and what the agent hinted, per block."""

    hinted: Mapping[str, npt.NDArray[np.bool_]]
    rewritten: Mapping[str, npt.NDArray[np.int64]]

    def allowed(self, block: str, pages: int) -> npt.NDArray[np.bool_]:
        """Pages a faithful migration may have zeroed: rewritten *and* hinted."""
        mask = np.zeros(pages, dtype=bool)
        rw = self.rewritten.get(block)
        if rw is not None and len(rw):
            mask[rw[rw < pages]] = True
        hinted = self.hinted.get(block)
        if hinted is None:
            return np.zeros(pages, dtype=bool)
        n = min(pages, len(hinted))
        mask[:n] &= hinted[:n]
        mask[n:] = False
        return mask

    def rewritten_unhinted(self, block: str) -> list[int]:
        rw = self.rewritten.get(block, np.zeros(0, dtype=np.int64))
        hinted = self.hinted.get(block, np.zeros(0, dtype=bool))
        return [int(p) for p in rw if p >= len(hinted) or not hinted[p]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CollectorDaemon:
    """``fph-collector serve`` in its own process, with a registry of test VMs.

    :param vms: VM name -> token.
    :param witness: run the daemon under :mod:`daemon_witness` (tests only), so
        :meth:`witness` and :meth:`plant_fault` work; otherwise it runs as shipped.
    """

    def __init__(
        self, workdir: Path, vms: Mapping[str, str], *, port: int | None = None, witness: bool = False
    ) -> None:
        self.workdir = workdir
        self.vms = dict(vms)
        self.port = port or free_port()
        self.with_witness = witness
        self.admin = workdir / "admin.sock"
        self.config = workdir / "collector.toml"
        self.witness_dir = workdir / "witness"
        self.fault_file = workdir / "fault.json"
        self.log_path = workdir / "collector.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def qmp_link(self, vm: str) -> Path:
        return self.workdir / f"{vm}.qmp"

    def write_config(self) -> None:
        lines = ["[collector]", f'listen = ["tcp:127.0.0.1:{self.port}"]', f'admin = "unix:{self.admin}"', ""]
        for name, token in self.vms.items():
            lines += ["[[vm]]", f'name = "{name}"', f'token = "{token}"', f'qmp = "unix:{self.qmp_link(name)}"', ""]
        self.config.write_text("\n".join(lines))

    def serve_argv(self) -> list[str]:
        """The daemon's command line: ``fph-collector serve`` as shipped, or under the witness."""
        serve = ["-v", "serve", "--config", str(self.config)]
        if not self.with_witness:
            return [sys.executable, "-m", "host_collector", *serve]
        return [
            sys.executable,
            "-m",
            daemon_witness.__name__,
            "--witness-dir",
            str(self.witness_dir),
            "--fault-file",
            str(self.fault_file),
            "--",
            *serve,
        ]

    def start(self, timeout: float = 30.0) -> CollectorDaemon:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self._log = self.log_path.open("ab")
        # Dies with its parent (a killed test run leaves no daemon behind).
        self._proc = subprocess.Popen(
            [*_pdeathsig_prefix(), *self.serve_argv()],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise DaemonError(f"the collector exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                self.list_vms()
                return self
            except DaemonError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, nbytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-nbytes:].decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.is_running():
            assert self._proc is not None
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(30)

    def stop(self, timeout: float = 20.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> CollectorDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Section: the command line, as an operator runs it

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "host_collector", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def list_vms(self) -> list[dict[str, Any]]:
        """``fph-collector vms --json``."""
        try:
            out = self.cli("vms", "--admin", f"unix:{self.admin}", "--json", timeout=20)
        except subprocess.TimeoutExpired as exc:
            raise DaemonError(f"fph-collector vms timed out: {exc}") from exc
        if out.returncode != 0:
            raise DaemonError(f"fph-collector vms: exit {out.returncode}: {out.stderr.strip()[-500:]}")
        vms: list[dict[str, Any]] = json.loads(out.stdout or "{}").get("vms", [])
        return vms

    def vm_info(self, vm: str) -> dict[str, Any]:
        for info in self.list_vms():
            if info.get("name") == vm:
                return info
        raise DaemonError(f"VM {vm!r} is not in the collector's registry")

    def wait_attached(self, vm: str, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until the VM's agent is attached; its ``vms`` entry (source, kernel...)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.vm_info(vm)
            if info.get("attached"):
                return info
            if not self.is_running():
                raise DaemonError(f"the collector died:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DaemonError(f"agent of {vm} not attached after {timeout:.0f} s: {info}\n{self.log_tail()}")
            time.sleep(0.5)

    def point_qmp(self, vm: str, target: Path) -> None:
        """Make the registry's QMP path for ``vm`` lead to ``target`` (atomically)."""
        link = self.qmp_link(vm)
        tmp = link.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)

    def migrate_argv(
        self,
        vm: str,
        to: str,
        *,
        dest_qmp: Path | None = None,
        timeout_s: float = 0,
        max_bandwidth: int | None = FAST_BANDWIDTH,
        extra: Sequence[str] = (),
    ) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "host_collector",
            "migrate",
            vm,
            "--to",
            to,
            "--admin",
            f"unix:{self.admin}",
            "--json",
        ]
        if dest_qmp is not None:
            argv += ["--dest-qmp", f"unix:{dest_qmp}"]
        if timeout_s:
            argv += ["--timeout", str(timeout_s)]
        if max_bandwidth is not None:
            argv += ["--max-bandwidth", str(max_bandwidth)]
        return [*argv, *extra]

    def migrate(self, vm: str, to: str, *, timeout: float = 300.0, **kw: Any) -> MigrateCall:
        """``fph-collector migrate VM --to URI --json``; never raises for a failed migration."""
        t = time.monotonic()
        out = subprocess.run(
            self.migrate_argv(vm, to, timeout_s=timeout, **kw), capture_output=True, text=True, timeout=timeout + 120
        )
        wall = time.monotonic() - t
        return MigrateCall(out.returncode, parse_report(out.stdout), out.stderr, wall)

    def start_migrate(self, vm: str, to: str, **kw: Any) -> subprocess.Popen[str]:
        """The same, in the background (for tests that disturb it midway)."""
        return subprocess.Popen(
            self.migrate_argv(vm, to, **kw), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    # Section: witness and planted faults

    def _need_witness(self, what: str) -> None:
        if not self.with_witness:
            raise DaemonError(f"{what} needs the witness: CollectorDaemon(..., witness=True)")

    def witness(self, vm: str) -> Witness:
        """The newest migration's witness file for ``vm``."""
        self._need_witness("witness()")
        files = sorted(self.witness_dir.glob(f"{vm}-*.npz"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        if not files:
            raise DaemonError(f"no witness file for {vm} in {self.witness_dir}")
        hinted, rewritten = daemon_witness.load(files[-1])
        return Witness(hinted, rewritten)

    def plant_fault(self, block: str, pages: Sequence[int]) -> None:
        """From the next migration on, the proxy also zeroes these pages (no hint needed)."""
        self._need_witness("plant_fault()")
        self.fault_file.write_text(json.dumps({"block": block, "pages": [int(p) for p in pages]}))

    def clear_fault(self) -> None:
        self.fault_file.unlink(missing_ok=True)


def parse_report(stdout: str) -> dict[str, Any]:
    """The JSON report ``migrate --json`` prints (its last non-empty line)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return {}
    try:
        report: dict[str, Any] = json.loads(lines[-1])
        return report
    except ValueError:
        return {"unparsed": stdout[-2000:]}


class FphintMigrator:
    """A :class:`scenarios.Migrator` that migrates through the daemon, run as
    shipped (no witness: what the demo and the benchmark measure is the product).

    Guests booted for it get the VM's token and the collector's address by
    fw_cfg (``guest_fields``); the agent inside attaches by itself.
    """

    VM_NAME = "guest"

    def __init__(self, factory: Any, *, attach_timeout: float = 120.0, require_attached: bool = True) -> None:
        self.token = "e2e-" + secrets.token_hex(16)
        self.daemon = CollectorDaemon(Path(factory.rundir) / "collector", {self.VM_NAME: self.token}).start()
        self.attach_timeout = attach_timeout
        self.require_attached = require_attached
        self.guest_fields = {"token": self.token, "collector": collector_address(self.daemon.port)}
        self.calls: list[MigrateCall] = []

    def wait_ready(self, vm: VM, timeout: float = 600.0) -> None:
        """Wait until the freshly booted ``vm``'s agent is attached (under TCG
        on a busy 2-core host its BPF loader takes 50 s to several minutes)."""
        self.daemon.wait_attached(self.VM_NAME, timeout)

    def migrate(self, src: VM, dst: VM, link: LinkRelay, timeout: float) -> Outcome:
        self.daemon.point_qmp(self.VM_NAME, src.aux_qmp)
        source = ""
        try:
            source = str(self.daemon.wait_attached(self.VM_NAME, self.attach_timeout).get("chosen_source", ""))
        except Exception as exc:
            if self.require_attached:
                raise MigrationError(f"agent not attached before the migration: {exc}", {}) from exc
        call = self.daemon.migrate(self.VM_NAME, link.uri, dest_qmp=dst.aux_qmp, timeout=timeout)
        self.calls.append(call)
        if not call.completed:
            raise MigrationError(
                f"fph-collector migrate: exit {call.rc}, stderr {call.stderr.strip()[-800:]!r}", call.report
            )
        wait_incoming(dst, 60)
        info = src.cmd("query-migrate")
        result = MigrationResult(
            status=str(info.get("status")),
            total_time_ms=int(info.get("total-time", 0)),
            downtime_ms=int(info.get("downtime", 0)),
            ram=info.get("ram", {}),
            info=info,
        )
        wall = float(call.report.get("wall_s") or call.wall_s)  # the daemon's own clock, not the CLI's start-up
        return Outcome(result, wall, call.report, source or str(call.report.get("agent_source", "")))

    def close(self) -> None:
        self.daemon.stop()
