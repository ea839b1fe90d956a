"""A test-only guest agent that misbehaves on purpose (never install it for real).

It is the real agent (guest_agent.agent.Agent, the real gRPC client, the
token and collector address found as fph-agent finds them) with one thing
changed, chosen by MODE:

* ``lie --pid PID [--addr A --len L]``: reports the real free pages (from
  /proc/kpageflags, in one part) *plus* the physical pages process PID is using (its whole
  address space, or [A, A+L)), read from /proc/PID/pagemap right before each
  report, since khugepaged and compaction move pages. A migration that
  trusts it corrupts that process: the end-to-end tests must see the
  process's own verification fail.
* ``silent``: attaches and never answers a hint request.
* ``late --delay S``: answers each request S seconds *after* its deadline
  (the real agent never sends late; this one sends anyway).

Run it with the agent's interpreter after stopping the real agent
(``systemctl stop fph-agent``), in the background; it logs to stderr and
writes a JSON line per request it saw to --log (default
/run/fphint-rogue.jsonl).

Run as ``/opt/fphint/bin/python -m fphint_lab.guest.rogue_agent``.

usage: rogue_agent.py [--log FILE] lie --pid PID [--addr A --len L] | silent | late [--delay S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from fphint import addresses
from fphint.v1 import hints_pb2, hints_pb2_grpc
from guest_agent import discovery
from guest_agent.agent import Agent, Endpoint, Settings
from guest_agent.facts import build_facts, detect_safety
from guest_agent.sources.base import WholeScan, join_parts
from guest_agent.sources.kpageflags import KpageflagsSource

from . import pagemap

LOG = logging.getLogger("rogue_agent")
PAGE = 4096


def union(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping (start, length) byte ranges covering both inputs."""
    out: list[tuple[int, int]] = []
    for start, length in sorted([*a, *b]):
        if out and start <= out[-1][0] + out[-1][1]:
            prev_start, prev_len = out[-1]
            out[-1] = (prev_start, max(prev_len, start + length - prev_start))
        else:
            out.append((start, length))
    return out


