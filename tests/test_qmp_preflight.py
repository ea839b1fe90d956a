"""Migration pre-flight on real QEMU 7.2 pairs, and on scripted monitors for what 7.2 cannot show."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from host_collector.qmp.preflight import UNSAFE_CAPABILITIES, SafetyReport, _capabilities, check_migration_safety
from host_collector.qmp.session import QmpCommandError, QmpError, QmpSession

from .qmp_launcher import TCG_FIXED, Qemu, qemu, qemu_version

VM = ["-machine", "pc", "-m", "64M"]


def settings(report: SafetyReport) -> set[tuple[str, str]]:
    return {(p.side, p.setting) for p in report.problems}


async def pair(body: Any, src_args: list[str] | None = None) -> None:
    async with (
        qemu(src_args if src_args is not None else ["-S", *VM], name="pf-src") as s,
        qemu(["-S", "-incoming", "defer", *VM], name="pf-dst") as d,
    ):
        await body(s, await s.qmp(), await d.qmp())


async def set_caps(qmp: QmpSession, **caps: bool) -> None:
    await qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]},
    )


@pytest.mark.qemu
def test_clean_pair_is_safe_and_gets_return_path_and_events() -> None:
    async def body(q: Qemu, src: QmpSession, dst: QmpSession) -> None:
        report = await check_migration_safety(src, dst)
        assert report.safe, report.summary()
        assert set(report.enabled) == {"source: return-path", "source: events", "destination: return-path"}
        assert report.versions["source"][:2] == qemu_version()
        # Paused TCG guest: a warning, not a refusal, where TCG dirty tracking is broken.
        assert any("TCG" in w for w in report.warnings) == (qemu_version() < TCG_FIXED)
        src_caps = {c["capability"]: c["state"] for c in await src.execute("query-migrate-capabilities")}
        dst_caps = {c["capability"]: c["state"] for c in await dst.execute("query-migrate-capabilities")}
        assert src_caps["return-path"] and src_caps["events"] and dst_caps["return-path"]
        again = await check_migration_safety(src, dst)
        assert again.safe and again.enabled == []  # already on: nothing to do

    asyncio.run(pair(body))


# Each 7.2 capability that must stop rewriting, with what it needs switched on alongside.
UNSAFE_ON_72: list[tuple[str, dict[str, bool]]] = [
    ("xbzrle", {}),
    ("compress", {}),
    ("multifd", {}),
    ("postcopy-ram", {}),
    ("postcopy-preempt", {"postcopy-ram": True}),
    ("dirty-bitmaps", {}),
    ("x-colo", {}),
    ("block", {}),
    ("background-snapshot", {"return-path": False}),  # QEMU refuses it with return-path on
    ("x-ignore-shared", {}),
]


@pytest.mark.qemu
def test_each_unsafe_capability_is_named_on_the_side_it_is_on() -> None:
    async def body(q: Qemu, src: QmpSession, dst: QmpSession) -> None:
        assert (await check_migration_safety(src, dst)).safe
        for side, qmp in (("source", src), ("destination", dst)):
            have = set(_capabilities(await qmp.execute("query-migrate-capabilities")))
            for cap, needs in UNSAFE_ON_72:
                if cap not in have:  # removed in later QEMU (compress, block: 9.1)
                    continue
                first = [{"capability": k, "state": v} for k, v in needs.items()]
                await qmp.execute(
                    "migrate-set-capabilities", {"capabilities": [*first, {"capability": cap, "state": True}]}
                )
                report = await check_migration_safety(src, dst)
                assert (side, f"capability {cap}") in settings(report), report.summary()
                assert UNSAFE_CAPABILITIES[cap] in report.summary()
                undo = [{"capability": k, "state": not v} for k, v in needs.items()]
                await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": cap, "state": False}]})
                await qmp.execute("migrate-set-capabilities", {"capabilities": undo})
                assert (await check_migration_safety(src, dst)).safe

    asyncio.run(asyncio.wait_for(pair(body), 120))


@pytest.mark.qemu
def test_tls_creds_make_the_stream_unreadable() -> None:
    async def body(q: Qemu, src: QmpSession, dst: QmpSession) -> None:
        await src.execute("object-add", {"qom-type": "tls-creds-anon", "id": "tls0", "endpoint": "client"})
        await src.execute("migrate-set-parameters", {"tls-creds": "tls0"})
        report = await check_migration_safety(src, dst)
        assert ("source", "parameter tls-creds") in settings(report)
        assert "encrypted" in report.summary()

    asyncio.run(pair(body))


@pytest.mark.qemu
def test_running_tcg_guest_is_refused_only_before_9_0() -> None:
    async def body(q: Qemu, src: QmpSession, dst: QmpSession) -> None:
        report = await check_migration_safety(src, dst)
        if qemu_version() < TCG_FIXED:
            assert ("source", "accelerator TCG") in settings(report)
            assert "lose guest writes" in report.summary()
        else:
            assert report.safe, report.summary()

    asyncio.run(pair(body, src_args=VM))  # no -S: the (empty) guest runs


@pytest.mark.qemu
def test_missing_destination_is_a_warning_and_qmp_failure_a_problem() -> None:
    async def body(q: Qemu, src: QmpSession, dst: QmpSession) -> None:
        report = await check_migration_safety(src, None)
        assert report.safe and any("destination not checked" in w for w in report.warnings)
        await dst.close()
        report = await check_migration_safety(src, dst)
        assert ("destination", "QMP") in settings(report)

    asyncio.run(pair(body))


# ---- scripted monitors ---------------------------------------------------------

CAPS_10 = [
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram", "x-colo",
    "release-ram", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
    "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
    "background-snapshot", "zero-copy-send", "postcopy-preempt", "switchover-ack", "dirty-limit", "mapped-ram",
]  # fmt: skip


class ScriptedMonitor:
    """Answers the pre-flight's queries like a QEMU 10.0 with KVM would."""

    def __init__(self, label: str, **overrides: Any) -> None:
        self.label = label
        self.caps = {c: False for c in CAPS_10}
        self.params: dict[str, Any] = {"tls-creds": "", "mode": "normal", "zero-page-detection": "multifd"}
        self.version = {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}
        self.refuse_set = False
        self.kvm: Any = {"enabled": True, "present": True}
        self.fail: str | None = None
        for k, v in overrides.items():
            setattr(self, k, v)

    async def execute(self, cmd: str, args: Any = None, *, timeout_s: float | None = None) -> Any:
        if self.fail == cmd:
            raise QmpError(f"QMP {self.label}: {cmd} not answered within 5 s")
        if cmd == "query-version":
            return copy.deepcopy(self.version)
        if cmd == "query-migrate":
            return {"status": "none"}
        if cmd == "query-kvm":
            return copy.deepcopy(self.kvm)
        if cmd == "query-migrate-capabilities":
            return [{"capability": k, "state": v} for k, v in self.caps.items()]
        if cmd == "migrate-set-capabilities":
            if self.refuse_set:
                raise QmpCommandError("There's a migration process in progress", "GenericError")
            for c in args["capabilities"]:
                self.caps[c["capability"]] = c["state"]
            return {}
        if cmd == "query-migrate-parameters":
            return dict(self.params)
        raise AssertionError(cmd)


