"""Memory churn for migration tests: allocate, write, verify, free, repeat.

``start`` launches WORKERS background processes (their own session, so they
outlive the serial shell command) and returns once each has written and
verified its *keep* region. Each worker then loops: map LOOP MiB, fill it
with a pattern unique to (worker, iteration), wait DWELL seconds, verify
every byte, unmap. A migration that happens meanwhile catches pages mid-life.

``check`` (normally run on the migration destination) asks every worker to
stop after its current iteration, verify its keep region — written before the
migration, still alive after it — and report. It prints one JSON object and
exits 1 if any byte was wrong anywhere or any worker died.

``status`` prints progress; ``info`` prints each worker's pid, keep region
address and pattern seed (for pagemap.py, or to find its pages in a RAM file
with mempattern.expected()). Keep regions are madvised MADV_NOHUGEPAGE so their
physical pages stay put. State lives in --dir (default /run/fphint-churn).

Run as ``python3 -m fphint_lab.guest.churn``.

usage:
  churn.py start [--workers 3] [--loop-mib 32] [--keep-mib 16] [--dwell 0.2]
  churn.py status | info | check [--timeout 120]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .mempattern import Region

DEFAULT_DIR = "/run/fphint-churn"


def _write_json(path: Path, obj: object) -> None:
    """Atomic: readers never see half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# Section: worker


class Worker:
    def __init__(self, wid: int, state: Path, loop_mib: int, keep_mib: int, dwell: float) -> None:
        self.wid = wid
        self.state = state
        self.loop_len = loop_mib << 20
        self.keep_len = keep_mib << 20
        self.dwell = dwell
        self.stop = False
        self.iterations = 0
        self.bytes_verified = 0
        self.keep_seed = f"keep/{wid}/{os.getpid()}"

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop = True

    def result(self, errors: list[dict[str, object]], keep_bad: int) -> dict[str, object]:
        return {
            "id": self.wid,
            "pid": os.getpid(),
            "iterations": self.iterations,
            "bytes_verified": self.bytes_verified,
            "keep_bad_pages": keep_bad,
            "errors": errors,
        }

    def run(self) -> int:
        signal.signal(signal.SIGUSR1, self._on_stop)
        signal.signal(signal.SIGTERM, self._on_stop)
        keep = Region(self.keep_len)
        keep.no_huge_pages()
        keep.fill(self.keep_seed)
        bad, pages = keep.check(self.keep_seed)
        if bad:
            errors = [{"where": "keep, before the loop", **p.as_dict()} for p in pages]
            _write_json(self.state / f"result-{self.wid}.json", self.result(errors, bad))
            return 3
        _write_json(
            self.state / f"ready-{self.wid}.json",
            {
                "id": self.wid,
                "pid": os.getpid(),
                "keep_addr": keep.address(),
                "keep_len": self.keep_len,
                "keep_seed": self.keep_seed,
            },
        )
        while not self.stop:
            seed = f"loop/{self.wid}/{os.getpid()}/{self.iterations}"
            region = Region(self.loop_len)
            region.fill(seed)
            time.sleep(self.dwell)
            bad, pages = region.check(seed)
            region.free()
            if bad:
                errors = [{"where": f"loop iteration {self.iterations}", **p.as_dict()} for p in pages]
                errors.append({"where": f"loop iteration {self.iterations}", "bad_pages": bad})
                _write_json(self.state / f"result-{self.wid}.json", self.result(errors, 0))
                return 3
            self.iterations += 1
            self.bytes_verified += self.loop_len
            _write_json(self.state / f"progress-{self.wid}.json", {"iterations": self.iterations})
        bad, pages = keep.check(self.keep_seed)
        self.bytes_verified += self.keep_len
        errors = [{"where": "keep", **p.as_dict()} for p in pages]
        _write_json(self.state / f"result-{self.wid}.json", self.result(errors, bad))
        keep.free()
        return 3 if bad else 0


# Section: commands


