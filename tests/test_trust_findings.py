"""The four findings of the untrusted-input review (issue 9), each as a test
that failed on the code before the fix: a forged vsock peer name on a Unix
listener, health Watch streams starving every VM, a refusal flood flooding
the log, and the ``info mtree`` parser's blow-up. They use only behaviour
(config, gRPC, the admin socket, the parser's functions), so they run
against any version of the collector."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fphint import ranges
from fphint.v1 import hints_pb2, hints_pb2_grpc
from tests.adversary import GOOD_PAGES, bearer, channels, daemon_and_agent, forged_abstract_relay, raw_attach, token

pytestmark = pytest.mark.slow


def test_a_forged_vsock_peer_name_on_a_unix_listener_is_nobody(tmp_path: Path) -> None:
    """A client of the unix: listener binds the abstract name the old vsock
    bridge used for CID 7 and calls without a token: it must not become VM
    "good" (CID 7), must not displace good's agent, and must not reach its epochs."""
    with daemon_and_agent(tmp_path, vms={"good": {"vsock_cid": 7}}) as d:
        legit_peer = d.peer_of("good")

        async def forge() -> None:
            server, target = await forged_abstract_relay(d.unix, "fphint-vsock-peer/7/4242-0")
            try:
                async with grpc.aio.insecure_channel(target) as ch:
                    call = await raw_attach(ch, None)
                    try:
                        initial = tuple(await asyncio.wait_for(call.initial_metadata(), 5))
                        msg = await asyncio.wait_for(call.read(), 5)
                    except grpc.aio.AioRpcError as e:
                        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                        return
                    # Still here: the collector took the forger for a VM. Try to use that.
                    assert ("fphint-vm", "good") not in initial, "a forged peer name was taken as VM good"
                    raise AssertionError(f"the forger got {msg!r}")
            finally:
                server.close()

        asyncio.run(asyncio.wait_for(forge(), 30))
        assert d.peer_of("good") == legit_peer  # not displaced
        assert d.hints("good").free_pages == GOOD_PAGES  # its own pages, nobody else's


def test_forged_pages_never_reach_an_epoch(tmp_path: Path) -> None:
    """Even while an epoch of VM "good" is open, a forger on the unix listener
    cannot report into it."""
    with daemon_and_agent(tmp_path, vms={"good": {"vsock_cid": 7}}) as d:
        import threading

        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.update(r=d.hints("good", 3000)))
        t.start()

        async def forge() -> grpc.StatusCode:
            server, target = await forged_abstract_relay(d.unix, "fphint-vsock-peer/7/4242-1")
            try:
                async with grpc.aio.insecure_channel(target) as ch:
                    stub = hints_pb2_grpc.FreePageHintsStub(ch)
                    best = grpc.StatusCode.OK
                    for ep in range(1, 4):  # epoch ids are not secret: try a few and the real one
                        chunk = hints_pb2.ReportChunk(
                            epoch=ep,
                            kind=hints_pb2.REPORT_KIND_SNAPSHOT,
                            end=True,
                            ranges=ranges.encode([(1 << 30, 64 << 20)]),
                        )
                        try:
                            await stub.Report(iter([chunk]), timeout=5)
                        except grpc.aio.AioRpcError as e:
                            best = e.code()
                    return best
            finally:
                server.close()

        code = asyncio.run(asyncio.wait_for(forge(), 30))
        t.join(20)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        r = out["r"]
        assert r.free_pages == GOOD_PAGES


