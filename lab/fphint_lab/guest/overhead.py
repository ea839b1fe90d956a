"""Fixed workloads whose time shows what a free-page scheme costs a guest in
steady state (bench/guest_overhead.py runs them under each scheme).

* ``alloc``: allocate, touch and free memory in a loop (ROUNDS maps of MIB
  MiB, huge pages off for them, one write per page, unmap): every 4 KiB page
  is allocated, faulted in and freed again (with THP "always", Debian's
  default, a 2 MiB fault would hide 511 of them), so init_on_free's zeroing, free-page reporting's discards
  (and the faults that bring the pages back) and an agent's allocation/free
  tracepoints all show up here.
* ``forkexec``: a page-fault-heavy process mix: COUNT times, fork a child
  that touches CHILD_KIB of fresh memory and exits, and spawn /bin/true.

Each prints one JSON object: wall seconds (monotonic), and the CPU seconds
of this process and its children.

Run as ``python3 -m fphint_lab.guest.overhead``.

usage: overhead.py alloc [--rounds 8] [--mib 32] | forkexec [--count 150] [--child-kib 512]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import time

PAGE = 4096
TOUCH = b"\x5a"


def alloc(rounds: int, mib: int) -> dict[str, object]:
    length = mib << 20
    touched = 0
    for _ in range(rounds):
        m = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_NOHUGEPAGE)
        for off in range(0, length, PAGE):
            m[off] = 0x5A
        touched += length // PAGE
        if m[length - PAGE] != 0x5A:
            raise RuntimeError("a touched page does not hold what was written")
        m.close()
    return {"pages_touched": touched}


def forkexec(count: int, child_kib: int) -> dict[str, object]:
    failures = 0
    size = child_kib << 10
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            buf = bytearray(size)
            buf[::PAGE] = TOUCH * len(buf[::PAGE])
            os._exit(0 if buf[0] == 0x5A else 1)
        failures += os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0
        failures += subprocess.run(["/bin/true"], stdin=subprocess.DEVNULL).returncode != 0
    return {"processes": 2 * count, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("alloc", help="allocate, touch, free in a loop")
    a.add_argument("--rounds", type=int, default=8)
    a.add_argument("--mib", type=int, default=32)
    f = sub.add_parser("forkexec", help="fork children that touch memory, spawn /bin/true")
    f.add_argument("--count", type=int, default=150)
    f.add_argument("--child-kib", type=int, default=512)
    args = p.parse_args(argv)
    if min(vars(args).get(k, 1) for k in ("rounds", "mib", "count", "child_kib")) < 1:
        p.error("counts and sizes must be positive")
    t0, c0 = time.monotonic(), os.times()
    facts = alloc(args.rounds, args.mib) if args.cmd == "alloc" else forkexec(args.count, args.child_kib)
    t1, c1 = time.monotonic(), os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    children = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    print(
        json.dumps(
            {
                "workload": args.cmd,
                "seconds": round(t1 - t0, 4),
                "cpu_s": round(cpu, 3),
                "children_cpu_s": round(children, 3),
                **facts,
            }
        )
    )
    return 1 if facts.get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
