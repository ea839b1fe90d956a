"""The command-line side of ``migrate``, ``proxy`` and ``cancel``: a client of the admin service.

Progress is one line redrawn in place on a terminal and plain periodic lines
otherwise; ``--json`` prints only reports, each one JSON object on one line.
The first Ctrl-C asks the collector to cancel the migration (it runs
``migrate_cancel`` on the source, the VM keeps running) and waits for the
report; a second one stops waiting (the collector still cancels).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, TextIO

import grpc
from google.protobuf import json_format

from fphint import addresses
from fphint.v1 import admin_pb2, admin_pb2_grpc

#: gRPC statuses that mean the request itself is wrong (exit 2); anything else exits 1.
_USAGE = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION})
EXIT_INTERRUPTED = 130


def report_json(report: admin_pb2.MigrationReport) -> dict[str, Any]:
    """Every field, defaults included, 64-bit integers as numbers."""
    out: dict[str, Any] = json_format.MessageToDict(
        report,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )
    return out


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """``123``, ``64K``, ``512M``, ``8G`` (binary units) -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1 << (10 * ("KMGT".index(t[-1]) + 1))
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 800M, 2G)") from None
    if value < 0:
        raise ValueError(f"{text!r}: a size cannot be negative")
    return int(value * mult)


def progress_line(vm: str, p: admin_pb2.MigrateProgress, page_size: int = 4096) -> str:
    parts = [
        f"{vm} [{p.status or '-'}] {p.elapsed_s:6.1f}s",
        f"in {size(p.source_bytes)}",
        f"out {size(p.destination_bytes)}",
    ]
    if p.rewriting:
        parts.append(f"rewritten {p.pages_rewritten} ({size(p.pages_rewritten * page_size)})")
        if p.epoch:
            cover = f" = {100 * p.hint_pages / p.ram_pages:.1f}% of RAM" if p.ram_pages else ""
            parts.append(f"sync {p.epoch_sync} epoch {p.epoch}: {p.hint_pages} pages hinted{cover}")
        else:
            parts.append("no epoch yet")
    else:
        parts.append("plain relay")
    if p.remaining_bytes:
        parts.append(f"left {size(p.remaining_bytes)}")
    return "  ".join(parts)


def _pct(x: float) -> str:
    return "-" if x < 0 else f"{100 * x:.1f}%"


def coverage_lines(c: admin_pb2.Coverage) -> list[str]:
    """Per epoch: when its report came, and how much of what QEMU sent after it was rewritten."""
    first = "none" if c.first_report_ms < 0 else f"{c.first_report_ms:.0f} ms"
    goals = [
        ("first report <= 100 ms", c.first_report_goal_met),
        (">= 90 % rewritten", c.fraction_goal_met),
        ("a report in every epoch > 200 ms", c.report_every_epoch_goal_met),
    ]
    lines = [
        f"  coverage   first report {first}; {c.rewritten} of {c.sent_after_report} reported-free pages sent "
        f"after a report rewritten ({_pct(c.fraction)}; after the epoch opened {c.rewritten_after_open} of "
        f"{c.sent_after_open}, {_pct(c.fraction_after_open)}); {c.epochs_over_200ms_without_report} epochs "
        f"over 200 ms without a report; END section {c.end_section_records} records, "
        f"{c.end_section_reported_free} of them reported free",
        "             goals: " + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in goals),
    ]
    for e in c.epochs:
        when = "no report" if e.first_report_ms < 0 else f"report after {e.first_report_ms:.0f} ms"
        if e.first_report_ms >= 0 and not e.reported:
            when += " (too late)"
        lines.append(
            f"             sync {e.sync}: at {e.opened_at_s:.2f} s for {e.duration_ms:.0f} ms, {when}; "
            f"{e.reported_free_pages} free, {e.rewritten} of {e.sent_after_report} sent after the report "
            f"rewritten ({e.rewritten_after_open} of {e.sent_after_open} after opening)"
            + ("; guest stopped" if e.after_stop else "")
        )
    return lines


