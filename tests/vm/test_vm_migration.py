"""Plain live migration (no proxy yet) of a running, churning guest, and the
checkers the e2e tests will rely on, shown to catch a planted fault.

One boot, two chained migrations (a boot costs ~20 s of a host core):

1. A -> B, clean: the RAM files are identical page for page, the churn
   workload verifies every byte on B, the boot id is unchanged, the kernel
   log is clean.
2. B -> C, then one page of a worker's live memory (found by its content)
   is zeroed in C's RAM file before C runs — what a proxy that wrongly skips
   an in-use page would do.
   The RAM comparison names exactly that page (and accepts it only if the
   page is claimed as rewritten), and the workload on C reports exactly
   that page of its keep region as zero.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from fphint_lab.guest import mempattern
from fphint_lab.vm.harness import VM, VMFactory, migrate, start_incoming
from fphint_lab.vm.ramcompare import NOT_REWRITTEN, PAGE, compare_ram_files, find_pages

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1500)]


def _wait_churning(vm: VM, iterations: int, timeout: float = 120.0) -> dict[str, Any]:
    """Wait until every churn worker has done ``iterations`` more loops."""
    start = {w["id"]: w["iterations"] for w in vm.workload("churn.py", "status")["workers"]}
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = vm.workload("churn.py", "status")
        workers = status["workers"]
        assert workers and all(w["alive"] for w in workers), status
        if all(w["iterations"] >= start[w["id"]] + iterations for w in workers):
            return status
        assert time.monotonic() < deadline, f"churn made no progress: {status}"
        time.sleep(0.5)


def _migrate_paused(factory: VMFactory, src: VM, name: str) -> VM:
    """Migrate ``src`` to a new destination left paused (-S) after completion."""
    dst = factory.destination(src, name=name, paused=True)
    result = migrate(src, start_incoming(dst), dst=dst)
    assert result.status == "completed"
    assert result.ram["transferred"] > 100 << 20, "a churning guest sends at least its used memory"
    assert src.status() == "postmigrate"
    assert dst.status() == "paused"
    return dst


def test_migration_keeps_memory_and_checkers_catch_a_planted_fault(vm_factory: VMFactory) -> None:
    # -- phase 1: A -> B, clean
    a = vm_factory.boot("a", mem_mib=1024)
    boot_id = a.boot_id()
    filled = a.workload("fill.py", "256")
    assert filled["bad_pages"] == 0
    started = a.workload("churn.py", "start", "--workers", "3", "--loop-mib", "32", "--keep-mib", "16")
    assert started["ok"], started
    _wait_churning(a, 1)

    b = _migrate_paused(vm_factory, a, "b")
    diff = compare_ram_files(a.ram_path, b.ram_path)
    assert diff.ok and diff.differing == 0, diff.describe()
    a.shutdown()  # frees its 1 GiB of /dev/shm

    b.cmd("cont")
    assert b.status() == "running"
    _wait_churning(b, 1)  # the workload lives on after the switchover
    check = b.workload("churn.py", "check", check=False)
    assert check["ok"], check
    assert all(w["iterations"] >= 2 and w["keep_bad_pages"] == 0 for w in check["workers"])
    assert b.boot_id() == boot_id, "the guest rebooted"
    assert b.kernel_trouble() == []

    # -- phase 2: B -> C with one in-use page zeroed behind the guest's back
    started = b.workload("churn.py", "start", "--workers", "2", "--loop-mib", "16", "--keep-mib", "16")
    assert started["ok"], started
    victim = started["workers"][0]
    victim_page = 5
    _wait_churning(b, 1)

    c = _migrate_paused(vm_factory, b, "c")
    clean = compare_ram_files(b.ram_path, c.ram_path)
    assert clean.ok and clean.differing == 0, clean.describe()

    # Where the victim page is *now* (paused), found by its content: a physical
    # address read earlier could be stale. Stale copies in free memory match
    # too; zeroing them as well is harmless.
    lo = victim_page * PAGE
    content = mempattern.expected(victim["keep_seed"], victim["keep_len"])[lo : lo + PAGE]
    copies = find_pages(c.ram_path, content)
    assert copies, "the victim page is not in the destination's RAM"
    with c.ram_path.open("r+b") as ram:
        for page in copies:
            ram.seek(page * PAGE)
            ram.write(bytes(PAGE))
    planted = compare_ram_files(b.ram_path, c.ram_path)
    assert sorted((p.page, p.reason) for p in planted.bad) == [(p, NOT_REWRITTEN) for p in copies], planted.describe()
    claimed = compare_ram_files(b.ram_path, c.ram_path, rewritten=copies)
    assert claimed.ok and claimed.rewritten_zero == len(copies), "zero pages the proxy claims to have rewritten pass"

    c.cmd("cont")
    check = c.workload("churn.py", "check", check=False)
    assert not check["ok"], f"the workload must notice its zeroed page: {check}"
    hurt, intact = check["workers"]
    assert hurt["keep_bad_pages"] == 1
    assert [(e["where"], e["page"], e["zero"]) for e in hurt["errors"]] == [("keep", victim_page, True)]
    assert intact["keep_bad_pages"] == 0 and intact["errors"] == []
    assert c.boot_id() == boot_id
    assert c.kernel_trouble() == []
