"""The base layer: a configured Debian 12 rootfs directory plus its kernel.

Everything slow and independent of this repository's Python code happens
here, once per base key: debootstrap, the kernel and its matching headers,
bcc, the small initrd, systemd configuration, and the /opt/fphint venv with
the agent's pinned dependencies (installed from a wheelhouse fetched on the
host, so the chroot needs no DNS for pip and no host pip settings leak in).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .keys import Digest, iter_tree
from .run import CHROOT_ENV, BuildError, BuildLog, chroot_argv, write_new

VMIMAGES = Path(__file__).resolve().parents[1]

#: Where the agent's venv lives in the guest (python3 -m venv --system-site-packages,
#: so Debian's python3-bpfcc is importable next to the pinned grpcio/protobuf).
AGENT_VENV = "/opt/fphint"

#: Units enabled in the guest: static networking and the harness's shell on ttyS1.
ENABLE_UNITS = ("systemd-networkd.service", "serial-getty@ttyS1.service")

#: Units masked in the guest: timers that would touch apt or the disk mid-test,
#: the wait for a network that is static anyway, and gettys nobody uses (the
#: kernel console on ttyS0 is a log, not a login).
MASK_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
    "systemd-networkd-wait-online.service",
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
)


@dataclass(frozen=True)
class BaseSpec:
    """The inputs of the base layer (the mirror is transport, not an input)."""

    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    #: Installed by debootstrap (minbase variant).
    bootstrap: tuple[str, ...] = ("systemd-sysv", "udev", "kmod", "iproute2", "procps", "python3")
    #: Installed in one apt-get call afterwards, so the kernel and its headers
    #: come from the same package index.
    packages: tuple[str, ...] = (
        "linux-image-amd64",
        "linux-headers-amd64",
        "python3-bpfcc",
        "python3-venv",
    )
    requirements: Path = field(default=VMIMAGES / "requirements-guest.txt")
    overlay: Path = field(default=VMIMAGES / "overlay")

    def key(self) -> str:
        d = Digest("base")
        d.add_text("suite", self.suite)
        d.add_text("bootstrap", " ".join(self.bootstrap))
        d.add_text("packages", " ".join(self.packages))
        d.add_text("enable", " ".join(ENABLE_UNITS))
        d.add_text("mask", " ".join(MASK_UNITS))
        d.add_file("requirements", self.requirements)
        d.add_tree("overlay", self.overlay)
        d.add_file("base.py", Path(__file__))
        d.add_file("run.py", Path(__file__).with_name("run.py"))
        return d.key()


def build_base(spec: BaseSpec, key: str, work: Path, log: BuildLog) -> dict[str, object]:
    """Build the base layer into ``work`` (rootfs/, vmlinuz, initrd.img).

    :return: facts for the manifest (kernel version, pinned Python packages).
    :raise BuildError: naming the step that failed.
    """
    root = work / "rootfs"
    with log.step("debootstrap"):
        log.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--arch=amd64",
                "--components=main",
                "--include=" + ",".join(spec.bootstrap),
                spec.suite,
                str(root),
                spec.mirror,
            ],
            timeout=3600,
        )
    with log.step("configure rootfs"):
        _copy_overlay(spec.overlay, root)
        write_new(root / "usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", mode=0o755)
        shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf", follow_symlinks=True)
        write_new(root / "etc/machine-id", hashlib.sha256(key.encode()).hexdigest()[:32] + "\n", mode=0o444)
    with log.step("apt-get install kernel, headers, bcc"):
        apt = ["apt-get", "-q", "-y", "-o", "Dpkg::Use-Pty=0"]
        log.run(chroot_argv(root, [*apt, "update"]), env=CHROOT_ENV, timeout=1800)
        log.run(
            chroot_argv(root, [*apt, "install", "--no-install-recommends", *spec.packages]),
            env=CHROOT_ENV,
            timeout=3600,
        )
    kernel = _check_kernel(root)
    with log.step("agent venv with pinned dependencies"):
        pins = _install_venv(spec, root, log)
    with log.step("systemd units"):
        systemctl = ["systemctl", "--no-reload", "--quiet"]
        log.run(chroot_argv(root, [*systemctl, "enable", *ENABLE_UNITS]), env=CHROOT_ENV)
        log.run(chroot_argv(root, [*systemctl, "mask", *MASK_UNITS]), env=CHROOT_ENV)
        log.run(chroot_argv(root, [*systemctl, "set-default", "multi-user.target"]), env=CHROOT_ENV)
    with log.step("clean up"):
        log.run(chroot_argv(root, ["apt-get", "clean"]), env=CHROOT_ENV)
        _empty_dir(root / "var/lib/apt/lists")
        _empty_dir(root / "tmp")
        (root / "usr/sbin/policy-rc.d").unlink()
        # The guest does no DNS: its only peer is the host's loopback (10.0.2.2).
        write_new(root / "etc/resolv.conf", "", mode=0o644)
        shutil.copyfile(root / f"boot/vmlinuz-{kernel}", work / "vmlinuz")
        shutil.copyfile(root / f"boot/initrd.img-{kernel}", work / "initrd.img")
        packages = log.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package} ${Version}\n"])
        (work / "packages.txt").write_text(packages)
    return {
        "kernel_version": kernel,
        "python_pins": pins,
        "packages": len(packages.splitlines()),
        "initrd_bytes": (work / "initrd.img").stat().st_size,
    }


def _copy_overlay(overlay: Path, root: Path) -> None:
    """Copy the overlay tree into the rootfs, root-owned, 0755 or 0644."""
    for src in iter_tree(overlay):
        dst = root / src.relative_to(overlay)
        dst.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o755 if src.stat().st_mode & 0o111 else 0o644
        write_new(dst, src.read_bytes(), mode=mode)


def _empty_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _check_kernel(root: Path) -> str:
    """The one installed kernel version, which must have its headers.

    bcc compiles against /lib/modules/$(uname -r)/build; a kernel without
    matching headers would only fail later, inside a guest, under TCG.
    """
    versions = sorted(p.name for p in (root / "lib/modules").iterdir())
    if len(versions) != 1:
        raise BuildError(f"expected exactly one kernel in the rootfs, found {versions}")
    version = versions[0]
    build = root / "lib/modules" / version / "build"
    if not build.is_symlink():
        raise BuildError(f"kernel {version} has no headers (no /lib/modules/{version}/build)")
    target = root / os.readlink(build).lstrip("/")
    if not (target / "Makefile").is_file() or not (target / ".config").is_file():
        raise BuildError(f"headers of kernel {version} are incomplete at {target}")
    for name in (f"boot/vmlinuz-{version}", f"boot/initrd.img-{version}"):
        if not (root / name).is_file():
            raise BuildError(f"missing /{name} in the rootfs")
    return version


def _install_venv(spec: BaseSpec, root: Path, log: BuildLog) -> dict[str, str]:
    """Create /opt/fphint and install the pinned wheels into it; check imports."""
    if sys.version_info[:2] != (3, 11):
        raise BuildError(
            f"the builder must run on Python 3.11 (the guest's), not {sys.version.split()[0]}: "
            "it downloads the guest's binary wheels for its own interpreter"
        )
    wheelhouse = root / "tmp/wheelhouse"
    wheelhouse.mkdir(parents=True)
    shutil.copyfile(spec.requirements, wheelhouse / "requirements.txt")
    log.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--no-deps",
            "-d",
            str(wheelhouse),
            "-r",
            str(spec.requirements),
        ]
    )
    py = f"{AGENT_VENV}/bin/python"
    log.run(chroot_argv(root, ["python3", "-m", "venv", "--system-site-packages", AGENT_VENV]), env=CHROOT_ENV)
    log.run(
        chroot_argv(
            root,
            [
                py,
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-cache-dir",
                "--no-index",
                "--no-deps",
                "--find-links",
                "/tmp/wheelhouse",
                "-r",
                "/tmp/wheelhouse/requirements.txt",
            ],
        ),
        env=CHROOT_ENV,
    )
    probe = (
        "import json, importlib.metadata as m, bcc, grpc, google.protobuf;"
        "print(json.dumps({n: m.version(n) for n in ('grpcio', 'protobuf', 'typing_extensions')}))"
    )
    out = log.run(chroot_argv(root, [py, "-c", probe]), env=CHROOT_ENV)
    versions: dict[str, str] = json.loads(out.strip().splitlines()[-1])
    wanted = _pins(spec.requirements)
    got = {k.replace("_", "-"): v for k, v in versions.items()}
    if got != wanted:
        raise BuildError(f"agent venv has {got}, requirements pin {wanted}")
    return got


def _pins(requirements: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise BuildError(f"{requirements}: {line!r} is not pinned with ==")
        pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins
