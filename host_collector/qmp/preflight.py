"""Migration pre-flight: may the proxy rewrite this migration at all?

Reads capabilities and parameters on both QEMUs before ``migrate`` and lists
every setting under which turning a PAGE record into a ZERO record is unsafe
or impossible (docs/safety-rule.md §4; qemu-stream.md section 8).
It also switches on what the rewrite relies on: ``return-path`` on both ends
(an aborted migration then fails cleanly and the VM resumes on the source)
and ``events`` on the source (``MIGRATION_PASS`` opens hint epochs).

Capabilities are looked up by name in what each QEMU reports, so ones a
version lacks (``compress`` and ``block`` after 9.0, ``mapped-ram`` before
9.0) are simply absent; a capability this module does not know that is *on*
blocks rewriting too, because its effect on the stream cannot be judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from host_collector.qmp.session import QmpError, QmpSession

#: Capabilities that must be off on both ends, and why.
UNSAFE_CAPABILITIES: Mapping[str, str] = {
    "xbzrle": "XBZRLE deltas decode over the destination's current page, so a zeroed page corrupts later deltas",
    "compress": "pages travel as COMPRESS_PAGE records, which the proxy does not rewrite",
    "multifd": "pages travel on extra channels the proxy relays without parsing",
    "postcopy-ram": "postcopy sends pages on demand outside the pre-copy sync/epoch order",
    "postcopy-preempt": "postcopy sends pages on demand outside the pre-copy sync/epoch order",
    "dirty-bitmaps": "adds block dirty-bitmap sections and POSTCOPY_ADVISE, which the proxy cannot parse",
    "x-colo": "COLO checkpoints reuse dirty bitmaps and never end; the epoch rule assumes one pre-copy",
    "background-snapshot": "no dirty logging, so a write after a hint is not re-sent",
    "mapped-ram": "pages are written at fixed file offsets, not as a record stream",
    "block": "block-migration sections interleave with RAM and the proxy cannot parse them",
    "x-ignore-shared": "changes the MEM_SIZE record format; shared blocks are not sent",
}

#: Capabilities known not to change page records on a tcp/unix precopy stream.
HARMLESS_CAPABILITIES = frozenset(
    {
        "events",
        "return-path",
        "auto-converge",
        "rdma-pin-all",  # RDMA transport only
        "zero-blocks",  # only with block
        "release-ram",  # acts only in postcopy
        "pause-before-switchover",
        "postcopy-blocktime",  # statistics, only with postcopy
        "late-block-activate",
        "validate-uuid",  # one more configuration subsection
        "zero-copy-send",  # only with multifd
        "switchover-ack",  # 8.1+, return-path message only
        "dirty-limit",  # 8.1+, throttling only
    }
)

#: QEMU versions whose stream format and sync/event order were checked against the source.
SUPPORTED = ((7, 2), (10, 2))
#: First QEMU release whose TCG dirty tracking keeps up with migration syncs.
FIXED_TCG_DIRTY_TRACKING = (9, 0)


@dataclass(frozen=True)
class Problem:
    """One reason the migration must be relayed unchanged."""

    side: str  # "source" or "destination"
    setting: str  # e.g. "capability xbzrle", "parameter tls-creds"
    why: str

    def __str__(self) -> str:
        return f"{self.side}: {self.setting}: {self.why}"


@dataclass
class SafetyReport:
    """What pre-flight found; ``safe`` means the proxy may rewrite."""

    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    enabled: list[str] = field(default_factory=list)
    versions: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    capabilities: dict[str, dict[str, bool]] = field(default_factory=dict)
    #: The source's accelerator from ``query-kvm``: "kvm", "tcg", or "unknown"
    #: (not asked, or no answer). Only "tcg" allows rule (b)'s same-sync case
    #: (docs/safety-rule.md §7.2).
    source_accelerator: str = "unknown"

    @property
    def same_sync_allowed(self) -> bool:
        return self.source_accelerator == "tcg"

    @property
    def safe(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.safe:
            return "pre-flight: rewriting allowed"
        return "pre-flight: plain relay, no rewriting, because\n" + "\n".join(f"  - {p}" for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        return {
            "safe": self.safe,
            "problems": [{"side": p.side, "setting": p.setting, "why": p.why} for p in self.problems],
            "warnings": list(self.warnings),
            "enabled": list(self.enabled),
            "versions": {k: ".".join(map(str, v)) for k, v in self.versions.items()},
            "source_accelerator": self.source_accelerator,
        }


async def check_migration_safety(src: QmpSession, dst: QmpSession | None, *, enable: bool = True) -> SafetyReport:
    """Check both ends and (``enable``) switch on return-path (both) and events (source).

    Never raises for an unsafe setting: each one becomes a :class:`Problem`.
    A QMP failure on either end becomes a problem too (the check could not
    be made). ``dst`` None: the destination is not ours to ask (e.g. libvirt
    owns it); only the source is checked and a warning says so.
    """
    report = SafetyReport()
    ends: list[tuple[str, QmpSession, tuple[str, ...]]] = [("source", src, ("return-path", "events"))]
    if dst is not None:
        ends.append(("destination", dst, ("return-path",)))
    else:
        report.warnings.append("destination not checked (no QMP access); the in-band checks of the proxy still apply")
    for side, qmp, wanted in ends:
        try:
            await _check_end(report, side, qmp, wanted if enable else ())
        except QmpError as err:
            report.problems.append(Problem(side, "QMP", f"could not check: {err}"))
    return report


async def _check_end(report: SafetyReport, side: str, qmp: QmpSession, enable: tuple[str, ...]) -> None:
    version = _version(await qmp.execute("query-version"))
    report.versions[side] = version
    lo, hi = SUPPORTED
    if not lo <= version[:2] <= hi:
        report.problems.append(
            Problem(
                side,
                f"QEMU {'.'.join(map(str, version))}",
                f"stream format verified only for {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}",
            )
        )
    if side == "source":
        status = await qmp.execute("query-migrate")
        state = status.get("status") if isinstance(status, Mapping) else None
        if state in ("setup", "active", "pre-switchover", "device", "postcopy-active", "cancelling"):
            report.problems.append(Problem(side, "migration state", f"a migration is already {state}"))
        await _learn_accelerator(report, qmp)
        await _check_tcg_dirty_tracking(report, qmp, version)
    caps = _capabilities(await qmp.execute("query-migrate-capabilities"))
    missing = [c for c in enable if not caps.get(c, False)]
    if missing:
        try:
            await qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": c, "state": True} for c in missing]},
            )
            caps = _capabilities(await qmp.execute("query-migrate-capabilities"))
        except QmpError as err:
            report.problems.append(Problem(side, "capabilities " + ", ".join(missing), f"could not enable: {err}"))
        for c in missing:
            if caps.get(c, False):
                report.enabled.append(f"{side}: {c}")
    report.capabilities[side] = caps
    for c in enable:
        if not caps.get(c, False):
            report.problems.append(Problem(side, f"capability {c}", "is off and could not be switched on"))
    for name, on in sorted(caps.items()):
        if not on:
            continue
        if name in UNSAFE_CAPABILITIES:
            report.problems.append(Problem(side, f"capability {name}", UNSAFE_CAPABILITIES[name]))
        elif name not in HARMLESS_CAPABILITIES:
            report.problems.append(
                Problem(side, f"capability {name}", "unknown to fphint, so its effect on the stream cannot be judged")
            )
    params = await qmp.execute("query-migrate-parameters")
    if not isinstance(params, Mapping):
        raise QmpError(f"QMP {qmp.label}: query-migrate-parameters returned {params!r}")
    if params.get("tls-creds"):
        report.problems.append(
            Problem(side, "parameter tls-creds", f"is {params['tls-creds']!r}: the stream is encrypted")
        )
    mode = params.get("mode", "normal")
    if mode != "normal":
        report.problems.append(Problem(side, "parameter mode", f"is {mode!r}: not a live pre-copy migration"))


async def _learn_accelerator(report: SafetyReport, qmp: QmpSession) -> None:
    """KVM or TCG on the source: under KVM a sync does not clear the dirty log
    at once (manual dirty-log protection defers the clear to the first pick in
    each chunk), so rule (b)'s same-sync case is not sound there (§7.2)."""
    kvm = await qmp.execute("query-kvm")
    if not isinstance(kvm, Mapping) or "enabled" not in kvm:
        report.warnings.append(f"source: query-kvm answered {kvm!r}; rewriting without rule (b)'s same-sync case")
        return
    report.source_accelerator = "kvm" if kvm.get("enabled") else "tcg"
    if report.source_accelerator == "kvm":
        report.warnings.append(
            "source: KVM (its dirty-log clear is deferred): hints judge only records of later syncs or "
            "read before their request (docs/safety-rule.md §7.2), fewer pages skipped than under TCG"
        )


