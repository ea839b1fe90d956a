"""Fill N MiB with a non-zero pattern, verify it, and free it.

Leaves N MiB of non-zero garbage in the guest's free memory: exactly the
pages a free-page-aware migration may skip. Prints one JSON object; exit
status 1 if the memory did not read back as written.

Run as ``python3 -m fphint_lab.guest.fill``.

usage: fill.py MIB [--seed SEED] [--hold SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .mempattern import PAGE, Region


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mib", type=int, help="MiB to fill (whole pages)")
    p.add_argument("--seed", default=f"fill-{os.getpid()}", help="pattern seed")
    p.add_argument("--hold", type=float, default=0.0, help="seconds to keep the memory before freeing it")
    args = p.parse_args(argv)
    if args.mib <= 0:
        p.error("MIB must be positive")
    t0 = time.monotonic()
    region = Region(args.mib << 20)
    region.fill(args.seed)
    if args.hold:
        time.sleep(args.hold)
    bad, pages = region.check(args.seed)
    region.free()
    print(
        json.dumps(
            {
                "mib": args.mib,
                "pages": (args.mib << 20) // PAGE,
                "bad_pages": bad,
                "bad": [b.as_dict() for b in pages],
                "seconds": round(time.monotonic() - t0, 3),
            }
        )
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
