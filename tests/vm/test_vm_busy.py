"""The busy-guest workload (fphint_lab/guest/busy.py) in a real guest: it
saturates the vCPU, survives a live migration with every byte verified on the
destination, and its checker fails on a page zeroed behind its back."""

from __future__ import annotations

import time

import pytest

from fphint_lab.linkrelay import GIGABIT
from fphint_lab.vm.harness import VMFactory
from fphint_lab.vm.scenarios import SCENARIOS, PlainMigrator, Workload, boot_for, cpu_jiffies, migrate_once, prepare

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1500)]

BUSY = Workload(fill_mib=256, busy=True)


def test_busy_guest_migrates_and_verifies(vm_factory: VMFactory) -> None:
    plain = SCENARIOS["plain"]
    src = boot_for(vm_factory, plain, "src")
    boot_id = src.boot_id()
    prepare(src, BUSY)
    busy0, total0 = cpu_jiffies(src)
    time.sleep(4)
    busy1, total1 = cpu_jiffies(src)
    share = (busy1 - busy0) / max(1, total1 - total0)
    assert share > 0.8, f"the busy workload kept the vCPU only {share:.0%} busy"
    status = src.workload("busy.py", "status")
    assert all(w["alive"] for w in status["workers"].values()) and len(status["workers"]) == 3, status

    res, dst = migrate_once(
        vm_factory,
        src,
        "dst",
        PlainMigrator(),
        scenario=plain,
        run=0,
        boot_id=boot_id,
        link_rate_bps=GIGABIT,
        workload=BUSY,
        verify=False,
    )
    assert res.survived and res.qemu_transferred and res.workload == "busy" and res.accel, res
    check = dst.workload("busy.py", "check", timeout=300, check=False)
    assert check["ok"], check
    b = check["busy"]
    assert b["cache"]["drops"] >= 1 and b["cache"]["steps"] >= 1, "the page cache was dropped and read back"
    assert b["fork"]["forks"] >= 10 and b["fork"]["failures"] == 0
    assert b["tmpfs"]["steps"] >= 1 and b["tmpfs"]["keep_bad_pages"] == 0
    assert len(check["workers"]) == 2 and all(w["iterations"] >= 1 for w in check["workers"])

    # The checker can fail: a zeroed page in the tmpfs keep file is named.
    started = dst.workload("busy.py", *BUSY.start_args(), timeout=240)
    keep = started["tmpfs"]["keep"]
    dst.run(f"dd if=/dev/zero of={keep} bs=4096 seek=7 count=1 conv=notrunc status=none")
    bad = dst.workload("busy.py", "check", timeout=300, check=False)
    assert not bad["ok"] and bad["busy"]["tmpfs"]["keep_bad_pages"] == 1, bad
    assert dst.kernel_trouble() == []