async def _check_tcg_dirty_tracking(report: SafetyReport, qmp: QmpSession, version: tuple[int, int, int]) -> None:
    """TCG before 9.0 can drop writes made after a dirty-bitmap sync.

    The 64-page fast path of cpu_physical_memory_sync_dirty_bitmap() clears
    migration dirty bits without resetting the TCG TLB, so later stores
    through a cached TLB entry are never logged (fixed upstream in 9.0,
    "physmem: Fix migration dirty bitmap coherency with TCG memory access";
    Debian's 7.2.22 lacks it, and a running guest loses pages even without
    fphint). The safety rule needs every write after a hint to be logged, so
    a running TCG guest is relayed unchanged; a paused one cannot write.
    """
    if version[:2] >= FIXED_TCG_DIRTY_TRACKING or report.source_accelerator == "kvm":
        return
    status = await qmp.execute("query-status")
    running = isinstance(status, Mapping) and bool(status.get("running"))
    why = "QEMU before 9.0 under TCG can lose guest writes during migration (no TLB reset after a dirty sync)"
    if running:
        report.problems.append(Problem("source", "accelerator TCG", why))
    else:
        report.warnings.append(f"source: {why}; the VM is paused now, so only a resume before the end would matter")


def _version(reply: Any) -> tuple[int, int, int]:
    try:
        q = reply["qemu"]
        return (int(q["major"]), int(q["minor"]), int(q["micro"]))
    except (KeyError, TypeError, ValueError):
        raise QmpError(f"query-version returned {reply!r}") from None


def _capabilities(reply: Any) -> dict[str, bool]:
    if not isinstance(reply, list):
        raise QmpError(f"query-migrate-capabilities returned {reply!r}")
    out: dict[str, bool] = {}
    for entry in reply:
        try:
            out[str(entry["capability"])] = bool(entry["state"])
        except (KeyError, TypeError):
            raise QmpError(f"query-migrate-capabilities entry {entry!r}") from None
    return out
