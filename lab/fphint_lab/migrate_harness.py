"""`fph-collector serve` as a real process, a fake agent that attaches to it,
and `fph-collector migrate`/`proxy` run through the command-line entry point.

The agent is the real :class:`guest_agent.agent.Agent` on its own asyncio loop
in a thread of the test process, with a test source (fixed ranges, or one
that never finishes a scan). QEMU comes from :mod:`fphint_lab.qemu_pair`, with a
second QMP monitor for the collector (``Vm.extra_args``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from fphint import addresses
from fphint.v1 import admin_pb2, admin_pb2_grpc
from guest_agent.agent import Agent, Endpoint, Settings
from guest_agent.facts import GuestSafety, build_facts
from guest_agent.sources.base import FreePageSource, Part, Probe, WholeScan

from .collector_harness import FixedSource, token
from .qemu_pair import PAGE, Machine, Vm, free_port

PY = sys.executable
QEMU10 = "/var/cache/fphint/qemu-10.0/bin/qemu-system-x86_64"


class StallingSource(FreePageSource):
    """An agent's source whose scan never finishes in time (until the test ends)."""

    name = "stalling"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def probe(self) -> Probe:
        return Probe(self.name, True)

    def parts(self, deadline: float | None = None) -> Iterator[Part]:
        self.calls += 1
        self.release.wait(60)
        yield WholeScan([], 0)


class Daemon:
    """``fph-collector serve`` with a registry of VMs whose QMP sockets live in ``self.dir``."""

    def __init__(self, vms: Sequence[str], *, no_qmp: Sequence[str] = (), log_dir: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fph-migrate-", dir="/tmp"))  # short: unix socket paths
        self.port = free_port()
        self.admin = f"unix:{self.dir}/admin.sock"
        lines = [
            "[collector]",
            f'listen = ["tcp:127.0.0.1:{self.port}"]',
            f'admin = "{self.admin}"',
            "retained_epochs = 64",
            "",
        ]
        for vm in [*vms, *no_qmp]:
            lines += ["[[vm]]", f'name = "{vm}"', f'token = "{token(vm)}"']
            if vm in vms:
                lines.append(f'qmp = "unix:{self.qmp(vm)}"')
            lines.append("")
        self.config = self.dir / "collector.toml"
        self.config.write_text("\n".join(lines))
        self.log = (log_dir or self.dir) / "collector.log"  # log_dir: kept after the test
        self.proc: subprocess.Popen[bytes] | None = None

    def qmp(self, vm: str) -> Path:
        return self.dir / f"{vm}.fphint.qmp"

    def qmp_args(self, vm: str) -> list[str]:
        """What the VM's QEMU needs: a monitor for the collector alone."""
        return ["-qmp", f"unix:{self.qmp(vm)},server=on,wait=off"]

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "host_collector", "-v", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        end = time.monotonic() + 30
        while True:
            try:
                self.list_vms()
                return
            except grpc.RpcError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"collector did not start:\n{self.log_text()}") from None
                time.sleep(0.1)

    def stub(self) -> tuple[grpc.Channel, admin_pb2_grpc.CollectorAdminStub]:
        ch = grpc.insecure_channel(addresses.parse(self.admin).grpc_target())
        return ch, admin_pb2_grpc.CollectorAdminStub(ch)

    def list_vms(self) -> dict[str, admin_pb2.VMInfo]:
        ch, stub = self.stub()
        with ch:
            return {v.name: v for v in stub.ListVMs(admin_pb2.ListVMsRequest(), timeout=2).vms}

    def wait_attached(self, vm: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while not self.list_vms()[vm].attached:
            if time.monotonic() > end:
                raise AssertionError(f"agent of {vm} not attached:\n{self.log_text()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def cli(self, *args: str) -> list[str]:
        return [PY, "-m", "host_collector", *args[:1], *args[1:], "--admin", self.admin]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """An ``fph-collector`` subcommand against this daemon, to completion."""
        return subprocess.run(
            self.cli(*args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
        )


def report_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON report `--json` printed (its last stdout line)."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines, f"no report: rc={proc.returncode}\nstderr: {proc.stderr}"
    report: dict[str, Any] = json.loads(lines[-1])
    return report


class AgentThread:
    """A real Agent with a test source, attached to ``daemon`` as ``vm``, on its own loop."""

    def __init__(self, daemon: Daemon, vm: str, source: FreePageSource) -> None:
        self.loop = asyncio.new_event_loop()
        self.source = source
        facts = build_facts(GuestSafety(), [], source.name, "")
        addr = addresses.parse(f"tcp:127.0.0.1:{daemon.port}")
        self.agent = Agent(
            source, facts, lambda: Endpoint(addr, token(vm)), Settings(backoff_initial_s=0.05, backoff_max_s=0.5)
        )
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._main, name=f"agent-{vm}", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.agent.run(self._stop))

    def close(self) -> None:
        if isinstance(self.source, StallingSource):
            self.source.release.set()
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


def fixed_agent(daemon: Daemon, vm: str, spans: Sequence[tuple[int, int]]) -> AgentThread:
    """An agent answering every request with these guest-physical [start, end) spans."""
    return AgentThread(daemon, vm, FixedSource([(a, b - a) for a, b in spans]))


def source_vm(
    daemon: Daemon,
    vm: str,
    machine: Machine,
    workdir: Path,
    *,
    running: bool = False,
    boot: Path | None = None,
    qemu: str | None = None,
    ram_dir: Path | None = None,
) -> Vm:
    kw: dict[str, Any] = {"qemu": qemu} if qemu else {}
    return Vm(
        machine,
        workdir,
        "src",
        incoming=False,
        running=running,
        boot=boot,
        ram_dir=ram_dir,
        extra_args=daemon.qmp_args(vm),
        **kw,
    )


def dest_vm(
    machine: Machine,
    workdir: Path,
    *,
    boot: Path | None = None,
    qemu: str | None = None,
    ram_dir: Path | None = None,
    extra_args: Sequence[str] = (),
) -> Vm:
    kw: dict[str, Any] = {"qemu": qemu} if qemu else {}
    return Vm(machine, workdir, "dst", incoming=True, boot=boot, ram_dir=ram_dir, extra_args=list(extra_args), **kw)


def pages_in(spans: Sequence[tuple[int, int]]) -> set[int]:
    """Page numbers (GPA // PAGE) of [start, end) spans."""
    return {p for a, b in spans for p in range(a // PAGE, b // PAGE)}


def has_qemu10() -> bool:
    return os.access(QEMU10, os.X_OK)