def cmd_start(args: argparse.Namespace) -> int:
    state = Path(args.dir)
    if state.exists() and any(_alive(w["pid"]) for w in _workers(state)):
        print(f"churn.py: error: workers of an earlier run still live in {state}; use check first", file=sys.stderr)
        return 2
    state.mkdir(parents=True, exist_ok=True)
    for old in state.iterdir():
        old.unlink()
    for wid in range(args.workers):
        log = open(state / f"worker-{wid}.log", "wb")
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                __spec__.name,
                "--dir",
                str(state),
                "worker",
                str(wid),
                str(args.loop_mib),
                str(args.keep_mib),
                str(args.dwell),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
    deadline = time.monotonic() + args.timeout
    while True:
        ready = [_read_json(state / f"ready-{w}.json") for w in range(args.workers)]
        failed = [_read_json(state / f"result-{w}.json") for w in range(args.workers)]
        if any(failed):
            print(json.dumps({"ok": False, "errors": [f for f in failed if f]}))
            return 1
        if all(ready):
            print(json.dumps({"ok": True, "workers": ready}))
            return 0
        if time.monotonic() > deadline:
            print(json.dumps({"ok": False, "errors": [f"workers not ready after {args.timeout} s"]}))
            return 1
        time.sleep(0.1)


def _workers(state: Path) -> list[dict[str, Any]]:
    found = [_read_json(p) for p in sorted(state.glob("ready-*.json"))]
    return [w for w in found if w]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmd_status(args: argparse.Namespace) -> int:
    state = Path(args.dir)
    out = []
    for w in _workers(state):
        progress = _read_json(state / f"progress-{w['id']}.json") or {"iterations": 0}
        result = _read_json(state / f"result-{w['id']}.json")
        out.append({"id": w["id"], "pid": w["pid"], "alive": _alive(w["pid"]),
                    "iterations": progress["iterations"], "finished": result is not None})  # fmt: skip
    print(json.dumps({"workers": out}))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps({"workers": _workers(Path(args.dir))}))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    state = Path(args.dir)
    workers = _workers(state)
    if not workers:
        print(json.dumps({"ok": False, "errors": [f"no churn workers in {state}"]}))
        return 1
    for w in workers:
        if _alive(w["pid"]):
            os.kill(w["pid"], signal.SIGUSR1)
    deadline = time.monotonic() + args.timeout
    results: dict[int, Any] = {}
    problems: list[str] = []
    while len(results) + len(problems) < len(workers):
        for w in workers:
            wid = w["id"]
            if wid in results or any(s.startswith(f"worker {wid}:") for s in problems):
                continue
            r = _read_json(state / f"result-{wid}.json")
            if r is not None:
                results[wid] = r
            elif not _alive(w["pid"]):
                problems.append(f"worker {wid}: pid {w['pid']} died without a result (see worker-{wid}.log)")
        if time.monotonic() > deadline:
            problems.append(f"workers without a result after {args.timeout} s")
            break
        time.sleep(0.1)
    ordered = [results[k] for k in sorted(results)]
    ok = not problems and all(not r["errors"] and r["keep_bad_pages"] == 0 for r in ordered)
    print(json.dumps({"ok": ok, "problems": problems, "workers": ordered}))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=DEFAULT_DIR, help="state directory")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start workers; return when their keep regions are written")
    s.add_argument("--workers", type=int, default=3)
    s.add_argument("--loop-mib", type=int, default=32)
    s.add_argument("--keep-mib", type=int, default=16)
    s.add_argument("--dwell", type=float, default=0.2, help="seconds between writing and verifying")
    s.add_argument("--timeout", type=float, default=120.0)
    sub.add_parser("status", help="progress of every worker")
    sub.add_parser("info", help="pid and keep region of every worker")
    c = sub.add_parser("check", help="stop workers, verify keep regions, report")
    c.add_argument("--timeout", type=float, default=120.0)
    w = sub.add_parser("worker")  # internal
    w.add_argument("wid", type=int)
    w.add_argument("loop_mib", type=int)
    w.add_argument("keep_mib", type=int)
    w.add_argument("dwell", type=float)
    args = p.parse_args(argv)
    if args.cmd == "start":
        if args.workers < 1 or args.loop_mib < 1 or args.keep_mib < 1:
            p.error("--workers, --loop-mib and --keep-mib must be positive")
        return cmd_start(args)
    if args.cmd == "worker":
        return Worker(args.wid, Path(args.dir), args.loop_mib, args.keep_mib, args.dwell).run()
    return {"status": cmd_status, "info": cmd_info, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
