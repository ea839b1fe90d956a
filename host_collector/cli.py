"""``fph-collector``: the host collector's command line.

``serve`` runs the daemon; ``vms`` and ``hints`` talk to a running daemon
over its admin socket (operators, the demo, tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace

import grpc
from google.protobuf import json_format

from fphint import addresses, logs, ranges
from fphint.v1 import admin_pb2, admin_pb2_grpc

from . import config as config_mod
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
    return ap


def _serve(args: argparse.Namespace) -> int:
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
    asyncio.run(run(cfg))
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
        print(f"{vm.name:<20} {state:<9} {vm.chosen_source or '-':<11} {vm.ram_bytes >> 20:>8}  "
              f"{vm.peer} {vm.refusal}".rstrip())
    return 0


def _hints(args: argparse.Namespace) -> int:
    ch, stub = _admin_stub(args.admin)
    req = admin_pb2.CollectHintsRequest(
        vm=args.vm, deadline_ms=args.deadline_ms, close_on_snapshot=not args.wait_deadline,
        include_ranges=args.ranges,
    )
    with ch:
        resp = stub.CollectHints(req, timeout=args.deadline_ms / 1000 + 10)
    if args.json:
        print(json_format.MessageToJson(resp, preserving_proto_field_name=True))
        return 0
    ps = resp.page_size or 4096
    print(f"VM {resp.vm} epoch {resp.epoch}: {resp.free_pages} free pages ({resp.free_pages * ps / 2**20:.1f} MiB), "
          f"{resp.accepted_ranges} ranges from {resp.reports} report(s), closed: {resp.close_reason}")
    if resp.agent_source:
        print(f"agent: source {resp.agent_source}, scan {resp.agent_snapshot_us / 1000:.1f} ms, "
              f"CPU {resp.agent_cpu_seconds:.2f} s, RSS {resp.agent_rss_bytes / 2**20:.1f} MiB; "
              f"request to last chunk {resp.request_to_last_chunk_s * 1000:.1f} ms")
    for b in resp.blocks:
        print(f"  block {b.block}: {b.pages} pages")
        if args.ranges:
            for first, count in ranges.decode(list(b.ranges)):
                print(f"    pages {first:#x}-{first + count - 1:#x} ({count})")
    return 0 if resp.reports else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.log_format, args.verbose)
    try:
        if args.cmd == "serve":
            return _serve(args)
        if args.cmd == "vms":
            return _vms(args)
        return _hints(args)
    except grpc.RpcError as e:
        print(f"fph-collector: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except addresses.AddressError as e:
        print(f"fph-collector: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
