"""The in-guest workloads (fphint_lab/guest/) run on the host, quickly.

They are plain Python on Debian's python3, the guest's interpreter too, run
as modules (``python3 -m fphint_lab.guest.churn``) as in the guest. The
checkers are shown to catch planted faults: bytes changed behind a worker's
back through /proc/<pid>/mem, which is what a wrongly skipped page looks like
from inside a guest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fphint_lab.guest
from fphint_lab.guest import mempattern

#: The dev venv's interpreter: Debian's python3, where the lab is installed as
#: the image installs it for the guest's python3.
PYTHON = sys.executable
PACKAGE = fphint_lab.guest.__name__
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="reads PFNs / writes /proc/<pid>/mem: needs root")


def run(script: str, *args: str, check: bool = True) -> tuple[int, Any]:
    proc = subprocess.run(
        [PYTHON, "-m", f"{PACKAGE}.{script.removesuffix('.py')}", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else None


def test_pattern_pages_are_distinct_and_never_zero() -> None:
    data = mempattern.expected("seed", 64 * mempattern.PAGE)
    pages = [data[i : i + mempattern.PAGE] for i in range(0, len(data), mempattern.PAGE)]
    assert len(set(pages)) == len(pages)
    assert all(p.count(0) < mempattern.PAGE for p in pages)
    assert mempattern.expected("other", mempattern.PAGE) != pages[0]


def test_region_check_names_bad_pages() -> None:
    r = mempattern.Region(8 * mempattern.PAGE)
    r.fill("s")
    assert r.check("s") == (0, [])
    r.mem[3 * mempattern.PAGE : 4 * mempattern.PAGE] = bytes(mempattern.PAGE)
    r.mem[6 * mempattern.PAGE + 100] ^= 1
    count, bad = r.check("s")
    assert count == 2
    assert [(b.index, b.offset, b.zero) for b in bad] == [(3, 0, True), (6, 100, False)]
    r.free()


def test_fill_reports_what_it_did() -> None:
    rc, out = run("fill.py", "16")
    assert rc == 0 and out["pages"] == 16 * 256 and out["bad_pages"] == 0


@pytest.fixture
def churn(tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    state = str(tmp_path / "churn")
    _, started = run("churn.py", "--dir", state, "start", "--workers", "2", "--loop-mib", "4",
                     "--keep-mib", "1", "--dwell", "0.01")  # fmt: skip
    yield state, started
    for w in started.get("workers", []):  # workers stopped by check have exited already
        try:
            os.kill(w["pid"], 9)
        except ProcessLookupError:
            pass


def _write_mem(pid: int, addr: int, data: bytes) -> None:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        os.pwrite(fd, data, addr)
    finally:
        os.close(fd)


def test_churn_runs_and_verifies(churn: tuple[str, dict[str, Any]]) -> None:
    state, started = churn
    assert started["ok"] and len(started["workers"]) == 2
    _, status = run("churn.py", "--dir", state, "status")
    assert all(w["alive"] for w in status["workers"])
    rc, result = run("churn.py", "--dir", state, "check", check=False)
    assert rc == 0 and result["ok"], result
    assert all(w["iterations"] >= 1 and w["keep_bad_pages"] == 0 for w in result["workers"])


@needs_root
def test_churn_catches_planted_fault(churn: tuple[str, dict[str, Any]]) -> None:
    state, started = churn
    victim = started["workers"][1]
    _write_mem(victim["pid"], victim["keep_addr"] + 17 * mempattern.PAGE, bytes(mempattern.PAGE))
    rc, result = run("churn.py", "--dir", state, "check", check=False)
    assert rc == 1 and not result["ok"]
    good, bad = result["workers"]
    assert good["errors"] == [] and good["keep_bad_pages"] == 0
    assert bad["keep_bad_pages"] == 1
    assert [(e["where"], e["page"], e["zero"]) for e in bad["errors"]] == [("keep", 17, True)]


def test_churn_reports_a_dead_worker(churn: tuple[str, dict[str, Any]]) -> None:
    state, started = churn
    os.kill(started["workers"][0]["pid"], 9)
    rc, result = run("churn.py", "--dir", state, "check", "--timeout", "30", check=False)
    assert rc == 1 and not result["ok"]
    assert any("worker 0" in p and "died" in p for p in result["problems"])


@needs_root
def test_pagemap_lists_a_workers_pages(churn: tuple[str, dict[str, Any]]) -> None:
    _, started = churn
    w = started["workers"][0]
    _, out = run("pagemap.py", str(w["pid"]), "--addr", str(w["keep_addr"]), "--len", str(w["keep_len"]), "--list")
    npages = w["keep_len"] // mempattern.PAGE
    assert out["pages"] == npages and out["absent"] == 0
    total = sum(length for _, length in out["ranges"])
    assert total == w["keep_len"]
    starts = [a for a, _ in out["ranges"]]
    assert starts == sorted(starts) and all(a % mempattern.PAGE == 0 and a > 0 for a in starts)
    pfns = out["pfns"]
    assert len(pfns) == npages and len(set(pfns)) == npages
    assert sorted(p * mempattern.PAGE for p in pfns) == [a + i for a, n in out["ranges"] for i in range(0, n, mempattern.PAGE)]


def test_pagemap_refuses_bad_ranges() -> None:
    rc = subprocess.run(
        [PYTHON, "-m", f"{PACKAGE}.pagemap", str(os.getpid()), "--addr", "4097", "--len", "4096"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert rc.returncode == 1 and "not page-aligned" in rc.stderr


def test_churn_restarts_only_after_check(churn: tuple[str, dict[str, Any]]) -> None:
    state, _ = churn
    rc, _ = run("churn.py", "--dir", state, "start", "--workers", "1", "--loop-mib", "1", "--keep-mib", "1", check=False)
    assert rc == 2, "a second run must not start over live workers"
    assert run("churn.py", "--dir", state, "check")[1]["ok"]
    _, again = run("churn.py", "--dir", state, "start", "--workers", "1", "--loop-mib", "1", "--keep-mib", "1")
    assert again["ok"]
    assert run("churn.py", "--dir", state, "check")[1]["ok"]
