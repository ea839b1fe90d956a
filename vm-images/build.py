#!/usr/bin/python3
"""Build (or find in the cache) the fphint test guest image.

Run as root on Debian 12 (debootstrap, chroot, mkfs.ext4). The first build
takes a few minutes; a second one with unchanged inputs returns at once, and
one after an agent change only redoes the final layer (seconds).

``vmimage`` is found beside this script (Python puts a script's directory
first on its path); the dev venv also has it installed, by the lab
(lab/pyproject.toml), for the harness.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from vmimage import cache as cache_mod
from vmimage.accel import AccelError, choose
from vmimage.builder import Image, ensure_image, keys
from vmimage.final import ImageSpec
from vmimage.qemu import Endpoints, GuestConfig, collector_address, default_binary, qemu_argv
from vmimage.run import BuildError

EXAMPLES = """\
examples:
  vm-images/build.py                 build or reuse; last line is JSON with the paths
  vm-images/build.py --show-command  the QEMU command lines of a source and a destination
  vm-images/build.py --rebuild image redo only the final layer (wheel + mkfs)
"""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vm-images/build.py",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cache", type=Path, help=f"cache directory (default: ${cache_mod.CACHE_ENV}, "
                   f"{cache_mod.SYSTEM_CACHE} as root, else vm-images/cache)")  # fmt: skip
    p.add_argument("--rebuild", choices=("base", "image"), help="rebuild this layer even if cached")
    p.add_argument("--show-command", action="store_true",
                   help="print the QEMU command lines for this image and exit (builds nothing)")  # fmt: skip
    p.add_argument("--keys", action="store_true", help="print the cache keys and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log every build step")
    return p


def show_command(cache: Path) -> None:
    k = keys()
    image_dir = cache_mod.entry(cache, "image", k.image)
    if not (image_dir / "manifest.json").is_file():
        print(f"# note: image {k.image} is not built yet; run vm-images/build.py first", file=sys.stderr)
    run = Path("/tmp/fphvm-example")
    overlay = run / "disk.qcow2"
    print("# a per-run overlay keeps the cached image clean:")
    print(shlex.join(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                      "-b", str(image_dir / "rootfs.raw"), str(overlay)]))  # fmt: skip
    guest = GuestConfig(
        kernel=image_dir / "vmlinuz",
        initrd=image_dir / "initrd.img",
        disk=overlay,
        token="TOKEN",
        collector=collector_address(50051),
    )
    # The accelerator every lab guest gets ($FPH_ACCEL; probed once per host boot).
    accel = choose(default_binary(), guest.kernel)
    print(f"# accelerator: {accel.describe()}")
    for name, incoming in (("src", False), ("dst", True)):
        ep = Endpoints(
            name=name,
            mem_path=Path(f"/dev/shm/fphvm-example-{name}.ram"),
            qmp=run / f"{name}.qmp",
            shell=run / f"{name}.shell",
            shell_log=run / f"{name}.shell.log",
            console_log=run / f"{name}.console.log",
            incoming=incoming,
            paused=incoming,
        )
        print(f"# {'destination (then QMP migrate-incoming)' if incoming else 'source'}:")
        print(" \\\n    ".join(_argv_lines(qemu_argv(guest, ep, accel=accel))))


def _argv_lines(argv: list[str]) -> list[str]:
    """Group '-opt value' pairs onto one line each, shell-quoted."""
    lines: list[str] = [shlex.quote(argv[0])]
    i = 1
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            lines.append(f"{shlex.quote(argv[i])} {shlex.quote(argv[i + 1])}")
            i += 2
        else:
            lines.append(shlex.quote(argv[i]))
            i += 1
    return lines


def summary(image: Image) -> dict[str, object]:
    return {
        "key": image.key,
        "base_key": image.base_key,
        "built": list(image.built),
        "disk": str(image.disk),
        "kernel": str(image.kernel),
        "initrd": str(image.initrd),
        "kernel_version": image.kernel_version,
    }


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    cache = args.cache or cache_mod.default_cache_dir(ImageSpec().repo)
    if args.keys:
        k = keys()
        print(json.dumps({"base_key": k.base, "key": k.image, "cache": str(cache)}))
        return 0
    if args.show_command:
        try:
            show_command(cache)
        except AccelError as exc:
            print(f"vm-images/build.py: error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        image = ensure_image(cache=cache, rebuild=args.rebuild)
    except (BuildError, cache_mod.CacheLockTimeout) as exc:
        print(f"vm-images/build.py: error: {exc}", file=sys.stderr)
        return 1
    for layer, steps in (("base", image.manifest["base"]), ("image", image.manifest)):
        if layer in image.built and isinstance(steps, dict):
            for title, seconds in steps.get("timings", []):
                print(f"  {layer}: {title}: {seconds} s")
    print(json.dumps(summary(image)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
