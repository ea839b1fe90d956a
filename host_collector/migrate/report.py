"""Building the admin protocol's progress and report messages (daemon side)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fphint.v1 import admin_pb2
from host_collector.epochs import Epoch
from host_collector.layout import RamLayout
from host_collector.proxy.results import ProxyStats
from host_collector.qmp.preflight import SafetyReport


def preflight_message(rep: SafetyReport, destination_checked: bool) -> admin_pb2.Preflight:
    msg = admin_pb2.Preflight(
        safe=rep.safe,
        warnings=rep.warnings,
        enabled=rep.enabled,
        destination_checked=destination_checked,
    )
    for p in rep.problems:
        msg.problems.add(side=p.side, setting=p.setting, why=p.why)
    for side, field in (("source", "source_version"), ("destination", "destination_version")):
        if side in rep.versions:
            setattr(msg, field, ".".join(map(str, rep.versions[side])))
    return msg


def progress_message(
    *,
    number: int,
    elapsed_s: float,
    info: Mapping[str, Any],
    stats: ProxyStats,
    epoch: Epoch | None,
    sync: int,
    layout: RamLayout | None,
    rewriting: bool,
) -> admin_pb2.MigrateProgress:
    ram = info.get("ram")
    ram = ram if isinstance(ram, Mapping) else {}
    msg = admin_pb2.MigrateProgress(
        migration=number,
        elapsed_s=elapsed_s,
        status=str(info.get("status", "")),
        phase=stats.phase.value,
        source_bytes=stats.source_bytes,
        destination_bytes=stats.destination_bytes,
        pages_rewritten=stats.pages_rewritten,
        held_bytes=stats.held_bytes,
        dirty_sync_count=int(ram.get("dirty-sync-count", 0)),
        remaining_bytes=int(ram.get("remaining", 0)),
        rewriting=rewriting,
    )
    if epoch is not None:
        msg.epoch = epoch.id
        msg.epoch_sync = sync
        msg.hint_pages = epoch.free_pages()
    if layout is not None:
        msg.ram_pages = layout.ram_bytes // layout.page_size
    return msg


def progress_text(p: admin_pb2.MigrateProgress) -> str:
    """One log line's worth of a progress message."""
    return (
        f"{p.elapsed_s:.1f}s in={p.source_bytes} out={p.destination_bytes} rewritten={p.pages_rewritten} "
        f"held={p.held_bytes} sync={p.dirty_sync_count} remaining={p.remaining_bytes} phase={p.phase}"
    )
