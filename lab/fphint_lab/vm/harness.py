"""Real guests under QEMU (KVM where a guest runs on it, else TCG: vmimage.accel)
for end-to-end tests, and migrations between them.

Lifecycle as in qemu.machine's QEMUMachine: a :class:`VM` only records its
configuration until :meth:`VM.launch`; :meth:`VM.shutdown` always cleans up
(QMP ``quit``, then SIGKILL if that does not end QEMU in time) and removes the
RAM file. QEMU also gets PR_SET_PDEATHSIG, so a test runner that dies takes
its guests with it. Every wait has a deadline and notices QEMU exiting.

:class:`VMFactory` is what tests use (through conftest fixtures): it gives
each guest a fresh qcow2 overlay over the cached image and tears down every
VM it made. Migrations: :func:`start_incoming` then :func:`migrate` (which also waits
for the destination to finish loading).

Exceptions::

    VMError
     +-- VMLaunchError     QEMU did not come up (.argv, .exitcode, .output)
     +-- VMDied            QEMU exited while the test still needed it
     +-- AbnormalShutdown  QEMU had to be killed
     +-- MigrationError    migration failed or timed out (.info)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from vmimage.accel import Accel, choose
from vmimage.builder import Image
from vmimage.qemu import Endpoints, GuestConfig, default_binary, qemu_argv, qemu_version

from .. import guest as guest_workloads
from .console import Result, Shell
from .qmp import QMP, QMPError

LOG = logging.getLogger(__name__)

#: Seconds from QEMU start to a working shell. A systemd boot takes about
#: 20 s on an idle host; the margin is for a busy, shared 2-core machine.
BOOT_TIMEOUT = 240.0
#: Where RAM files go: tmpfs, so they cost RAM, and are removed by shutdown().
SHM_DIR = Path("/dev/shm")
#: Unlimited in practice: QEMU 7.2's default of 128 MiB/s would make tests slow.
FAST_BANDWIDTH = 1 << 34
#: The guest's Python; the workloads (fphint_lab/guest/) are installed in its
#: site directory by the image builder, so it runs them with ``-m``.
GUEST_PYTHON = "/usr/bin/python3"
WORKLOAD_PACKAGE = guest_workloads.__name__

#: Kernel log lines that mean the guest is hurt.
KERNEL_TROUBLE = re.compile(
    r"Oops|BUG:|Call Trace|general protection fault|Kernel panic|WARNING: CPU|Bad page|"
    r"page allocation failure|segfault at|Memory failure|corrupt",
    re.IGNORECASE,
)


class VMError(Exception):
    """Base of this module's errors."""


class VMLaunchError(VMError):
    def __init__(self, message: str, argv: list[str], exitcode: int | None, output: str) -> None:
        super().__init__(message)
        self.argv = argv
        self.exitcode = exitcode
        self.output = output

    def __str__(self) -> str:
        return (
            f"{self.args[0]}\nexit code: {self.exitcode}\ncommand: {shlex.join(self.argv)}\n"
            f"output:\n{self.output[-3000:]}"
        )


class VMDied(VMError):
    pass


class AbnormalShutdown(VMError):
    pass


class MigrationError(VMError):
    def __init__(self, message: str, info: Mapping[str, Any]) -> None:
        super().__init__(f"{message}: {json.dumps(info)[:2000]}")
        self.info = info


