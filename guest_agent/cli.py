"""``fph-agent``: the guest agent's command line.

``run`` serves the collector; ``probe`` prints the facts the agent would
attach with; ``snapshot`` scans once and prints totals (for operators
comparing sources).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from fphint import addresses, logs

from . import discovery, memory, priority
from .facts import build_facts, detect_safety
from .selection import PREFERENCES, select_source
from .settings import TRACK_MODES, Settings
from .sources.base import SourceUnavailable

log = logging.getLogger("guest_agent")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fph-agent", description="fphint guest agent: free-page hints for live migration")
    ap.add_argument("--source", choices=PREFERENCES, default="auto", help="free-page source (default: auto)")
    ap.add_argument("--show-bpf", action="store_true", help="print the final BPF program and exit")
    ap.add_argument("--log-format", choices=("text", "json"), default="text")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd")
    run = sub.add_parser("run", help="attach to the collector and answer hint requests")
    run.add_argument("--collector", help="tcp:HOST:PORT, unix:/path or vsock:CID:PORT")
    run.add_argument("--token", help="this VM's token (prefer --token-file or fw_cfg)")
    run.add_argument("--token-file", help="file holding this VM's token")
    run.add_argument("--config", default=str(discovery.CONFIG_FILE), help="agent config file (TOML)")
    run.add_argument("--chunk-ranges", type=int, default=Settings.chunk_ranges, help="ranges per chunk")
    run.add_argument(
        "--priority",
        choices=priority.MODES,
        default=os.environ.get("FPHINT_PRIORITY", "rt"),
        help="the answering path's scheduling: rt (SCHED_FIFO, bounded), nice (-20) or off; "
        "memory is locked unless off (default: $FPHINT_PRIORITY or rt)",
    )
    run.add_argument(
        "--reclaim-page-cache",
        action="store_true",
        default=os.environ.get("FPHINT_RECLAIM_PAGE_CACHE", "") in ("1", "yes", "true"),
        help="opt-in: drop the guest's clean page cache before a migration's first scan, so those pages "
        "are skipped too; the guest re-reads them later (default: $FPHINT_RECLAIM_PAGE_CACHE or off)",
    )
    run.add_argument(
        "--track",
        choices=TRACK_MODES,
        default=os.environ.get("FPHINT_TRACK", "migration"),
        help="scan once, then track: from the first request until requests stop (migration), "
        "always, or off (default: $FPHINT_TRACK or migration)",
    )
    sub.add_parser("probe", help="print the facts the agent would attach with (JSON)")
    sub.add_parser("snapshot", help="scan once and print totals (JSON)")
    return ap


def _show_bpf() -> int:
    try:
        from .sources.ebpf import bpf_program_text

        print(bpf_program_text())
    except (ImportError, SourceUnavailable) as e:
        print(f"fph-agent: the eBPF source is not available: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.log_format, args.verbose)
    if args.show_bpf:
        return _show_bpf()
    if args.cmd is None:
        _parser().print_help()
        return 2
    safety = detect_safety()
    sel = select_source(args.source, safety)
    details = getattr(sel.source, "facts", None)
    facts = build_facts(
        safety,
        sel.statuses,
        sel.name,
        sel.refusal,
        details={str(k): str(v) for k, v in details.items()} if isinstance(details, dict) else None,
    )
    if args.cmd == "probe":
        from google.protobuf import json_format  # ~2.5 MiB the serving agent never needs

        print(json.dumps(json_format.MessageToDict(facts, preserving_proto_field_name=True), indent=2))
        return 0
    if args.cmd == "snapshot":
        if sel.source is None:
            print(f"fph-agent: no source: {sel.refusal}", file=sys.stderr)
            return 1
        t = time.monotonic()
        snap = sel.source.snapshot()
        print(
            json.dumps(
                {
                    "source": snap.source,
                    "ranges": len(snap.ranges),
                    "pages": snap.pages,
                    "ms": round((time.monotonic() - t) * 1000, 2),
                    "complete": snap.complete,
                }
            )
        )
        return 0

    for name, value, allowed in (("priority", args.priority, priority.MODES), ("track", args.track, TRACK_MODES)):
        if value not in allowed:  # a bad $FPHINT_* default escapes argparse's choices
            print(f"fph-agent: --{name} {value!r}: choose from {', '.join(allowed)}", file=sys.stderr)
            return 2
    if args.token and args.token_file:
        print("fph-agent: give --token or --token-file, not both", file=sys.stderr)
        return 2
    cli_token = args.token
    if args.token_file:
        try:
            with open(args.token_file) as f:
                cli_token = f.read().strip()
        except OSError as e:
            print(f"fph-agent: cannot read {args.token_file}: {e.strerror}", file=sys.stderr)
            return 2
    if args.collector:
        try:
            addresses.parse(args.collector)
        except addresses.AddressError as e:
            print(f"fph-agent: --collector: {e}", file=sys.stderr)
            return 2
    # The serving process: nothing in it speaks TLS (gRPC to the collector is
    # plaintext over vsock or the host's loopback; gRPC has its own TLS in
    # C), so asyncio's optional `import ssl` is refused: OpenSSL's libraries
    # and their start-up heap (~4 MiB RSS) would otherwise sit in the guest.
    if "ssl" not in sys.modules:
        sys.modules["ssl"] = None  # type: ignore[assignment]
    import asyncio

    from .agent import Agent, Endpoint

    places = discovery.Places(env=os.environ, config_file=Path(args.config))
    said: dict[str, str] = {}

    def endpoint() -> Endpoint:
        addr = discovery.discover("collector", args.collector, places)
        if addr is None:
            raise discovery.DiscoveryError("no collector address (--collector, FPHINT_COLLECTOR, config, fw_cfg)")
        token = discovery.discover("token", cli_token, places)
        for key, found in (("collector", addr), ("token", token)):
            where = found.source if found else "nowhere"
            if said.get(key) != where:
                log.info("%s from %s", key, where)
                said[key] = where
        return Endpoint(addresses.parse(addr.value), token.value if token else None)

    settings = Settings(chunk_ranges=args.chunk_ranges, track=args.track, reclaim_page_cache=args.reclaim_page_cache)
    if settings.reclaim_page_cache:
        facts.source_details["reclaim_page_cache"] = "on: clean page cache dropped before a migration's first scan"
    agent = Agent(sel.source, facts, endpoint, settings)
    # After the imports and the source's loader child, before serving: file
    # pages loading touched go back (what is used returns), then the
    # answering path first, its pages locked (guest_agent/memory.py, priority.py).
    before = memory.usage().get("Rss", 0)
    memory.page_out_libraries()
    log.info("paged out library pages: RSS %.1f -> %.1f MiB", before / 2**20, memory.usage().get("Rss", 0) / 2**20)
    prio = priority.raise_agent(args.priority)
    facts.source_details["priority"] = prio.describe()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    try:
        asyncio.run(serve())
    finally:
        if sel.source is not None:
            sel.source.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
