"""A real collector daemon in its own process, a real agent in another, and the
tools to attack the daemon from this one (the adversarial gRPC suite).

The collector runs as ``python -m host_collector serve`` so its memory (RSS)
and its log are its own; the legitimate agent is the real ``Agent`` with a
fixed source, also in its own process (``python -m tests.adversary agent``),
so the attack traffic from the test process cannot slow it down. Whether the
legitimate VM is still served is asked over the admin socket, the way an
operator would: CollectHints must return every page its agent reports.

Only options the collector had before the trust work are written into the
configuration, so these tests also run against older code (that is how each
finding's test was shown to fail before its fix).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from fphint.v1 import admin_pb2, admin_pb2_grpc, hints_pb2, hints_pb2_grpc

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
MiB = 1 << 20
#: What the legitimate agent reports (byte ranges inside the registry layout below).
GOOD = [(0x100000, 64 * MiB), (512 * MiB, 4096), (4 * GiB, 8 * MiB)]
GOOD_PAGES = sum(n // 4096 for _, n in GOOD)


def token(name: str) -> str:
    return f"adversary-token-{name}-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """``fph-collector serve`` with VMs ``names`` on TCP, a unix socket and an admin socket."""

    def __init__(
        self,
        work: Path,
        names: Sequence[str],
        collector: dict[str, Any] | None = None,
        vms: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.work = work
        self.port = free_port()
        self.metrics_port = free_port()
        self.unix = str(work / "agents.sock")
        self.admin_path = str(work / "admin.sock")
        self.log_path = work / "collector.log"
        lines = [
            "[collector]",
            f'listen = ["tcp:127.0.0.1:{self.port}", "unix:{self.unix}"]',
            f'admin = "unix:{self.admin_path}"',
            f'metrics = "127.0.0.1:{self.metrics_port}"',
        ]
        for k, v in (collector or {}).items():
            lines.append(f"{k} = {json.dumps(v)}")
        for n in names:
            lines += ["", "[[vm]]", f'name = "{n}"', f'token = "{token(n)}"']
            for k, v in (vms or {}).get(n, {}).items():
                lines.append(f"{k} = {json.dumps(v)}")
            lines += [
                'ram = [{ gpa = 0, size = 0x80000000, block = "pc.ram", offset = 0 },',
                '       { gpa = 0x100000000, size = 0x40000000, block = "pc.ram", offset = 0x80000000 }]',
            ]
        self.config = work / "collector.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "host_collector", "--log-format", "json", "serve", "--config", str(self.config)],
            stderr=open(self.log_path, "ab"),
            cwd=ROOT,
        )
        end = time.monotonic() + 30
        while not (os.path.exists(self.admin_path) and self._tcp_up()):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"collector did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def _tcp_up(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss(self) -> int:
        """The daemon's resident memory in bytes."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def admin(self) -> admin_pb2_grpc.CollectorAdminStub:
        return admin_pb2_grpc.CollectorAdminStub(grpc.insecure_channel(f"unix:{self.admin_path}"))

    def attached(self, vm: str) -> bool:
        vms = self.admin().ListVMs(admin_pb2.ListVMsRequest(), timeout=5).vms
        return any(v.name == vm and v.attached for v in vms)

    def peer_of(self, vm: str) -> str:
        vms = self.admin().ListVMs(admin_pb2.ListVMsRequest(), timeout=5).vms
        return str(next(v.peer for v in vms if v.name == vm))

    def wait_attached(self, vm: str, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while not self.attached(vm):
            if time.monotonic() > end:
                raise AssertionError(f"{vm} not attached after {timeout}s")
            time.sleep(0.05)

    def hints(self, vm: str, deadline_ms: int = 3000) -> admin_pb2.CollectHintsResponse:
        req = admin_pb2.CollectHintsRequest(vm=vm, deadline_ms=deadline_ms, close_on_snapshot=True)
        resp: admin_pb2.CollectHintsResponse = self.admin().CollectHints(req, timeout=deadline_ms / 1000 + 10)
        return resp

    def served(self, vm: str = "good", deadline_ms: int = 3000) -> bool:
        """The VM's agent answered a fresh request with every page it has."""
        try:
            return self.hints(vm, deadline_ms).free_pages == GOOD_PAGES
        except grpc.RpcError:
            return False

    def metrics(self) -> str:
        import urllib.request

        return str(urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode())


class AgentProcess:
    """The real Agent with a fixed source, in its own process."""

    def __init__(self, work: Path, target: str, vm: str, name: str = "agent") -> None:
        self.log = work / f"{name}.log"
        self.proc = subprocess.Popen(
            [PY, "-m", "tests.adversary", "agent", target, token(vm)], stderr=open(self.log, "ab"), cwd=ROOT
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def daemon_and_agent(work: Path, names: Sequence[str] = ("good", "bad"), **kw: Any) -> Iterator[Daemon]:
    """A running daemon with the legitimate agent of VM "good" attached over TCP."""
    d = Daemon(work, names, **kw)
    d.start()
    agent = AgentProcess(work, f"tcp:{d.target}", "good")
    try:
        d.wait_attached("good")
        assert d.served(), "the legitimate agent is not served before any attack"
        yield d
    finally:
        agent.stop()
        d.stop()


def bearer(tok: str | None) -> tuple[tuple[str, str], ...]:
    return () if tok is None else (("authorization", f"Bearer {tok}"),)


async def forged_abstract_relay(target_path: str, name: str) -> tuple[asyncio.AbstractServer, str]:
    """A local relay whose upstream connections to ``target_path`` come from a
    socket bound to the abstract name ``name`` (what a forger controls)."""
    from fphint import vsock

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.bind("\0" + name)
        up.setblocking(False)
        await asyncio.get_running_loop().sock_connect(up, target_path)
        await vsock.relay((reader, writer), await asyncio.open_unix_connection(sock=up))

    front = f"fphint-test-forger/{os.getpid()}/{time.monotonic_ns()}"
    server = await asyncio.start_unix_server(handle, "\0" + front)
    return server, f"unix-abstract:{front}"


async def raw_attach(channel: grpc.aio.Channel, tok: str | None) -> Any:
    """An Attach call; its initial metadata says which VM the collector took it for."""
    return hints_pb2_grpc.FreePageHintsStub(channel).Attach(
        hints_pb2.AttachRequest(facts=hints_pb2.AgentFacts(chosen_source="forged")), metadata=bearer(tok)
    )


async def call_code(coro: Any) -> grpc.StatusCode:
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


#: What a client streaming into a call the server has just ended may see
#: instead of the server's status: its own next send fails in gRPC's core.
LOCAL_SEND_FAILURE = "SendMessageOperation"


async def ended_by_server(coro: Any) -> str:
    """The server's status code name, or "send refused" when the client's
    next write lost the race with the server's end of the call (then the
    server's status never reaches the client: both mean the call was ended)."""
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        # gRPC says "Internal error from Core" and names the failed operation
        # in its debug string.
        if e.code() is grpc.StatusCode.INTERNAL and LOCAL_SEND_FAILURE in (e.debug_error_string() or ""):
            return "send refused"
        return str(e.code().name)
    return "OK"


# -- the legitimate agent's process --------------------------------------------------


async def _run_agent(target: str, tok: str) -> None:
    import signal

    from fphint import addresses
    from fphint_lab.collector_harness import FixedSource
    from guest_agent.agent import Agent, Endpoint, Settings
    from guest_agent.facts import GuestSafety, build_facts

    src = FixedSource(GOOD)
    facts = build_facts(GuestSafety(), [], src.name, "")
    agent = Agent(
        src, facts, lambda: Endpoint(addresses.parse(target), tok), Settings(backoff_initial_s=0.05, backoff_max_s=0.5)
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await agent.run(stop)


@contextlib.asynccontextmanager
async def channels(target: str, n: int) -> AsyncIterator[list[grpc.aio.Channel]]:
    """``n`` channels that each keep their own connection."""
    chans = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)])
        for _ in range(n)
    ]
    try:
        yield chans
    finally:
        for ch in chans:
            await ch.close(None)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("agent")
    a.add_argument("target")
    a.add_argument("token")
    args = ap.parse_args()
    if args.cmd == "agent":
        asyncio.run(_run_agent(args.target, args.token))


if __name__ == "__main__":
    main()
