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
    assert sorted(p * mempattern.PAGE for p in pfns) == [
        a + i for a, n in out["ranges"] for i in range(0, n, mempattern.PAGE)
    ]


def test_pagemap_refuses_bad_ranges() -> None:
    rc = subprocess.run(
        [PYTHON, "-m", f"{PACKAGE}.pagemap", str(os.getpid()), "--addr", "4097", "--len", "4096"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert rc.returncode == 1 and "not page-aligned" in rc.stderr


def test_churn_restarts_only_after_check(churn: tuple[str, dict[str, Any]]) -> None:
    state, _ = churn
    rc, _ = run(
        "churn.py", "--dir", state, "start", "--workers", "1", "--loop-mib", "1", "--keep-mib", "1", check=False
    )
    assert rc == 2, "a second run must not start over live workers"
    assert run("churn.py", "--dir", state, "check")[1]["ok"]
    _, again = run("churn.py", "--dir", state, "start", "--workers", "1", "--loop-mib", "1", "--keep-mib", "1")
    assert again["ok"]
    assert run("churn.py", "--dir", state, "check")[1]["ok"]


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[tuple[list[str], dict[str, Any]]]:
    """The busy workload, small, on the host: its own state, churn and tmpfs
    directories; the page cache is read back but not dropped (this is the host)."""
    dirs = ["--dir", str(tmp_path / "busy"), "--churn-dir", str(tmp_path / "churn")]
    _, started = run("busy.py", *dirs, "start", "--anon-workers", "2", "--anon-mib", "4", "--keep-mib", "1",
                     "--tmpfs-dir", str(tmp_path / "tmpfs"), "--tmpfs-mib", "2", "--tmpfs-keep-mib", "1",
                     "--cache-mib", "2", "--drop-every", "0.05", "--no-drop")  # fmt: skip
    yield dirs, started
    pids = [w["pid"] for w in started.get("anon", [])] + [
        started[k]["pid"] for k in ("tmpfs", "cache", "fork") if k in started
    ]
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def _steps(dirs: list[str]) -> dict[str, int]:
    _, status = run("busy.py", *dirs, "status")
    return {k: w["steps"] for k, w in status["workers"].items()}


def test_busy_runs_every_worker_and_verifies(busy: tuple[list[str], dict[str, Any]]) -> None:
    import time

    dirs, started = busy
    assert started["ok"] and len(started["anon"]) == 2, started
    assert {"tmpfs", "cache", "fork"} <= set(started)
    deadline = time.monotonic() + 60
    while min(_steps(dirs).values(), default=0) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    rc, result = run("busy.py", *dirs, "check", check=False)
    assert rc == 0 and result["ok"], result
    b = result["busy"]
    assert b["tmpfs"]["steps"] >= 1 and b["tmpfs"]["keep_bad_pages"] == 0
    assert b["fork"]["forks"] >= 1 and b["fork"]["failures"] == 0
    assert b["cache"]["steps"] >= 1 and b["cache"]["files"] > 0 and b["cache"]["drops"] == 0
    assert all(w["iterations"] >= 1 and w["keep_bad_pages"] == 0 for w in result["workers"])
    assert not any(Path(started["tmpfs"]["keep"]).parent.iterdir()), "the tmpfs worker removes its files"


@needs_root
def test_busy_catches_planted_faults(busy: tuple[list[str], dict[str, Any]]) -> None:
    """A zeroed page in the tmpfs keep file and one in an anonymous keep
    region: both named, the check fails."""
    dirs, started = busy
    keep = Path(started["tmpfs"]["keep"])
    with keep.open("r+b") as f:
        f.seek(5 * mempattern.PAGE)
        f.write(bytes(mempattern.PAGE))
    victim = started["anon"][0]
    _write_mem(victim["pid"], victim["keep_addr"] + 3 * mempattern.PAGE, bytes(mempattern.PAGE))
    rc, result = run("busy.py", *dirs, "check", check=False)
    assert rc == 1 and not result["ok"]
    assert result["busy"]["tmpfs"]["keep_bad_pages"] == 1
    assert any("tmpfs keep file" in p and "'zero_pages': 1" in p for p in result["problems"]), result["problems"]
    assert [w["keep_bad_pages"] for w in result["workers"]] == [1, 0]


def test_busy_reports_a_dead_worker(busy: tuple[list[str], dict[str, Any]]) -> None:
    dirs, started = busy
    os.kill(started["fork"]["pid"], 9)
    rc, result = run("busy.py", *dirs, "check", "--timeout", "30", check=False)
    assert rc == 1 and any("fork worker" in p and "died" in p for p in result["problems"]), result
