"""One atheris run of a fuzz target, in a child process: the harness both the
short campaign in `make test` (tests/test_fuzz_campaign.py) and the long one
(bench/fuzz.py) drive. The seed corpus is committed under tests/fuzz/corpus."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from fphint_lab.fuzz.targets import TARGETS

#: The checkout (the lab is installed editable only).
ROOT = Path(__file__).resolve().parents[3]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"


def campaign(name: str, seconds: float, runs: int, work: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One atheris run: libFuzzer's final stats, 'coverage', 'crashes' (artifacts
    written; libFuzzer stops at the first), 'returncode' and 'tail' (its last lines)."""
    scratch, art = work / "new", work / "artifacts"
    scratch.mkdir(parents=True, exist_ok=True)
    art.mkdir(parents=True, exist_ok=True)
    _, directory = TARGETS[name]
    argv = [
        sys.executable,
        "-m",
        "fphint_lab.fuzz.run",
        name,
        f"-max_total_time={int(seconds)}",
        f"-runs={runs}",
        "-print_final_stats=1",
        f"-artifact_prefix={art}/",
        "-timeout=30",
        "-rss_limit_mb=4096",
        *extra,
        str(scratch),
        str(CORPUS / directory),
    ]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
    out = p.stderr + p.stdout
    stats = {k: int(v) for k, v in re.findall(r"stat::(\w+):\s+(\d+)", out)}
    cov = re.findall(r"cov: (\d+)", out)
    stats["coverage"] = int(cov[-1]) if cov else 0
    stats["crashes"] = len(list(art.iterdir()))
    stats["returncode"] = p.returncode
    out_stats: dict[str, Any] = dict(stats)
    out_stats["tail"] = "\n".join(out.splitlines()[-40:])
    return out_stats