def render_report(r: admin_pb2.MigrationReport) -> str:
    ps = r.page_size or 4096
    lines = []
    head = f"{r.vm}: migration"
    if r.migration > 1 or not r.issued_migrate:
        head += f" #{r.migration}"
    if r.outcome == "completed":
        down = f", downtime {r.downtime_ms} ms" if r.downtime_ms >= 0 else ""
        lines.append(f"{head} completed in {r.wall_s:.2f} s{down} to {r.to} through {r.proxy_address}")
    else:
        lines.append(f"{head} {r.outcome.upper()}: {r.message}")
        state = r.source_runstate or "unknown"
        lines.append(
            f"  source     still on the source: run state {state}, migration {r.source_status or '-'}"
            + (f" ({r.source_error})" if r.source_error else "")
        )
    if r.proxy_outcome:
        lines.append(
            f"  stream     {size(r.source_bytes)} from the source, {size(r.destination_bytes)} to the "
            f"destination ({r.proxy_outcome}); {r.page_records} page records, {r.zero_records} zero records"
        )
        lines.append(
            f"  rewritten  {r.pages_rewritten} pages to zero ({size(r.pages_rewritten * ps)}); "
            f"{r.pages_held} waited for the gate, {r.pages_released_unjudged} went out unjudged"
        )
    if r.rewriting:
        agent = f"agent {r.agent_source}" if r.agent_attached else "no agent attached"
        lines.append(
            f"  hints      {agent}; {r.passes} syncs, {len(r.epochs) + r.epochs_not_listed} epochs, {r.polls} polls"
        )
        ram_pages = r.ram_bytes // ps if r.ram_bytes else 0
        for e in r.epochs:
            cover = f" ({100 * e.hint_pages / ram_pages:.1f}% of RAM)" if ram_pages else ""
            if not e.request_sent:
                when = "no request sent"
            elif e.request_to_last_chunk_s >= 0:
                when = f"snapshot in {e.request_to_last_chunk_s * 1000:.1f} ms"
            else:
                when = "no complete snapshot"
            lines.append(
                f"             sync {e.sync} epoch {e.epoch}: {e.hint_pages} pages{cover}, {when}; {e.close_reason}"
            )
        if r.epochs_not_listed:
            lines.append(f"             ... {r.epochs_not_listed} older epochs not listed")
        if r.HasField("coverage"):
            lines.extend(coverage_lines(r.coverage))
    else:
        lines.append(f"  hints      none: plain relay because {r.plain_relay_reason or 'of an earlier error'}")
    pf = r.preflight
    versions = f"source {pf.source_version or '?'}, destination " + (
        pf.destination_version or "?" if pf.destination_checked else "not checked"
    )
    lines.append(
        f"  pre-flight {'rewriting allowed' if pf.safe else 'rewriting refused'}; {versions}"
        + (f"; enabled {', '.join(pf.enabled)}" if pf.enabled else "")
    )
    for p in pf.problems:
        lines.append(f"             - {p.side}: {p.setting}: {p.why}")
    for w in pf.warnings:
        lines.append(f"             warning: {w}")
    for label, text in (
        ("gate", r.gate_failure),
        ("fallback", r.fallback_reason),
        ("abort", r.abort_reason),
        ("error", r.proxy_error),
    ):
        if text:
            lines.append(f"  {label:<10} {text}")
    if r.source_status:
        lines.append(
            f"  QEMU       {r.source_status}, now {r.source_runstate or '?'}; {r.dirty_sync_count} syncs, "
            f"{size(r.qemu_transferred_bytes)} transferred, {r.qemu_normal_pages} normal and "
            f"{r.qemu_zero_pages} zero pages"
            + (f"; destination {r.destination_status}" if r.destination_status else "")
        )
    for n in r.notes:
        lines.append(f"  note       {n}")
    return "\n".join(lines)


