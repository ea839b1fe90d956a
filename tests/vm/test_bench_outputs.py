"""The benchmarks' outputs without a guest: bench/migration_comparison.py and
bench/guest_overhead.py run as commands in --dry-run / --plan mode (the same
code writes the JSON, the Markdown and the chart as a real campaign), the
host-memory refusal, and the collector's coverage block passed through. No
test here times anything."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fphint_lab.vm.scenarios import MiB, RunResult, pair_fits

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def bench(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=180, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def last_json(out: str) -> Any:
    return json.loads(out.strip().splitlines()[-1])


def test_comparison_dry_run_writes_the_document(tmp_path: Path) -> None:
    proc = bench(
        "migration_comparison.py",
        "--dry-run",
        "--runs",
        "3",
        "--sizes",
        "1,8",
        "--busy",
        "--scenarios",
        "plain,init_on_free,balloon_hint,balloon_report,fphint",
        "--out",
        str(tmp_path),
    )
    assert "[1/" in proc.stdout and "min left" in proc.stdout, "progress lines"
    line = last_json(proc.stdout)
    assert set(line["written"]) == {"json", "md", "png"} and line["dry_run"] is True
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert doc["schema"] == 1 and doc["dry_run"] is True
    assert {"name", "label", "how", "reason"} <= set(doc["accelerator"])
    assert doc["qemu"]["version"] and doc["link"]["mbit"] == 1000 and doc["runs_per_scenario"] == 3
    assert doc["anchors"]["plain"]["wire_gb"] == 8.1
    assert doc["destination_ram"]["kind"] == "anon", "destinations run on anonymous RAM unless asked"
    keys = [g["key"] for g in doc["groups"]]
    assert keys == ["1gib-churn", "8gib-churn", "1gib-busy"]
    by = {g["key"]: g for g in doc["groups"]}
    assert by["8gib-churn"]["guest_mib"] == 8192 and by["8gib-churn"]["fill_mib"] == 6144
    # 8 GiB runs only the big scenarios (of those asked for).
    assert [s["name"] for s in by["8gib-churn"]["scenarios"]] == ["plain", "init_on_free", "balloon_report", "fphint"]
    assert by["1gib-busy"]["workload"] == "busy" and "busy.py start" in by["1gib-busy"]["workload_desc"]
    for g in doc["groups"]:
        for s in g["scenarios"]:
            assert len(s["runs"]) == 3 and s["completed"] == 3 and s["survived"] == 3 and s["corrupted"] == 0
            for key in ("wire_mib", "total_ms", "downtime_ms"):
                assert set(s[key]) == {"median", "min", "max"}
                vals = sorted(r[key] for r in s["runs"])
                assert s[key]["median"] == pytest.approx(vals[1], abs=0.06)
            for r in s["runs"]:
                assert {"run", "ok", "survived", "corrupted", "wire_mib", "total_ms", "downtime_ms"} <= set(r)
                assert ("coverage" in r) == s["name"].startswith("fphint"), "coverage passed through where reported"
        assert g["goals"]["evaluated"] and "downtime_at_most_plain" in g["goals"]["checks"]
    md = (tmp_path / "comparison.md").read_text()
    assert "DRY RUN" in md and "accelerator **TCG**" in md and "## 8 GiB guest, churn workload" in md
    assert "destination RAM anonymous (memory-backend-ram)" in md
    assert "Published anchor" in md and "![comparison chart](comparison.png)" in md
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_comparison_plan_estimates_and_writes_nothing(tmp_path: Path) -> None:
    proc = bench("migration_comparison.py", "--plan", "--sizes", "1,4,8", "--busy", "--out", str(tmp_path))
    first = proc.stdout.splitlines()[0]
    assert first.startswith("campaign: 4 group(s)") and "estimated" in first and "min" in first
    assert "8 GiB guest, churn workload: 4 scenarios x 3 runs" in proc.stdout
    assert "fill and free 6144 MiB" in proc.stdout
    assert not any(tmp_path.iterdir())


def test_comparison_bad_input_is_refused_clearly() -> None:
    bad = bench("migration_comparison.py", "--plan", "--sizes", "1,x", check=False)
    assert bad.returncode == 2 and "--sizes wants GiB" in bad.stderr
    unknown = bench("migration_comparison.py", "--plan", "--scenarios", "plain,nope", check=False)
    assert unknown.returncode == 2 and "unknown scenarios ['nope']" in unknown.stderr
    accel = bench("migration_comparison.py", "--plan", "--accel", "xen", check=False)
    assert accel.returncode == 2 and "invalid choice" in accel.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal comes after the root check")
def test_comparison_refuses_a_pair_that_cannot_fit() -> None:
    """A size no host here can hold: refused before anything boots."""
    proc = bench("migration_comparison.py", "--sizes", "64", "--scenarios", "plain", "--runs", "1", check=False)
    assert proc.returncode == 2
    assert "refusing, a guest pair cannot fit" in proc.stderr and "65536 MiB" in proc.stderr


def test_pair_fits_counts_both_ram_files_and_the_margin() -> None:
    roomy = {"MemAvailable": 20000.0, "MemTotal": 24000.0}
    assert pair_fits(8192, meminfo=roomy, shm_free_mib=23000) is None
    # 2 x 8192 + the margin is 17920 MiB: 17000 available is not enough.
    why = pair_fits(8192, meminfo={"MemAvailable": 17000.0, "MemTotal": 24000.0}, shm_free_mib=23000)
    assert why is not None and "17920 MiB of host memory" in why and "17000 MiB is available" in why
    shm = pair_fits(8192, meminfo=roomy, shm_free_mib=12000)
    assert shm is not None and "16384 MiB in /dev/shm" in shm and "12000 MiB free" in shm
    assert pair_fits(1024, meminfo=roomy, shm_free_mib=23000) is None
    # With the destination on anonymous RAM only the source's file is in tmpfs.
    assert pair_fits(8192, meminfo=roomy, shm_free_mib=12000, shared_destination_ram=False) is None
    alone = pair_fits(8192, meminfo=roomy, shm_free_mib=8000, shared_destination_ram=False)
    assert alone is not None and "8192 MiB in /dev/shm" in alone


def test_coverage_block_is_passed_through() -> None:
    spec = importlib.util.spec_from_file_location("comparison_report", BENCH / "comparison_report.py")
    assert spec is not None and spec.loader is not None
    comparison_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(comparison_report)
    r = RunResult("fphint", 0, "10.0.2", qemu_transferred=5 * MiB, wire_bytes=4 * MiB, ok=True, survived=True)
    assert "coverage" not in comparison_report.run_record(r)
    r.report = {"coverage": [{"epoch": 1, "reported": 10, "sent_after": 8, "rewritten": 7}], "pages_rewritten": 7}
    rec = comparison_report.run_record(r)
    assert rec["coverage"] == r.report["coverage"] and rec["pages_rewritten"] == 7 and rec["wire_mib"] == 4.0
    r.problems = ["dst: workload verification failed: ..."]
    assert comparison_report.run_record(r)["corrupted"] is True


def test_guest_overhead_dry_run_shape() -> None:
    proc = bench("guest_overhead.py", "--dry-run", "--repeats", "3")
    out = last_json(proc.stdout)
    assert out["dry_run"] is True and out["interleaved"] is True and out["repeats"] == 3
    assert set(out["results"]) == {"alloc", "forkexec"}
    for by in out["results"].values():
        assert set(by) == {"none", "fphint_idle", "init_on_free", "reporting"}
        assert len(by["none"]["seconds"]) == 3 and "overhead_pct" not in by["none"]
        for c in ("fphint_idle", "init_on_free", "reporting"):
            assert {"median_s", "ratio_of_medians", "median_paired_ratio", "overhead_pct"} <= set(by[c])
    assert out["accelerator"]["label"] and "init_on_free" in out["published"]
    assert set(out["goal"]) == {"fphint_idle_at_most_1pct", "fphint_idle_ratio"}
    assert "| alloc | init_on_free=1 |" in proc.stdout
    bad = bench("guest_overhead.py", "--dry-run", "--workloads", "alloc,kernel", check=False)
    assert bad.returncode == 2 and "--workloads" in bad.stderr
