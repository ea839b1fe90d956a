"""``fph-collector``: the host collector's command line.

``serve`` runs the daemon; ``vms``, ``hints``, ``migrate``, ``proxy`` and
``cancel`` talk to a running daemon over its admin socket (operators,
orchestrators, the demo, tests). Exit status: 0 success, 1 failure, 2 a bad
request (unknown VM, no QMP monitor configured, bad address).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace

import grpc
from google.protobuf import json_format

from fphint import addresses, logs, ranges
from fphint.v1 import admin_pb2, admin_pb2_grpc

from . import config as config_mod
from .migrate import console
from .migrate.observer import NO_OBSERVER, MigrationObserver
from .server import run

DEFAULT_CONFIG = "/etc/fphint/collector.toml"
DEFAULT_ADMIN = "unix:/run/fphint/admin.sock"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fph-collector", description="fphint host collector")
    ap.add_argument("--log-format", choices=("text", "json"), default="text")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the collector daemon")
    s.add_argument("--config", default=DEFAULT_CONFIG, help=f"TOML file (default {DEFAULT_CONFIG})")
    s.add_argument("--listen", action="append", default=[], help="extra agent-facing address (repeatable)")
    s.add_argument("--admin", help="admin socket, unix:/path (overrides the config)")
    s.add_argument("--metrics", help="HOST:PORT for Prometheus /metrics (overrides the config)")
    v = sub.add_parser("vms", help="list VMs and their agents")
    v.add_argument("--admin", default=DEFAULT_ADMIN)
    v.add_argument("--json", action="store_true")
    h = sub.add_parser("hints", help="ask a VM's agent for free pages once and print what arrived")
    h.add_argument("vm")
    h.add_argument("--admin", default=DEFAULT_ADMIN)
    h.add_argument("--deadline-ms", type=int, default=2000)
    h.add_argument("--wait-deadline", action="store_true", help="keep the epoch open until its deadline")
    h.add_argument("--ranges", action="store_true", help="print every free page range")
    h.add_argument("--json", action="store_true")
    m = sub.add_parser("migrate", help="migrate a VM through the collector's proxy, skipping free pages")
    m.add_argument("vm")
    m.add_argument("--to", required=True, help="where the destination QEMU listens: tcp:HOST:PORT or unix:PATH")
    m.add_argument("--dest-qmp", default="", help="the destination's QMP monitor (pre-flight checks both ends)")
    m.add_argument("--listen", default="", help="where the proxy listens for the source (default tcp:127.0.0.1:0)")
    m.add_argument("--max-bandwidth", help="set on the source first, bytes/s with K/M/G suffixes (e.g. 1G)")
    m.add_argument("--downtime-limit", type=int, metavar="MS", help="set on the source first")
    m.add_argument(
        "--switchover-bandwidth",
        metavar="RATE",
        help="the link's rate in bytes/s (K/M/G suffixes), set on the source as "
        "avail-switchover-bandwidth (QEMU >= 8.2): behind the proxy QEMU measures how fast "
        "the proxy reads, not the link, and would stop the guest too early",
    )
    m.add_argument("--hint-deadline-ms", type=int, default=0, help="how long each epoch collects hints")
    m.add_argument("--timeout", type=float, default=0.0, metavar="S", help="cancel the migration after S seconds")
    m.add_argument("--admin", default=DEFAULT_ADMIN)
    m.add_argument("--json", action="store_true", help="print only the final report, as one JSON object")
    x = sub.add_parser("proxy", help="a standing proxy for an orchestrator that issues migrate itself")
    x.add_argument("vm")
    x.add_argument("--listen", required=True, help="where the source connects: tcp:HOST:PORT or unix:PATH")
    x.add_argument("--to", required=True, help="where the destination QEMU listens")
    x.add_argument("--dest-qmp", default="")
    x.add_argument("--count", type=int, default=0, help="stop after this many migrations (default: never)")
    x.add_argument("--hint-deadline-ms", type=int, default=0)
    x.add_argument("--admin", default=DEFAULT_ADMIN)
    x.add_argument("--json", action="store_true", help="print each report as one JSON line")
    c = sub.add_parser("cancel", help="cancel a VM's migration or standing proxy")
    c.add_argument("vm")
    c.add_argument("--admin", default=DEFAULT_ADMIN)
    return ap


def _serve(args: argparse.Namespace, observer: MigrationObserver) -> int:
    try:
        cfg = config_mod.load(args.config)
        extra = tuple(addresses.parse(a) for a in args.listen)
        admin = addresses.parse(args.admin) if args.admin else cfg.admin
        if admin is not None and admin.kind != "unix":
            raise config_mod.ConfigError("--admin must be unix:/path")
        metrics = cfg.metrics
        if args.metrics:
            host, _, port = args.metrics.rpartition(":")
            if not host or not port.isdigit():
                raise config_mod.ConfigError("--metrics must be HOST:PORT")
            metrics = (host, int(port))
    except (config_mod.ConfigError, addresses.AddressError) as e:
        print(f"fph-collector: {e}", file=sys.stderr)
        return 2
    cfg = replace(cfg, listen=cfg.listen + extra, admin=admin, metrics=metrics)
    if not cfg.listen:
        print("fph-collector: nothing to listen on (config [collector] listen or --listen)", file=sys.stderr)
        return 2
    asyncio.run(run(cfg, observer))
    return 0


def _admin_stub(admin: str) -> tuple[grpc.Channel, admin_pb2_grpc.CollectorAdminStub]:
    ch = grpc.insecure_channel(addresses.parse(admin).grpc_target())
    return ch, admin_pb2_grpc.CollectorAdminStub(ch)


def _vms(args: argparse.Namespace) -> int:
    ch, stub = _admin_stub(args.admin)
    with ch:
        resp = stub.ListVMs(admin_pb2.ListVMsRequest(), timeout=10)
    if args.json:
        print(json_format.MessageToJson(resp, preserving_proto_field_name=True))
        return 0
    print(f"{'VM':<20} {'agent':<9} {'source':<11} {'RAM MiB':>8}  peer / refusal")
    for vm in resp.vms:
        state = "attached" if vm.attached else "-"
        print(
            f"{vm.name:<20} {state:<9} {vm.chosen_source or '-':<11} {vm.ram_bytes >> 20:>8}  "
            f"{vm.peer} {vm.refusal}".rstrip()
        )
    return 0


def _hints(args: argparse.Namespace) -> int:
    ch, stub = _admin_stub(args.admin)
    req = admin_pb2.CollectHintsRequest(
        vm=args.vm,
        deadline_ms=args.deadline_ms,
        close_on_snapshot=not args.wait_deadline,
        include_ranges=args.ranges,
    )
    with ch:
        resp = stub.CollectHints(req, timeout=args.deadline_ms / 1000 + 10)
    if args.json:
        print(json_format.MessageToJson(resp, preserving_proto_field_name=True))
        return 0
    ps = resp.page_size or 4096
    print(
        f"VM {resp.vm} epoch {resp.epoch}: {resp.free_pages} free pages ({resp.free_pages * ps / 2**20:.1f} MiB), "
        f"{resp.accepted_ranges} ranges from {resp.reports} report(s), closed: {resp.close_reason}"
    )
    if resp.agent_source:
        print(
            f"agent: source {resp.agent_source}, scan {resp.agent_snapshot_us / 1000:.1f} ms, "
            f"CPU {resp.agent_cpu_seconds:.2f} s, RSS {resp.agent_rss_bytes / 2**20:.1f} MiB; "
            f"request to last chunk {resp.request_to_last_chunk_s * 1000:.1f} ms"
        )
    for b in resp.blocks:
        print(f"  block {b.block}: {b.pages} pages")
        if args.ranges:
            for first, count in ranges.decode(list(b.ranges)):
                print(f"    pages {first:#x}-{first + count - 1:#x} ({count})")
    return 0 if resp.reports else 1


def _migrate(args: argparse.Namespace) -> int:
    try:
        addresses.parse(args.admin)
        req = admin_pb2.MigrateRequest(
            vm=args.vm,
            to=args.to,
            dest_qmp=args.dest_qmp,
            listen=args.listen,
            hint_deadline_ms=args.hint_deadline_ms,
            timeout_s=args.timeout,
            progress_interval_ms=1000 if args.json else (250 if sys.stdout.isatty() else 2000),
        )
        if args.max_bandwidth is not None:
            req.max_bandwidth = console.parse_size(args.max_bandwidth)
        if args.switchover_bandwidth is not None:
            req.switchover_bandwidth = console.parse_size(args.switchover_bandwidth)
            if req.switchover_bandwidth == 0:
                raise ValueError("--switchover-bandwidth must be positive (leave it out to let QEMU measure)")
        if args.downtime_limit is not None:
            if args.downtime_limit < 0:
                raise ValueError("--downtime-limit cannot be negative")
            req.downtime_limit_ms = args.downtime_limit
        if args.timeout < 0 or args.hint_deadline_ms < 0:
            raise ValueError("--timeout and --hint-deadline-ms cannot be negative")
    except (ValueError, addresses.AddressError) as e:
        print(f"fph-collector: {e}", file=sys.stderr)
        return 2
    return console.follow(args.admin, args.vm, lambda stub: stub.Migrate(req), args.json, standing=False)


def _proxy(args: argparse.Namespace) -> int:
    if args.count < 0 or args.hint_deadline_ms < 0:
        print("fph-collector: --count and --hint-deadline-ms cannot be negative", file=sys.stderr)
        return 2
    req = admin_pb2.ProxyRequest(
        vm=args.vm,
        to=args.to,
        dest_qmp=args.dest_qmp,
        listen=args.listen,
        count=args.count,
        hint_deadline_ms=args.hint_deadline_ms,
        progress_interval_ms=1000 if args.json else (250 if sys.stdout.isatty() else 2000),
    )
    return console.follow(args.admin, args.vm, lambda stub: stub.Proxy(req), args.json, standing=True)


def main(argv: list[str] | None = None, *, observer: MigrationObserver = NO_OBSERVER) -> int:
    """The command line; ``observer`` watches ``serve``'s migrations (test harnesses)."""
    args = _parser().parse_args(argv)
    logs.setup(args.log_format, args.verbose)
    try:
        if args.cmd == "serve":
            return _serve(args, observer)
        if args.cmd == "vms":
            return _vms(args)
        if args.cmd == "migrate":
            return _migrate(args)
        if args.cmd == "proxy":
            return _proxy(args)
        if args.cmd == "cancel":
            return console.cancel(args.admin, args.vm)
        return _hints(args)
    except grpc.RpcError as e:
        print(f"fph-collector: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except addresses.AddressError as e:
        print(f"fph-collector: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
