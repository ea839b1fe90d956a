"""The final layer: base rootfs + this repository's agent -> a raw ext4 image.

Cheap on purpose (a few seconds), because it reruns whenever agent code
changes: build the ``fphint`` wheel from a copy of exactly the hashed
sources, hard-link the base rootfs into a stage (new files only are written
there, each as a new inode, so the cached base is never modified), pip-install
the wheel into /opt/fphint with ``--no-deps`` (its dependencies are pinned in
the base), install and enable the agent's unit, install the in-guest
workloads (the lab's package ``fphint_lab.guest``) into the guest python3's
site directory, and pack it all with ``mkfs.ext4 -d`` (no loop mount).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .base import AGENT_VENV, VMIMAGES
from .keys import Digest, iter_tree
from .run import CHROOT_ENV, BuildError, BuildLog, chroot_argv, write_new

REPO = VMIMAGES.parent

#: What the ``fphint`` wheel is built from (pyproject.toml's packages and readme).
WHEEL_SOURCES = ("pyproject.toml", "README.md", "fphint", "guest_agent", "host_collector")
#: The agent's unit in the repository, installed when present.
UNIT_IN_REPO = "guest_agent/systemd/fph-agent.service"
#: Used until the repository has its own unit.
PLACEHOLDER_UNIT = VMIMAGES / "fph-agent.service.placeholder"
#: The lab's distribution (lab/pyproject.toml), which holds the in-guest workloads.
LAB = REPO / "lab"
#: The workloads: the package ``fphint_lab.guest`` and its parent's ``__init__``
#: (paths under the lab), installed as they are into the guest python3's site
#: directory, where Debian's python3 and the agent's venv (system site packages)
#: both import them: ``python3 -m fphint_lab.guest.churn ...``.
WORKLOAD_FILES = ("fphint_lab/__init__.py", "fphint_lab/guest")
#: Facts about the image, readable by tests inside the guest.
IMAGE_INFO_IN_GUEST = "/etc/fphint-image.json"
#: Filesystem label; the guest's fstab mounts / by it.
LABEL = "fphroot"


@dataclass(frozen=True)
class ImageSpec:
    """The inputs of the final layer besides the base."""

    repo: Path = REPO
    #: Where WORKLOAD_FILES are taken from.
    lab: Path = field(default=LAB)
    #: Free space left on the root filesystem for test files and logs.
    free_mib: int = 1024

    def unit_file(self) -> Path:
        unit = self.repo / UNIT_IN_REPO
        return unit if unit.is_file() else PLACEHOLDER_UNIT

    def key(self, base_key: str) -> str:
        d = Digest("image")
        d.add_text("base", base_key)
        d.add_trees(self.repo, WHEEL_SOURCES)
        d.add_file("unit", self.unit_file())
        d.add_trees(self.lab, WORKLOAD_FILES)
        d.add_text("free_mib", str(self.free_mib))
        d.add_file("final.py", Path(__file__))
        d.add_file("run.py", Path(__file__).with_name("run.py"))
        return d.key()


def build_image(
    spec: ImageSpec, key: str, base_key: str, base_dir: Path, work: Path, log: BuildLog
) -> dict[str, object]:
    """Build ``work/rootfs.raw`` from the base entry ``base_dir``.

    :return: facts for the manifest.
    :raise BuildError: naming the step that failed.
    """
    stage = work / "stage"
    try:
        with log.step("build the fphint wheel"):
            wheel = _build_wheel(spec, work, log)
        with log.step("stage rootfs (hard links to the base)"):
            log.run(["cp", "-al", str(base_dir / "rootfs"), str(stage)])
        with log.step("install agent, unit and workloads"):
            unit = spec.unit_file()
            _install_wheel(wheel, stage, log)
            write_new(stage / "etc/systemd/system/fph-agent.service", unit.read_bytes(), mode=0o644)
            log.run(
                chroot_argv(stage, ["systemctl", "--no-reload", "--quiet", "enable", "fph-agent.service"]),
                env=CHROOT_ENV,
            )
            site = _install_workloads(spec.lab, stage, log)
            info = {
                "image_key": key,
                "base_key": base_key,
                "wheel": wheel.name,
                "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
                "agent_unit": "repo" if unit != PLACEHOLDER_UNIT else "placeholder",
                "workloads_site": site,
            }
            write_new(stage / IMAGE_INFO_IN_GUEST.lstrip("/"), json.dumps(info, indent=1) + "\n", mode=0o644)
        with log.step("mkfs.ext4 -d"):
            size_mib = _image_size_mib(stage, spec.free_mib, log)
            fs_uuid = str(uuid.UUID(hashlib.sha256(key.encode()).hexdigest()[:32]))
            log.run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-L",
                    LABEL,
                    "-U",
                    fs_uuid,
                    "-E",
                    f"lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0,hash_seed={fs_uuid}",
                    "-d",
                    str(stage),
                    str(work / "rootfs.raw"),
                    f"{size_mib}M",
                ],
                timeout=900,
            )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(work / "src", ignore_errors=True)
    for name in ("vmlinuz", "initrd.img"):
        _link_or_copy(base_dir / name, work / name)
    return {**info, "size_mib": size_mib}


def _build_wheel(spec: ImageSpec, work: Path, log: BuildLog) -> Path:
    """Build the wheel from a copy of exactly the hashed sources.

    Building from a copy keeps the worktree free of build/ and egg-info
    litter, and guarantees the wheel holds what the key says.
    """
    src = work / "src"
    for name in WHEEL_SOURCES:
        origin = spec.repo / name
        if not origin.exists():
            raise BuildError(f"wheel source {origin} is missing")
        for path in iter_tree(origin):
            dst = src / path.relative_to(spec.repo)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst, follow_symlinks=False)
    dist = work / "dist"
    argv = [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps", "-w", str(dist)]
    if _can_build_offline():
        argv += ["--no-build-isolation", "--no-index"]
    log.run([*argv, str(src)], timeout=600)
    wheels = sorted(dist.glob("fphint-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"expected one fphint wheel in {dist}, found {[w.name for w in wheels]}")
    return wheels[0]


def _can_build_offline() -> bool:
    """setuptools with bdist_wheel is importable here, so no isolated build env is needed."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    return importlib.util.find_spec("wheel") is not None or _setuptools_has_bdist_wheel()


