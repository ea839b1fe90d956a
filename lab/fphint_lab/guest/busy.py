"""A busy guest for migration benchmarks: its vCPU saturated by memory churn,
page-cache churn and forks, every byte it keeps verified afterwards.

``start`` launches, each in its own session (they outlive the serial shell's
command):

* anonymous churn: ``churn.py`` workers with no dwell (map, fill, verify,
  unmap, as fast as the vCPU goes), each with a keep region;
* tmpfs churn: a worker that writes a file of a pattern unique to each
  iteration into a tmpfs directory, reads it back, checks it and deletes it,
  beside a keep file written once;
* page-cache churn: a worker that drops the page cache
  (``echo 1 > /proc/sys/vm/drop_caches``) and reads a fixed set of files back
  in, comparing their SHA-256 to the first round's;
* forks: a worker that forks short-lived children (half of them exec
  /bin/true, half touch a little memory and exit) and counts failures.

``check`` (on the migration destination) stops them all, lets the churn
workers verify their keep regions and the tmpfs worker its keep file, and
prints one JSON object, shaped like ``churn.py check``'s (``ok``,
``problems``, ``workers``) plus the other workers' results; exit 1 if any
byte was wrong or any worker died. ``status`` prints progress.

Run as ``python3 -m fphint_lab.guest.busy``.

usage:
  busy.py [--dir D] [--churn-dir D] start [--anon-workers 2] [--anon-mib 64] [--keep-mib 16] [--tmpfs-mib 64]
                [--tmpfs-keep-mib 16] [--cache-mib 32] [--drop-every 1.0] [--no-drop] [--forkers 1]
  busy.py status | check [--timeout 180]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .mempattern import CHUNK, PAGE, Stripe

DEFAULT_DIR = "/run/fphint-busy"
#: Where the churn.py workers keep their state (their own default).
CHURN_DIR = "/run/fphint-churn"
TMPFS_DIR = "/dev/shm/fphint-busy"
#: Files the page-cache worker reads back after each drop (any stable set works).
CACHE_ROOTS = ("/usr/lib/python3.11", "/usr/lib/x86_64-linux-gnu", "/usr/bin")
KINDS = ("tmpfs", "cache", "fork")


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class _Stoppable:
    """A worker loop that ends after its current step on SIGUSR1/SIGTERM."""

    def __init__(self, state: Path, kind: str) -> None:
        self.state = state
        self.kind = kind
        self.stop = False
        self.steps = 0
        self.errors: list[dict[str, object]] = []
        self._shown = 0.0
        signal.signal(signal.SIGUSR1, self._on_stop)
        signal.signal(signal.SIGTERM, self._on_stop)

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop = True

    def ready(self, **info: object) -> None:
        _write_json(self.state / f"ready-{self.kind}.json", {"kind": self.kind, "pid": os.getpid(), **info})

    def progress(self) -> None:
        """Written at most twice a second (the fork loop steps fast)."""
        now = time.monotonic()
        if now - self._shown >= 0.5:
            self._shown = now
            _write_json(self.state / f"progress-{self.kind}.json", {"steps": self.steps})

    def finish(self, **info: object) -> int:
        _write_json(
            self.state / f"result-{self.kind}.json",
            {"kind": self.kind, "pid": os.getpid(), "steps": self.steps, "errors": self.errors, **info},
        )
        return 3 if self.errors else 0


# Section: tmpfs churn


def _write_pattern(path: Path, seed: str, length: int) -> None:
    stripe = Stripe(seed)
    with path.open("wb") as f:
        for lo in range(0, length, CHUNK):
            f.write(stripe.at(lo, min(CHUNK, length - lo)))


def _check_pattern(path: Path, seed: str, length: int) -> tuple[int, int]:
    """(bad pages, of which all zero) of a pattern file."""
    stripe = Stripe(seed)
    bad = zero = 0
    with path.open("rb") as f:
        for lo in range(0, length, CHUNK):
            n = min(CHUNK, length - lo)
            got = f.read(n)
            want = stripe.at(lo, n)
            if got == want:
                continue
            for p in range(0, n, PAGE):
                page = got[p : p + PAGE]
                if page != want[p : p + PAGE]:
                    bad += 1
                    zero += page.count(0) == len(page)
    return bad, zero


def run_tmpfs(state: Path, directory: Path, loop_mib: int, keep_mib: int) -> int:
    w = _Stoppable(state, "tmpfs")
    directory.mkdir(parents=True, exist_ok=True)
    keep, keep_seed, keep_len = directory / f"keep-{os.getpid()}", f"tmpfs-keep/{os.getpid()}", keep_mib << 20
    loop_len = loop_mib << 20
    _write_pattern(keep, keep_seed, keep_len)
    bad, zero = _check_pattern(keep, keep_seed, keep_len)
    if bad:
        w.errors.append({"where": "tmpfs keep file, before the loop", "bad_pages": bad, "zero_pages": zero})
        return w.finish()
    w.ready(keep=str(keep), keep_len=keep_len)
    verified = 0
    while not w.stop:
        path = directory / f"loop-{os.getpid()}-{w.steps}"
        seed = f"tmpfs-loop/{os.getpid()}/{w.steps}"
        _write_pattern(path, seed, loop_len)
        bad, zero = _check_pattern(path, seed, loop_len)
        path.unlink()
        if bad:
            w.errors.append({"where": f"tmpfs loop file {w.steps}", "bad_pages": bad, "zero_pages": zero})
            break
        verified += loop_len
        w.steps += 1
        w.progress()
    bad, zero = _check_pattern(keep, keep_seed, keep_len)
    keep.unlink()
    if bad:
        w.errors.append({"where": "tmpfs keep file", "bad_pages": bad, "zero_pages": zero})
    return w.finish(bytes_verified=verified + keep_len, keep_bad_pages=bad)


# Section: page-cache churn


def cache_files(limit_bytes: int, roots: tuple[str, ...] = CACHE_ROOTS) -> list[Path]:
    """A stable list of regular files under ``roots`` adding up to about ``limit_bytes``."""
    out: list[Path] = []
    total = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                try:
                    if p.is_symlink() or not p.is_file():
                        continue
                    size = p.stat().st_size
                except OSError:
                    continue
                if size == 0:
                    continue
                out.append(p)
                total += size
                if total >= limit_bytes:
                    return out
    return out


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def drop_caches() -> bool:
    """``echo 1 > /proc/sys/vm/drop_caches`` (False where not allowed)."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def run_cache(state: Path, cache_mib: int, every: float, drop: bool = True) -> int:
    w = _Stoppable(state, "cache")
    files = cache_files(cache_mib << 20)
    reference = {p: _digest(p) for p in files}
    w.ready(files=len(files), bytes=sum(p.stat().st_size for p in files))
    drops = 0
    while not w.stop:
        drops += drop and drop_caches()
        for p in files:
            if w.stop:
                break
            if _digest(p) != reference[p]:
                w.errors.append({"where": f"page cache round {w.steps}", "file": str(p)})
        if w.errors:
            break
        w.steps += 1
        w.progress()
        time.sleep(every)
    return w.finish(drops=drops, files=len(files))