def check(src: ScriptedMonitor, dst: ScriptedMonitor | None = None) -> SafetyReport:
    return asyncio.run(check_migration_safety(src, dst or ScriptedMonitor("dst")))  # type: ignore[arg-type]


def test_mapped_ram_and_mode_exist_only_in_newer_qemu() -> None:
    src = ScriptedMonitor("src")
    assert check(src).safe
    src.caps["mapped-ram"] = True
    assert ("source", "capability mapped-ram") in settings(check(src))
    src.caps["mapped-ram"] = False
    src.params["mode"] = "cpr-reboot"
    assert ("source", "parameter mode") in settings(check(src))


def test_only_a_tcg_source_gets_the_same_sync_case() -> None:
    """KVM defers its dirty-log clear (docs/safety-rule.md §7.2): rewriting
    stays allowed, without rule (b)'s same-sync case, and the report says so."""
    src = ScriptedMonitor("src")
    report = check(src)
    assert report.safe and report.source_accelerator == "kvm" and not report.same_sync_allowed
    assert any("§7.2" in w for w in report.warnings)
    src.kvm = {"enabled": False, "present": True}
    report = check(src)
    assert report.safe and report.source_accelerator == "tcg" and report.same_sync_allowed
    src.kvm = "nonsense"
    report = check(src)
    assert report.source_accelerator == "unknown" and not report.same_sync_allowed


def test_unknown_capability_that_is_on_blocks_rewriting() -> None:
    src = ScriptedMonitor("src")
    src.caps["virtio-iterative"] = True
    report = check(src)
    assert ("source", "capability virtio-iterative") in settings(report)
    assert "unknown to fphint" in report.summary()
    src.caps["virtio-iterative"] = False
    assert check(src).safe  # off: harmless


@pytest.mark.parametrize("major, minor, ok", [(7, 1, False), (7, 2, True), (10, 2, True), (11, 0, False)])
def test_only_verified_versions_are_rewritten(major: int, minor: int, ok: bool) -> None:
    src = ScriptedMonitor("src", version={"qemu": {"major": major, "minor": minor, "micro": 0}})
    assert check(src).safe is ok


def test_return_path_that_cannot_be_enabled_is_a_problem() -> None:
    src = ScriptedMonitor("src", refuse_set=True)
    report = check(src)
    assert ("source", "capability return-path") in settings(report)
    assert ("source", "capability events") in settings(report)
    assert "migration process in progress" in report.summary()


def test_a_monitor_that_stops_answering_is_a_problem_not_a_crash() -> None:
    report = check(ScriptedMonitor("src"), ScriptedMonitor("dst", fail="query-migrate-parameters"))
    assert ("destination", "QMP") in settings(report)
    assert report.to_json()["safe"] is False