class LyingSource(KpageflagsSource):
    """Real free pages, plus the pages a live process uses."""

    name = "kpageflags"  # what it pretends to be

    def __init__(self, pid: int, addr: int | None, length: int | None, journal: Path) -> None:
        super().__init__()
        self.pid = pid
        self.span = (addr, addr + length) if addr is not None and length is not None else None
        self.journal = journal

    def victim_ranges(self) -> list[tuple[int, int]]:
        spans = [self.span] if self.span else pagemap.mappings(self.pid)
        pfns: list[int] = []
        for lo, hi in spans:
            pfns += [p for p in pagemap.pfns(self.pid, lo, hi) if p is not None]
        return [(a, n) for a, n in pagemap.merge(pfns)]

    def parts(self, deadline: float | None = None) -> Iterator[WholeScan]:
        # One part: the agent encodes ranges in ascending order across parts.
        real, real_pages = join_parts(super().parts(deadline))
        victim = self.victim_ranges()
        lied = union(real, victim)
        _note(
            self.journal,
            {
                "mode": "lie",
                "real_pages": real_pages,
                "victim_pages": sum(n for _, n in victim) // PAGE,
                "victim_ranges": victim[:64],
            },
        )
        yield WholeScan(lied, sum(n for _, n in lied) // PAGE)


class SilentAgent(Agent):
    """Attaches, receives every request, never answers one."""

    def __init__(self, *args: object, journal: Path, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.journal = journal

    async def _answer(
        self,
        stub: hints_pb2_grpc.FreePageHintsStub,
        req: hints_pb2.HintRequest,
        md: tuple[tuple[str, str], ...],
        received: float,
    ) -> None:
        _note(self.journal, {"mode": "silent", "epoch": req.epoch})


class LateAgent(Agent):
    """Answers each request ``delay`` seconds after its deadline.

    The real agent drops a request when the collector closes its epoch or a
    newer one arrives; this one keeps every answer in a task of its own, so
    the report really goes out late.
    """

    def __init__(self, *args: object, delay: float, journal: Path, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.delay = delay
        self.journal = journal
        self._late: set[asyncio.Task[None]] = set()

    def _start_request(
        self, stub: hints_pb2_grpc.FreePageHintsStub, req: hints_pb2.HintRequest, md: tuple[tuple[str, str], ...]
    ) -> None:
        self.requests += 1
        task = asyncio.ensure_future(self._answer_late(stub, req, md, time.monotonic()))
        self._late.add(task)
        task.add_done_callback(self._late.discard)

    async def _answer_late(
        self,
        stub: hints_pb2_grpc.FreePageHintsStub,
        req: hints_pb2.HintRequest,
        md: tuple[tuple[str, str], ...],
        received: float,
    ) -> None:
        deadline = received + req.deadline_ms / 1000
        await asyncio.sleep(max(0.0, deadline - time.monotonic()) + self.delay)
        entry: dict[str, object] = {"mode": "late", "epoch": req.epoch, "after_deadline_s": time.monotonic() - deadline}
        try:
            entry["ranges_sent"] = await self._stream_snapshot(
                stub, md, req, self.settings.chunk_ranges, time.monotonic() + 10.0
            )
        except Exception as exc:  # the collector refusing is what the tests want to see
            entry["error"] = repr(exc)[:300]
        except asyncio.CancelledError:  # the connection ended meanwhile (e.g. at a switchover)
            entry["cancelled"] = True
            raise
        finally:
            _note(self.journal, entry)


#: How a late report may fail when its connection goes away under it: gRPC's
#: transport words (a status, or the aio batch error of a call on a channel
#: that closed).
_CONNECTION_ENDED = (
    "UNAVAILABLE",
    "CANCELLED",
    "SendMessageOperation",
    "execute_batch",
    "Socket closed",
    "Connection reset",
    "Broken pipe",
)


def late_outcome(entry: dict[str, object]) -> str:
    """What became of one late report in the rogue agent's journal."""
    if entry.get("cancelled"):
        return "connection ended"
    error = str(entry.get("error", ""))
    if not error:
        return "accepted"
    if "FAILED_PRECONDITION" in error and "closed" in error:
        return "refused: closed epoch"
    if any(word in error for word in _CONNECTION_ENDED):
        return "connection ended"
    return f"other: {error}"


def _note(journal: Path, entry: dict[str, object]) -> None:
    entry["t"] = time.time()
    with journal.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log", default="/run/fphint-rogue.jsonl", help="JSON lines, one per request handled")
    sub = p.add_subparsers(dest="mode", required=True)
    lie = sub.add_parser("lie", help="report a live process's pages as free")
    lie.add_argument("--pid", type=int, required=True)
    lie.add_argument("--addr", type=lambda s: int(s, 0))
    lie.add_argument("--len", dest="length", type=lambda s: int(s, 0))
    sub.add_parser("silent", help="attach and never answer")
    late = sub.add_parser("late", help="answer after the deadline")
    late.add_argument("--delay", type=float, default=2.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    journal = Path(args.log)

    source: KpageflagsSource
    if args.mode == "lie":
        if (args.addr is None) != (args.length is None):
            p.error("--addr and --len go together")
        source = LyingSource(args.pid, args.addr, args.length, journal)
        source.victim_ranges()  # fail now, not at the first request, if the pid is wrong
    else:
        source = KpageflagsSource()
    source.open()
    facts = build_facts(detect_safety(), [hints_pb2.SourceStatus(name="kpageflags", available=True)], "kpageflags", "")
    places = discovery.Places(env=os.environ)

    def endpoint() -> Endpoint:
        addr = discovery.discover("collector", None, places)
        token = discovery.discover("token", None, places)
        if addr is None:
            raise discovery.DiscoveryError("no collector address")
        return Endpoint(addresses.parse(addr.value), token.value if token else None)

    settings = Settings(backoff_initial_s=0.2, backoff_max_s=2.0)
    agent: Agent
    if args.mode == "late":
        agent = LateAgent(source, facts, endpoint, settings, delay=args.delay, journal=journal)
    elif args.mode == "silent":
        agent = SilentAgent(source, facts, endpoint, settings, journal=journal)
    else:
        agent = Agent(source, facts, endpoint, settings)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    _note(journal, {"mode": args.mode, "started": True, "pid": os.getpid()})
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