# Section: forks


def run_fork(state: Path) -> int:
    """Fork short-lived children as fast as they go; count the failures."""
    w = _Stoppable(state, "fork")
    w.ready()
    failures = 0
    while not w.stop:
        if w.steps % 2:
            rc = subprocess.run(["/bin/true"], stdin=subprocess.DEVNULL).returncode
        else:
            pid = os.fork()
            if pid == 0:
                buf = bytearray(256 << 10)  # touch a little memory, then go
                buf[::PAGE] = b"\x5a" * len(buf[::PAGE])
                os._exit(0 if buf[PAGE] == 0x5A else 1)
            rc = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if rc != 0:
            failures += 1
            if len(w.errors) < 8:
                w.errors.append({"where": f"fork {w.steps}", "exit": rc})
        w.steps += 1
        w.progress()
    return w.finish(forks=w.steps, failures=failures)


# Section: commands


def _spawn(state: Path, *args: str) -> None:
    with open(state / f"worker-{args[0]}.log", "wb") as log:
        subprocess.Popen(
            [sys.executable, "-m", __spec__.name, "--dir", str(state), "worker", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _churn(churn_dir: str, *args: str, timeout: float) -> dict[str, Any]:
    """``churn.py ARGS`` in a child; its JSON answer."""
    module = __spec__.name.rsplit(".", 1)[0] + ".churn"
    out = subprocess.run(
        [sys.executable, "-m", module, "--dir", churn_dir, *args], capture_output=True, text=True, timeout=timeout + 30
    )
    lines = out.stdout.strip().splitlines()
    try:
        answer: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"ok": False, "problems": [f"churn.py {args[0]}: exit {out.returncode}: {out.stderr[-500:]}"]}
    return answer


def cmd_start(args: argparse.Namespace) -> int:
    state = Path(args.dir)
    if state.exists() and any(_alive(w["pid"]) for w in _ready(state)):
        print(f"busy.py: error: workers of an earlier run still live in {state}; use check first", file=sys.stderr)
        return 2
    state.mkdir(parents=True, exist_ok=True)
    for old in state.iterdir():
        old.unlink()
    churn = _churn(
        args.churn_dir,
        "start",
        "--workers",
        str(args.anon_workers),
        "--loop-mib",
        str(args.anon_mib),
        "--keep-mib",
        str(args.keep_mib),
        "--dwell",
        "0",
        "--timeout",
        str(args.timeout),
        timeout=args.timeout,
    )
    if not churn.get("ok"):
        print(json.dumps({"ok": False, "problems": ["anonymous churn did not start"], "churn": churn}))
        return 1
    _spawn(state, "tmpfs", args.tmpfs_dir, str(args.tmpfs_mib), str(args.tmpfs_keep_mib))
    _spawn(state, "cache", str(args.cache_mib), str(args.drop_every), "0" if args.no_drop else "1")
    for _ in range(args.forkers):
        _spawn(state, "fork")
    deadline = time.monotonic() + args.timeout
    while True:
        ready = {k: _read_json(state / f"ready-{k}.json") for k in KINDS}
        failed = [r for k in KINDS if (r := _read_json(state / f"result-{k}.json"))]
        if failed or time.monotonic() > deadline:
            problems = [f"{k} worker not ready after {args.timeout} s" for k, r in ready.items() if not r]
            print(json.dumps({"ok": False, "problems": problems, "failed": failed}))
            return 1
        if all(ready.values()):
            print(json.dumps({"ok": True, "anon": churn.get("workers", []), **ready}))
            return 0
        time.sleep(0.1)


def _ready(state: Path) -> list[dict[str, Any]]:
    found = [_read_json(p) for p in sorted(state.glob("ready-*.json"))]
    return [w for w in found if w]


def cmd_status(args: argparse.Namespace) -> int:
    state = Path(args.dir)
    out = {
        w["kind"]: {
            "pid": w["pid"],
            "alive": _alive(w["pid"]),
            "steps": (_read_json(state / f"progress-{w['kind']}.json") or {"steps": 0})["steps"],
        }
        for w in _ready(state)
    }
    print(json.dumps({"workers": out, "churn": _churn(args.churn_dir, "status", timeout=30)}))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    state = Path(args.dir)
    workers = _ready(state)
    problems: list[str] = []
    if len(workers) < len(KINDS):
        problems.append(f"only {len(workers)} of {len(KINDS)} busy workers ever started in {state}")
    for w in workers:
        if _alive(w["pid"]):
            os.kill(w["pid"], signal.SIGUSR1)
    churn = _churn(args.churn_dir, "check", "--timeout", str(args.timeout), timeout=args.timeout)
    deadline = time.monotonic() + args.timeout
    results: dict[str, Any] = {}
    pending = {w["kind"]: w for w in workers}
    while pending:
        for kind, w in list(pending.items()):
            r = _read_json(state / f"result-{kind}.json")
            if r is not None:
                results[kind] = r
                del pending[kind]
            elif not _alive(w["pid"]):
                problems.append(f"{kind} worker pid {w['pid']} died without a result (see worker-{kind}.log)")
                del pending[kind]
        if pending and time.monotonic() > deadline:
            problems.append(f"busy workers without a result after {args.timeout} s: {sorted(pending)}")
            break
        time.sleep(0.1)
    for kind, r in results.items():
        problems += [f"{kind} worker: {e}" for e in r.get("errors", [])]
    problems += [f"anonymous churn: {p}" for p in churn.get("problems", [])]
    ok = bool(churn.get("ok")) and not problems
    print(json.dumps({"ok": ok, "problems": problems, "workers": churn.get("workers", []), "busy": results}))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=DEFAULT_DIR, help="state directory")
    p.add_argument("--churn-dir", default=CHURN_DIR, help="the anonymous churn workers' state directory")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start every worker; return when all are ready")
    s.add_argument("--anon-workers", type=int, default=2)
    s.add_argument("--anon-mib", type=int, default=64, help="MiB each anonymous worker churns")
    s.add_argument("--keep-mib", type=int, default=16, help="MiB each anonymous worker keeps")
    s.add_argument("--tmpfs-dir", default=TMPFS_DIR)
    s.add_argument("--tmpfs-mib", type=int, default=64, help="MiB of each tmpfs file written, checked, deleted")
    s.add_argument("--tmpfs-keep-mib", type=int, default=16)
    s.add_argument("--cache-mib", type=int, default=32, help="MiB of files read back after each cache drop")
    s.add_argument("--drop-every", type=float, default=1.0, help="seconds between page-cache drops")
    s.add_argument(
        "--no-drop", action="store_true", help="read the files back but never drop the cache (for trying it on a host)"
    )
    s.add_argument("--forkers", type=int, default=1)
    s.add_argument("--timeout", type=float, default=180.0)
    sub.add_parser("status", help="progress of every worker")
    c = sub.add_parser("check", help="stop every worker, verify, report")
    c.add_argument("--timeout", type=float, default=180.0)
    w = sub.add_parser("worker")  # internal
    w.add_argument("kind", choices=KINDS)
    w.add_argument("params", nargs="*")
    args = p.parse_args(argv)
    if args.cmd == "start":
        sizes = (args.anon_workers, args.anon_mib, args.keep_mib, args.tmpfs_mib, args.tmpfs_keep_mib, args.cache_mib)
        if min(sizes) < 1 or args.forkers < 0 or args.drop_every < 0:
            p.error("worker counts and sizes must be positive")
        return cmd_start(args)
    if args.cmd == "worker":
        state = Path(args.dir)
        if args.kind == "tmpfs":
            return run_tmpfs(state, Path(args.params[0]), int(args.params[1]), int(args.params[2]))
        if args.kind == "cache":
            return run_cache(state, int(args.params[0]), float(args.params[1]), args.params[2] == "1")
        return run_fork(state)
    return {"status": cmd_status, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