def _setuptools_has_bdist_wheel() -> bool:
    return importlib.util.find_spec("setuptools.command.bdist_wheel") is not None


def _install_wheel(wheel: Path, stage: Path, log: BuildLog) -> None:
    inbox = stage / "tmp" / wheel.name
    shutil.copyfile(wheel, inbox)
    try:
        log.run(
            chroot_argv(
                stage,
                [
                    f"{AGENT_VENV}/bin/python",
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-cache-dir",
                    "--no-index",
                    "--no-deps",
                    f"/tmp/{wheel.name}",
                ],
            ),
            env=CHROOT_ENV,
        )
        log.run(
            chroot_argv(stage, [f"{AGENT_VENV}/bin/python", "-c", "import fphint, guest_agent, grpc"]),
            env=CHROOT_ENV,
        )
    finally:
        inbox.unlink()


def _install_workloads(lab: Path, stage: Path, log: BuildLog) -> str:
    """Copy WORKLOAD_FILES into the guest python3's site directory and byte-compile
    them there (so a guest never writes caches while it migrates).

    :return: that directory, as the guest sees it.
    """
    site = log.run(
        chroot_argv(stage, ["python3", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]),
        env=CHROOT_ENV,
    ).strip()
    if not site.startswith("/"):
        raise BuildError(f"the guest's python3 named no site directory: {site!r}")
    dst = stage / site.lstrip("/")
    for name in WORKLOAD_FILES:
        origin = lab / name
        if not origin.exists():
            raise BuildError(f"workload source {origin} is missing")
        for path in iter_tree(origin):
            target = dst / path.relative_to(lab)
            target.parent.mkdir(parents=True, exist_ok=True)
            mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            write_new(target, path.read_bytes(), mode=mode)
    log.run(chroot_argv(stage, ["python3", "-m", "compileall", "-q", f"{site}/fphint_lab"]), env=CHROOT_ENV)
    return site


def _image_size_mib(stage: Path, free_mib: int, log: BuildLog) -> int:
    used_kib = int(log.run(["du", "-sx", "--block-size=1K", str(stage)]).split()[0])
    used_mib = used_kib // 1024
    # ext4 metadata (inode tables, journal) costs about 10% on top.
    size = int(used_mib * 1.1) + free_mib
    return (size + 255) // 256 * 256


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)
