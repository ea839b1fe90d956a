"""``make demo``: a guest migrated plainly and with fphint, side by side.

The default (the README's main job) builds or reuses the test guest image
(vm-images/), boots a Debian guest under QEMU with the real agent inside,
starts the collector daemon, and then, on that one guest: leaves garbage in
its free memory and starts a workload that allocates, writes, verifies and
frees memory; migrates it plainly; does the same again and migrates it with
``fph-collector migrate``. Both migrations cross the same emulated 1 Gbit/s
link, where the bytes on the wire are counted. After each one the guest must
run the same boot with a clean kernel log and the workload must verify every
byte. It prints the comparison. Needs root and the dev install (the lab's
VM harness, fphint_lab.vm, and the image builder in vm-images/); about 2
minutes with a cached image, plus about 2 for the first image build. The
daemon runs exactly as shipped (``python -m host_collector serve``).

``--host-only`` is the quick check that needs no guest: "the VM" is this
host, its RAM layout comes from /proc/iomem, the agent reads this kernel's
free pages, and what the collector received is checked against
/proc/buddyinfo, both daemons running as real processes talking gRPC.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from fphint import ranges
from fphint.v1 import admin_pb2, admin_pb2_grpc
from vmimage.accel import MODES, AccelError

from .vm.fphint_daemon import FphintMigrator
from .vm.scenarios import (
    SCENARIOS,
    PlainMigrator,
    Workload,
    boot_for,
    migrate_once,
    prepare,
    summarize,
    table,
    vm_session,
)

PAGE = 4096


def system_ram(iomem: str = "/proc/iomem") -> list[tuple[int, int]]:
    """Top-level "System RAM" ranges as page-aligned (start, end) pairs."""
    out = []
    for line in Path(iomem).read_text().splitlines():
        if line.startswith(" ") or not line.rstrip().endswith(": System RAM"):
            continue
        span = line.split(" : ")[0]
        a, b = (int(x, 16) for x in span.split("-"))
        start, end = -(-a // PAGE) * PAGE, (b + 1) // PAGE * PAGE
        if end > start:
            out.append((start, end))
    if not out or all(s == 0 and e == 0 for s, e in out):
        raise SystemExit("demo: /proc/iomem shows no System RAM addresses (run as root)")
    return out


def buddyinfo_pages(path: str = "/proc/buddyinfo") -> int:
    total = 0
    for line in Path(path).read_text().splitlines():
        counts = [int(x) for x in line.split()[4:]]
        total += sum(c << order for order, c in enumerate(counts))
    return total


def write_config(workdir: Path, token: str) -> Path:
    ram = system_ram()
    lines = [
        "[collector]",
        f'listen = ["unix:{workdir}/agents.sock"]',
        f'admin = "unix:{workdir}/admin.sock"',
        "",
        "[[vm]]",
        'name = "this-host"',
        'token_file = "token"',
        "ram = [",
        *[f'  {{ gpa = {s:#x}, size = {e - s:#x}, block = "system-ram", offset = {s:#x} }},' for s, e in ram],
        "]",
        f'blocks = {{ "system-ram" = {ram[-1][1]:#x} }}',
    ]
    (workdir / "token").write_text(token + "\n")
    cfg = workdir / "collector.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def wait_attached(stub: admin_pb2_grpc.CollectorAdminStub, timeout: float) -> admin_pb2.VMInfo:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            resp = stub.ListVMs(admin_pb2.ListVMsRequest(), timeout=2)
            if resp.vms and resp.vms[0].attached:
                info: admin_pb2.VMInfo = resp.vms[0]
                return info
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"demo: the agent did not attach within {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host-only", action="store_true", help="the quick check on this host, no guest")
    g = ap.add_argument_group("guest demo")
    g.add_argument("--runs", type=int, default=1, help="migrations of each kind (default 1)")
    g.add_argument("--fill-mib", type=int, default=512, help="garbage left in free memory before each migration")
    g.add_argument("--link-mbit", type=float, default=1000.0, help="the emulated link's rate")
    g.add_argument("--keep", action="store_true", help="keep the VM logs")
    g.add_argument(
        "--accel",
        choices=MODES,
        help="kvm, tcg or auto (default: $FPH_ACCEL, else auto: KVM where a probe guest runs on it)",
    )
    h = ap.add_argument_group("--host-only")
    h.add_argument("--source", default="auto", help="agent source: auto, ebpf, kpageflags")
    h.add_argument("--show", type=int, default=12, help="largest ranges to print")
    h.add_argument(
        "--tolerance",
        type=float,
        default=0.02,
        help="allowed relative difference to /proc/buddyinfo (churn between the reads)",
    )
    args = ap.parse_args(argv)
    if not args.host_only:
        try:
            return guest_demo(args)
        except AccelError as exc:
            print(f"demo: error: {exc}", file=sys.stderr)
            return 2
    return host_demo(args)


def guest_demo(args: argparse.Namespace) -> int:
    """Plain and fphint migrations of one churning guest over one link."""
    if os.geteuid() != 0:
        print("demo: run as root (QEMU guests, the image build)", file=sys.stderr)
        return 2
    workload = Workload(fill_mib=args.fill_mib)
    rate = args.link_mbit * 1e6
    results: dict[str, list[Any]] = {"plain": [], "fphint": []}
    accel_line = "?"
    print(
        f"== fphint demo: one 1 GiB guest, migrated over an emulated {args.link_mbit:.0f} Mbit/s link, "
        "plainly and with fphint",
        flush=True,
    )
    print("   building or reusing the guest image (the first build takes about 2 minutes) ...", flush=True)
    with vm_session("demo", keep=args.keep, accel=args.accel) as factory:
        accel_line = factory.accel.describe()
        print(f"   accelerator: {accel_line}", flush=True)
        hinted = FphintMigrator(factory)
        try:
            vm = boot_for(factory, SCENARIOS["fphint"], "boot", guest_fields=hinted.guest_fields)
            hinted.wait_ready(vm)
            info = hinted.daemon.vm_info(FphintMigrator.VM_NAME)
            boot_id = vm.boot_id()
            print(
                f"   guest booted (QEMU {vm.qemu_version}, kernel {info.get('kernel_release')}); "
                f"agent attached, free-page source {info.get('chosen_source')!r}",
                flush=True,
            )
            hop = 0
            for run in range(args.runs):
                for name, migrator in (("plain", PlainMigrator()), ("fphint", hinted)):
                    print(
                        f"-- run {run + 1}, {name}: fill and free {workload.fill_mib} MiB, start the churn "
                        "workload, migrate ...",
                        flush=True,
                    )
                    prepare(vm, workload)
                    hop += 1
                    res, dst = migrate_once(
                        factory,
                        vm,
                        f"hop{hop}",
                        migrator,
                        scenario=SCENARIOS[name],
                        run=run,
                        boot_id=boot_id,
                        link_rate_bps=rate,
                        workload=workload,
                    )
                    results[name].append(res)
                    print(
                        f"   {res.wire_bytes / 2**20:.1f} MiB on the wire in {res.total_time_ms} ms, "
                        f"downtime {res.downtime_ms} ms, {res.dirty_sync_count} dirty syncs; guest "
                        f"{'intact' if res.ok else 'PROBLEMS: ' + '; '.join(res.problems)[:600]}",
                        flush=True,
                    )
                    if not res.qemu_transferred or not res.survived:
                        return 1
                    vm.shutdown()
                    vm = dst
        finally:
            hinted.close()
    sums = [summarize(SCENARIOS[n], rs) for n, rs in results.items()]
    print()
    print(table(sums))
    plain, fph = sums
    ok = all(r.ok for rs in results.values() for r in rs)
    if fph.wire_bytes.median and fph.total_time_ms.median:
        print(
            f"\nfphint sent {plain.wire_bytes.median / fph.wire_bytes.median:.2f}x fewer bytes and took "
            f"{fph.total_time_ms.median / plain.total_time_ms.median:.2f}x the time of the plain migration; "
            f"the workload verified every byte after each migration: {'yes' if ok else 'NO'}"
        )
    print(
        f"(accelerator: {accel_line}; the full comparison with QEMU's own free-page hinting: "
        "bench/migration_comparison.py, docs/comparison.md)"
    )
    return 0 if ok else 1


def host_demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("demo: run as root (the agent reads /proc/kpageflags, the layout /proc/iomem)", file=sys.stderr)
        return 2
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="fphint-demo-") as tmp:
        work = Path(tmp)
        cfg = write_config(work, secrets.token_urlsafe(24))
        print(f"== collector and agent on this machine (work dir {work})")
        collector = subprocess.Popen(
            [py, "-m", "host_collector", "serve", "--config", str(cfg)], stderr=open(work / "collector.log", "w")
        )
        agent = subprocess.Popen(
            [
                py,
                "-m",
                "guest_agent",
                "--source",
                args.source,
                "run",
                "--collector",
                f"unix:{work}/agents.sock",
                "--token-file",
                str(work / "token"),
                "--config",
                str(work / "none.toml"),
            ],
            stderr=open(work / "agent.log", "w"),
        )
        try:
            with grpc.insecure_channel(f"unix:{work}/admin.sock") as ch:
                stub = admin_pb2_grpc.CollectorAdminStub(ch)
                info = wait_attached(stub, 60)
                print(
                    f"agent attached: source={info.chosen_source or 'none'} kernel={info.kernel_release} "
                    f"{info.refusal}".rstrip()
                )
                before = buddyinfo_pages()
                resp = stub.CollectHints(
                    admin_pb2.CollectHintsRequest(
                        vm="this-host", deadline_ms=5000, close_on_snapshot=True, include_ranges=True
                    ),
                    timeout=20,
                )
                after = buddyinfo_pages()
        finally:
            for p in (agent, collector):
                p.terminate()
            for p in (agent, collector):
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        return report(resp, before, after, args.show, args.tolerance, work)


def report(resp: admin_pb2.CollectHintsResponse, before: int, after: int, show: int, tol: float, work: Path) -> int:
    runs = [(first, count) for b in resp.blocks for first, count in ranges.decode(list(b.ranges))]
    print(
        f"epoch {resp.epoch}: {resp.accepted_ranges} ranges, {resp.free_pages} free pages "
        f"({resp.free_pages * PAGE / 2**30:.2f} GiB) in {resp.reports} report(s); "
        f"request to last chunk {resp.request_to_last_chunk_s * 1000:.1f} ms"
    )
    print(
        f"agent: source {resp.agent_source}, scan {resp.agent_snapshot_us / 1000:.1f} ms, "
        f"CPU {resp.agent_cpu_seconds:.2f} s, RSS {resp.agent_rss_bytes / 2**20:.1f} MiB"
    )
    print(f"\n{'guest-physical range':<37} {'pages':>10} {'MiB':>9}")
    for first, count in sorted(runs, key=lambda r: r[1], reverse=True)[:show]:
        print(f"{first * PAGE:#018x}-{(first + count) * PAGE - 1:#018x} {count:>10} {count * PAGE / 2**20:>9.1f}")
    if len(runs) > show:
        print(f"... and {len(runs) - show} smaller ranges")
    ref = (before + after) / 2
    diff = abs(resp.free_pages - ref) / ref if ref else 1.0
    ok = diff <= tol and resp.reports > 0
    print(f"\n/proc/buddyinfo free pages: {before} before, {after} after the request")
    print(
        f"collector received {resp.free_pages}: {diff * 100:.3f}% from buddyinfo (tolerance {tol * 100:.1f}%) "
        f"-> {'OK' if ok else 'MISMATCH'}"
    )
    if not ok:
        print(f"logs: {work}/collector.log, {work}/agent.log (kept only while the demo runs)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