class Printer:
    """Progress and reports to a terminal, a pipe, or as JSON."""

    def __init__(self, vm: str, as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.vm = vm
        self.json = as_json
        self.out = out
        self.err = err
        self.tty = out.isatty() and not as_json
        self._drawn = False

    def ready(self, ev: admin_pb2.ProxyReady, standing: bool) -> None:
        how = "rewriting allowed" if ev.rewriting else f"plain relay: {ev.plain_relay_reason}"
        what = f"proxy listening on {ev.listen_address}" + (f" (migration {ev.migration})" if standing else "")
        print(f"fph-collector: {self.vm}: {what}; {how}", file=self.err, flush=True)

    def progress(self, p: admin_pb2.MigrateProgress) -> None:
        if self.json:
            return
        line = progress_line(self.vm, p)
        if self.tty:
            self.out.write("\r" + line + "\x1b[K")
            self._drawn = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def report(self, r: admin_pb2.MigrationReport) -> None:
        self.end_line()
        if self.json:
            self.out.write(json.dumps(report_json(r), sort_keys=True) + "\n")
        else:
            self.out.write(render_report(r) + "\n")
        self.out.flush()

    def end_line(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self._drawn = False


def _stub(admin: str) -> tuple[grpc.Channel, admin_pb2_grpc.CollectorAdminStub]:
    ch = grpc.insecure_channel(addresses.parse(admin).grpc_target())
    return ch, admin_pb2_grpc.CollectorAdminStub(ch)


def rpc_error(e: grpc.RpcError, admin: str) -> int:
    code = e.code()
    details = e.details() or code.name
    if code is grpc.StatusCode.UNAVAILABLE and "connect" in details and "QMP" not in details:
        print(f"fph-collector: cannot reach the collector's admin socket {admin}: {details}", file=sys.stderr)
        return 1
    print(f"fph-collector: {details}", file=sys.stderr)
    return 2 if code in _USAGE else 1


def follow(
    admin: str,
    vm: str,
    start: Callable[[admin_pb2_grpc.CollectorAdminStub], Iterator[admin_pb2.MigrateEvent]],
    as_json: bool,
    standing: bool,
) -> int:
    """Stream a Migrate or Proxy call to the terminal; the exit status."""
    printer = Printer(vm, as_json)
    ch, stub = _stub(admin)
    reports: list[admin_pb2.MigrationReport] = []
    interrupts = 0

    def cancel_remotely() -> None:
        try:
            c, s = _stub(admin)
            with c:
                s.CancelMigration(admin_pb2.CancelMigrationRequest(vm=vm), timeout=10)
        except grpc.RpcError as e:
            print(f"fph-collector: could not ask for cancellation: {e.details()}", file=sys.stderr)

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            raise KeyboardInterrupt
        printer.end_line()
        print(
            "fph-collector: cancelling (migrate_cancel on the source; Ctrl-C again to stop waiting)",
            file=sys.stderr,
            flush=True,
        )
        threading.Thread(target=cancel_remotely, daemon=True).start()

    old = signal.signal(signal.SIGINT, on_sigint)
    call = start(stub)
    try:
        for ev in call:
            kind = ev.WhichOneof("kind")
            if kind == "ready":
                printer.ready(ev.ready, standing)
            elif kind == "progress":
                printer.progress(ev.progress)
            elif kind == "report":
                reports.append(ev.report)
                printer.report(ev.report)
    except KeyboardInterrupt:
        call.cancel()  # type: ignore[attr-defined]
        printer.end_line()
        print("fph-collector: stopped waiting; the collector cancels the migration on its own", file=sys.stderr)
        return EXIT_INTERRUPTED
    except grpc.RpcError as e:
        printer.end_line()
        return rpc_error(e, admin)
    finally:
        signal.signal(signal.SIGINT, old)
        ch.close()
    if not reports:
        if standing and interrupts:
            return 0
        print("fph-collector: the collector ended the call without a report", file=sys.stderr)
        return 1
    return 0 if all(r.outcome == "completed" for r in reports) else 1


def cancel(admin: str, vm: str) -> int:
    ch, stub = _stub(admin)
    try:
        with ch:
            resp = stub.CancelMigration(admin_pb2.CancelMigrationRequest(vm=vm), timeout=10)
    except grpc.RpcError as e:
        return rpc_error(e, admin)
    if not resp.cancelled:
        print(f"fph-collector: nothing to cancel for {vm}", file=sys.stderr)
        return 1
    return 0