def test_health_watch_streams_do_not_starve_agents(tmp_path: Path) -> None:
    """Unauthenticated Watch streams as many as a server-wide call limit: the
    legitimate agent must still be served, and a new Attach still accepted."""
    limit = 128
    with daemon_and_agent(tmp_path, collector={"max_concurrent_rpcs": limit}) as d:

        async def flood() -> tuple[bool, grpc.StatusCode, int]:
            async with channels(d.target, limit // 16) as chans:
                calls = [
                    health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
                    for ch in chans
                    for _ in range(16)
                ]
                refused = 0
                for c in calls:
                    try:
                        await asyncio.wait_for(c.read(), 2)
                    except (TimeoutError, grpc.aio.AioRpcError):
                        refused += 1
                served = await asyncio.to_thread(d.served)
                async with grpc.aio.insecure_channel(d.target) as ch:
                    att = await raw_attach(ch, token("bad"))
                    try:
                        initial = tuple(await asyncio.wait_for(att.initial_metadata(), 5))
                        code = grpc.StatusCode.OK if ("fphint-vm", "bad") in initial else await att.code()
                    except TimeoutError:
                        code = grpc.StatusCode.DEADLINE_EXCEEDED
                    except grpc.aio.AioRpcError as e:
                        code = e.code()
                    att.cancel()
                for c in calls:
                    c.cancel()
                return served, code, refused

        served, code, refused = asyncio.run(asyncio.wait_for(flood(), 60))
        assert served, "the legitimate agent got no hints while Watch streams were open"
        assert code == grpc.StatusCode.OK, code
        assert refused > 0  # the Watch budget, not the agents', ran out


def test_a_refusal_flood_does_not_flood_the_log(tmp_path: Path) -> None:
    """Thousands of refused calls: every one counted in the metrics, a bounded
    number of log lines."""
    with daemon_and_agent(tmp_path) as d:
        before = len(d.log_lines())

        async def flood() -> int:
            n = 0
            async with channels(d.target, 4) as chans:
                stubs = [hints_pb2_grpc.FreePageHintsStub(ch) for ch in chans]
                end = time.monotonic() + 4
                while time.monotonic() < end:
                    codes = await asyncio.gather(
                        *(_refused(stub, tok) for stub in stubs for tok in (None, "wrong-token-0123456789abcdef"))
                    )
                    assert all(c == grpc.StatusCode.UNAUTHENTICATED for c in codes), codes
                    n += len(codes)
            return n

        n = asyncio.run(asyncio.wait_for(flood(), 60))
        assert d.served()
        lines = d.log_lines()[before:]
        refusals = [ln for ln in lines if "refused" in ln]
        assert n > 1000, n
        assert len(lines) < 60, f"{len(lines)} log lines for {n} refused calls"
        metrics = d.metrics()
        counted = sum(
            float(ln.rsplit(" ", 1)[1])
            for ln in metrics.splitlines()
            if ln.startswith('fphint_rejects_total{reason="unknown_token"')
        )
        assert counted >= n, (counted, n)
        assert refusals  # the first ones are still logged
        left_out = sum(
            float(ln.rsplit(" ", 1)[1])
            for ln in metrics.splitlines()
            if ln.startswith("fphint_log_lines_suppressed_total{")
        )
        assert left_out >= n - len(refusals), (left_out, n)


async def _refused(stub: hints_pb2_grpc.FreePageHintsStub, tok: str | None) -> grpc.StatusCode:
    try:
        await stub.Report(iter([]), metadata=bearer(tok), timeout=5)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# -- the info mtree parser -------------------------------------------------------------


def _fan_out_mtree(fan: int, depth: int) -> str:
    """Aliases fanning out: region r<k> holds ``fan`` aliases of r<k+1>."""
    span = "0000000000000000-0000000000000fff"
    lines = ["address-space: memory", f"  {span} (prio 0, i/o): system"]
    lines += [f"    {span} (prio 0, ram): alias s{j} @r0 {span}" for j in range(fan)]
    for k in range(depth):
        lines += ["", f"memory-region: r{k}", f"  {span} (prio 0, i/o): r{k}"]
        lines += [f"    {span} (prio 0, ram): alias a{k}.{j} @r{k + 1} {span}" for j in range(fan)]
    lines += ["", f"memory-region: r{depth}", f"  {span} (prio 0, ram): r{depth}"]
    return "\n".join(lines) + "\n"


def _deep_mtree(levels: int) -> str:
    span = "0000000000000000-0000000000000fff"
    lines = ["address-space: memory"]
    lines += [f"{'  ' * (i + 1)}{span} (prio 0, i/o): r{i}" for i in range(levels)]
    return "\n".join(lines) + "\n"


_PROBE = """
import json, sys, time
from host_collector.qmp.mtree import map_ram, parse_mtree
text = sys.stdin.read()
t0 = time.monotonic()
try:
    map_ram(parse_mtree(text))
    out = "ok"
except Exception as e:
    out = type(e).__name__
print(json.dumps({"result": out, "s": time.monotonic() - t0}))
"""


def _probe(text: str, timeout: float = 10) -> dict[str, object]:
    """Parse in a child process, so a parser that never ends cannot hang the suite."""
    try:
        p = subprocess.run(
            [sys.executable, "-c", _PROBE],
            input=text,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=Path(__file__).resolve().parent.parent,
        )
    except subprocess.TimeoutExpired:
        return {"result": "timeout", "s": timeout}
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def test_mtree_aliases_fanning_out_take_bounded_time() -> None:
    text = _fan_out_mtree(fan=3, depth=15)
    assert len(text.splitlines()) < 120
    r = _probe(text)
    assert r["result"] in ("ok", "MtreeError"), r
    assert float(str(r["s"])) < 2.0, r


def test_mtree_nested_a_thousand_deep_is_an_mtree_error() -> None:
    r = _probe(_deep_mtree(1000))
    assert r["result"] == "MtreeError", r