def _pdeathsig_prefix() -> list[str]:
    """A wrapper that makes the kernel SIGKILL QEMU when the test process dies.

    setpriv(1) sets PR_SET_PDEATHSIG and execs QEMU (same pid); unlike a
    Popen preexec_fn it is safe with the QMP threads running.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def _tail(path: Path, nbytes: int = 3000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - nbytes))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"<{path}: {exc}>"


class VM:
    """One QEMU process running (or about to run) a guest."""

    def __init__(
        self,
        name: str,
        guest: GuestConfig,
        rundir: Path,
        *,
        incoming: bool = False,
        paused: bool = False,
        shm_dir: Path = SHM_DIR,
        binary: str | None = None,
        accel: Accel | None = None,
        extra_args: tuple[str, ...] = (),
        shared_ram: bool = True,
    ) -> None:
        """``shared_ram``: RAM in a shared file that :attr:`ram_path` names
        (for page-by-page comparisons), else anonymous (vmimage Endpoints)."""
        self.name = name
        self.guest = guest
        self.rundir = rundir
        self.binary = binary or default_binary()
        #: The accelerator this VM runs on (a migration's destination must
        #: have the source's: VMFactory.destination passes it on).
        self.accel = accel or choose(self.binary, guest.kernel)
        unique = f"fphvm-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"
        self.endpoints = Endpoints(
            name=name,
            mem_path=shm_dir / f"{unique}.ram",
            qmp=rundir / f"{name}.qmp",
            shell=rundir / f"{name}.shell",
            shell_log=rundir / f"{name}.shell.log",
            console_log=rundir / f"{name}.console.log",
            aux_qmp=rundir / f"{name}.fphint.qmp",
            incoming=incoming,
            paused=paused,
            extra_args=extra_args,
            shared_ram=shared_ram,
        )
        self.qemu_log = rundir / f"{name}.qemu.log"
        self.log = LOG.getChild(name)
        self._proc: subprocess.Popen[bytes] | None = None
        self._logf: IO[bytes] | None = None
        self.qmp = QMP(name)
        self.shell = Shell(self.endpoints.shell, name, alive=self.is_running)

    def __repr__(self) -> str:
        return f"<VM {self.name} pid={self.pid}>"

    # Section: state

    @property
    def ram_path(self) -> Path:
        """The guest RAM file (RAMBlock ``mem``), valid until shutdown()."""
        if not self.endpoints.shared_ram:
            raise VMError(f"{self.name} runs on anonymous RAM: there is no RAM file to read")
        return self.endpoints.mem_path

    @property
    def aux_qmp(self) -> Path:
        """The second QMP monitor's socket (for fphint's collector)."""
        assert self.endpoints.aux_qmp is not None
        return self.endpoints.aux_qmp

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def argv(self) -> list[str]:
        return qemu_argv(self.guest, self.endpoints, self.binary, self.accel)

    @property
    def qemu_version(self) -> str:
        """The version of the QEMU this VM runs, e.g. "10.0.2"."""
        return qemu_version(self.binary)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def check_alive(self) -> None:
        """:raise VMDied: with the logs' tails, if QEMU has exited."""
        if self._proc is not None and self._proc.poll() is not None:
            raise VMDied(f"{self.name}: QEMU exited with status {self._proc.returncode}\n{self.describe()}")

    def describe(self, nbytes: int = 2500) -> str:
        """The tails of this VM's logs, for failure messages."""
        parts = [
            f"== {self.name}: pid {self.pid}, exit {self.exitcode}, QEMU {self.qemu_version} ({self.binary}), "
            f"{self.accel.describe()}, logs in {self.rundir}"
        ]
        for title, path in (
            ("QEMU", self.qemu_log),
            ("console ttyS0", self.endpoints.console_log),
            ("shell ttyS1", self.endpoints.shell_log),
        ):
            parts.append(f"-- {title} ({path.name}):\n{_tail(path, nbytes)}")
        return "\n".join(parts)

    # Section: lifecycle

    def launch(self, timeout: float = 30.0) -> None:
        """Start QEMU and connect QMP and the shell socket (not a booted guest yet)."""
        if self._proc is not None:
            raise VMError(f"{self.name}: already launched")
        argv = self.argv()
        (self.rundir / f"{self.name}.cmdline").write_text(shlex.join(argv) + "\n")
        self.log.info("launching QEMU %s (%s): %s", self.qemu_version, self.accel.describe(), shlex.join(argv))
        self._logf = self.qemu_log.open("wb")
        try:
            self._proc = subprocess.Popen(
                [*_pdeathsig_prefix(), *argv],
                stdin=subprocess.DEVNULL,
                stdout=self._logf,
                stderr=subprocess.STDOUT,
                close_fds=True,
            )
        except OSError as exc:
            self._post_shutdown()
            raise VMLaunchError(f"{self.name}: cannot start QEMU: {exc}", argv, None, "") from exc
        try:
            self.qmp.connect(self.endpoints.qmp, timeout, alive=self.is_running)
            self.shell.connect(timeout)
        except Exception as exc:
            self._kill()
            output = _tail(self.qemu_log)
            code = self.exitcode
            self._post_shutdown()
            raise VMLaunchError(f"{self.name}: QEMU did not come up: {exc}", argv, code, output) from exc

    def wait_booted(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait for the guest's shell; return seconds since this call."""
        seconds = self.shell.wait_ready(timeout)
        self.log.info("shell ready after %.1f s", seconds)
        return seconds

    def shutdown(self, hard: bool = False, timeout: float = 30.0) -> None:
        """Stop QEMU and clean up; QMP ``quit`` first unless ``hard``.

        :raise AbnormalShutdown: the soft path failed and QEMU had to be killed.
        """
        if self._proc is None:
            self._post_shutdown()
            return
        soft_error: Exception | None = None
        try:
            if self._proc.poll() is None and not hard:
                try:
                    self.qmp.cmd("quit", timeout=timeout)
                except QMPError as exc:  # quit may close the socket before answering
                    self.log.debug("quit: %s", exc)
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired as exc:
                    soft_error = exc
            if self._proc.poll() is None:
                self._kill()
        finally:
            self._post_shutdown()
        if soft_error is not None:
            raise AbnormalShutdown(f"{self.name}: QEMU ignored quit for {timeout:.0f} s and was killed") from soft_error

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                self.log.error("QEMU pid %d survived SIGKILL for 60 s", self._proc.pid)

    def _post_shutdown(self) -> None:
        self.qmp.close()
        self.shell.close()
        if self._logf is not None:
            self._logf.close()
            self._logf = None
        try:
            self.endpoints.mem_path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(hard=exc[0] is not None)

    # Section: conveniences

    def cmd(self, name: str, args: Mapping[str, object] | None = None, timeout: float = 30.0) -> Any:
        """A QMP command (see qmp.QMP.cmd)."""
        self.check_alive()
        return self.qmp.cmd(name, args, timeout)

    def run(self, cmd: str, timeout: float = 60.0, check: bool = True) -> Result:
        """A shell command in the guest (see console.Shell.run)."""
        self.check_alive()
        return self.shell.run(cmd, timeout=timeout, check=check)

    def output(self, cmd: str, timeout: float = 60.0) -> str:
        return self.run(cmd, timeout=timeout).output.strip()

    def json(self, cmd: str, timeout: float = 60.0, check: bool = True) -> Any:
        """Run a command whose last output line is JSON; return it parsed."""
        result = self.run(cmd, timeout=timeout, check=check)
        lines = result.output.strip().splitlines()
        if not lines:
            raise VMError(f"{self.name}: {cmd!r} printed nothing (exit {result.rc})")
        return json.loads(lines[-1])

    def workload(self, script: str, *args: str, timeout: float = 120.0, check: bool = True) -> Any:
        """Run the workload ``script`` ("fill.py" or "fill": fphint_lab/guest/fill.py) in
        the guest; return its JSON answer."""
        argv = [GUEST_PYTHON, "-m", f"{WORKLOAD_PACKAGE}.{script.removesuffix('.py')}", *args]
        return self.json(shlex.join(argv), timeout=timeout, check=check)

    def status(self) -> str:
        """The QEMU run state ("running", "paused", "postmigrate", "inmigrate", ...)."""
        return str(self.cmd("query-status")["status"])

    def boot_id(self) -> str:
        return self.output("cat /proc/sys/kernel/random/boot_id")

    def kernel_trouble(self) -> list[str]:
        """Kernel log lines that suggest the guest is hurt (oops, BUG, bad page...)."""
        log = self.run("dmesg --notime", timeout=60).output
        return [line for line in log.splitlines() if KERNEL_TROUBLE.search(line)]


def remove_stale_ram_files(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Delete RAM files left by test processes that died (SIGKILL, OOM).

    A file's name carries the pid of the test process that made it, so files
    of concurrent test sessions (other worktrees) are left alone.
    """
    removed = []
    for path in shm_dir.glob("fphvm-*-*-*.ram"):
        pid = path.name.split("-")[1]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


class VMFactory:
    """Makes VMs from one image in one run directory and tears them all down."""

    def __init__(
        self, image: Image, rundir: Path, accel: Accel | None = None, *, shared_destination_ram: bool = True
    ) -> None:
        """``shared_destination_ram``: destinations keep their RAM in a shared
        file (tests compare it with the source's); False gives them anonymous
        RAM, as deployments run, for benchmarks that compare nothing there:
        the lab's tmpfs file makes each ZERO record cost the destination a page
        allocation (docs/e2e.md), which inflates the downtime of every scenario
        that sends many of them."""
        self.image = image
        self.rundir = rundir
        self.shared_destination_ram = shared_destination_ram
        self.vms: list[VM] = []
        self._disks = 0
        self._accel = accel

    @property
    def accel(self) -> Accel:
        """The accelerator of this factory's guests (decided once, on first use)."""
        if self._accel is None:
            self._accel = choose(default_binary(), self.image.kernel)
        return self._accel

    def overlay(self) -> Path:
        """A fresh qcow2 overlay over the cached image (which stays clean)."""
        self._disks += 1
        path = self.rundir / f"disk{self._disks}.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.image.disk), str(path)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return path

    def guest(self, **kw: Any) -> GuestConfig:
        """A guest config of this image with its own overlay; ``kw`` overrides fields."""
        return GuestConfig(kernel=self.image.kernel, initrd=self.image.initrd, disk=self.overlay(), **kw)

    def vm(self, name: str, guest: GuestConfig, **kw: Any) -> VM:
        if any(v.name == name for v in self.vms):
            raise VMError(f"a VM named {name!r} already exists in this test")
        if "accel" not in kw and kw.get("binary") in (None, default_binary()):
            kw["accel"] = self.accel
        vm = VM(name, guest, self.rundir, **kw)
        self.vms.append(vm)
        return vm

    def boot(self, name: str = "src", guest: GuestConfig | None = None, timeout: float = BOOT_TIMEOUT, **kw: Any) -> VM:
        """Launch a guest and wait for its shell. ``kw`` go to :meth:`guest`."""
        vm = self.vm(name, guest or self.guest(**kw))
        vm.launch()
        vm.wait_booted(timeout)
        return vm

    def destination(self, src: VM, name: str = "dst", paused: bool = True, **guest_changes: Any) -> VM:
        """Launch a migration destination for ``src`` (same guest, ``-incoming defer``).

        :param paused: keep the destination's CPUs stopped after the migration
            (``-S``) so its RAM file can be compared before it runs.
        """
        guest = replace(src.guest, **guest_changes) if guest_changes else src.guest
        vm = self.vm(
            name,
            guest,
            incoming=True,
            paused=paused,
            binary=src.binary,
            accel=src.accel,
            shared_ram=self.shared_destination_ram,
        )
        vm.launch()
        return vm

    def shutdown_all(self) -> list[Exception]:
        """Shut every VM down (newest first); return the errors instead of raising."""
        errors: list[Exception] = []
        for vm in reversed(self.vms):
            try:
                vm.shutdown()
            except Exception as exc:  # keep tearing down the others
                errors.append(exc)
        return errors


# Section: migration


@dataclass(frozen=True)
class MigrationResult:
    """The source's ``query-migrate`` after completion, with the useful parts named."""

    status: str
    total_time_ms: int
    downtime_ms: int
    #: ``ram`` member: transferred, normal, duplicate, dirty-sync-count, ...
    ram: Mapping[str, Any]
    info: Mapping[str, Any]


def start_incoming(dst: VM, uri: str = "tcp:127.0.0.1:0", timeout: float = 10.0) -> str:
    """Make ``dst`` listen and return the URI the source must use.

    Port 0 lets the kernel choose; QEMU reports the real port in
    ``query-migrate``'s ``socket-address``.
    """
    dst.cmd("migrate-incoming", {"uri": uri})
    if not uri.startswith("tcp:") or not uri.endswith(":0"):
        return uri
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = dst.cmd("query-migrate")
        for addr in info.get("socket-address", []):
            if addr.get("type") == "inet" and int(addr.get("port", 0)):
                return f"tcp:{addr['host']}:{addr['port']}"
        time.sleep(0.05)
    raise MigrationError(f"{dst.name}: no listening address after migrate-incoming", dst.cmd("query-migrate"))


def migrate(
    src: VM,
    uri: str,
    *,
    dst: VM | None = None,
    max_bandwidth: int = FAST_BANDWIDTH,
    parameters: Mapping[str, object] | None = None,
    capabilities: Mapping[str, bool] | None = None,
    timeout: float = 180.0,
    poll: float = 0.05,
) -> MigrationResult:
    """Migrate ``src`` to ``uri`` and wait for the end.

    Polls ``query-migrate`` (as QEMU's own migration tests do) under a deadline;
    on timeout the migration is cancelled. Fails fast if either QEMU exits.

    :raise MigrationError: failed, cancelled or timed out (the source keeps running).
    """
    if capabilities:
        src.cmd(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": v} for k, v in capabilities.items()]},
        )
    src.cmd("migrate-set-parameters", {"max-bandwidth": max_bandwidth, **(parameters or {})})
    src.cmd("migrate", {"uri": uri})
    deadline = time.monotonic() + timeout
    while True:
        info = src.cmd("query-migrate")
        status = info.get("status")
        if status == "completed":
            break
        if status in ("failed", "cancelled"):
            raise MigrationError(f"migration {src.name} -> {uri} {status}", info)
        if dst is not None:
            dst.check_alive()
        if time.monotonic() > deadline:
            try:
                src.cmd("migrate_cancel")
            except QMPError as exc:
                LOG.warning("migrate_cancel: %s", exc)
            raise MigrationError(f"migration {src.name} -> {uri} not done after {timeout:.0f} s", info)
        time.sleep(poll)
    if dst is not None:
        wait_incoming(dst, max(5.0, deadline - time.monotonic()), poll)
    return MigrationResult(
        status=status,
        total_time_ms=int(info.get("total-time", 0)),
        downtime_ms=int(info.get("downtime", 0)),
        ram=info.get("ram", {}),
        info=info,
    )


def wait_incoming(dst: VM, timeout: float, poll: float = 0.05) -> None:
    """Wait until the destination has loaded everything.

    The source reports "completed" once it has *sent* the last bytes; the
    destination may still be loading device state ("inmigrate") for a while.
    """
    deadline = time.monotonic() + timeout
    while True:
        info = dst.cmd("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise MigrationError(f"incoming migration on {dst.name} {status}", info)
        if time.monotonic() > deadline:
            raise MigrationError(f"incoming migration on {dst.name} not done after {timeout:.0f} s", info)
        time.sleep(poll)
