"""The image builder: keys follow inputs, the cache makes a second build
instant, an agent change rebuilds only the final layer, and the image holds
what the guest needs. Image contents are read with debugfs (no mount)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from vmimage import cache as cache_mod
from vmimage.base import BaseSpec
from vmimage.builder import Image, ensure_image
from vmimage.final import (
    IMAGE_INFO_IN_GUEST,
    LAB,
    PLACEHOLDER_UNIT,
    UNIT_IN_REPO,
    WHEEL_SOURCES,
    WORKLOAD_FILES,
    ImageSpec,
)

from . import REPO

F = TypeVar("F", bound=Callable[..., object])


def vm_test(f: F) -> F:
    """Needs the built image (root; minutes on a cold cache)."""
    for mark in (pytest.mark.vm, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1500)):
        f = mark(f)
    return f


def _copy_sources(dst: Path) -> ImageSpec:
    """A copy of everything the final layer reads, to change freely."""
    dst.mkdir(parents=True)
    for name in WHEEL_SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / name)
    lab = dst / "lab"
    for name in WORKLOAD_FILES:
        src = LAB / name
        (lab / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, lab / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, lab / name)
    return ImageSpec(repo=dst, lab=lab)


def test_keys_follow_inputs_and_only_inputs(tmp_path: Path) -> None:
    spec = _copy_sources(tmp_path / "repo")
    base = BaseSpec()
    key = spec.key(base.key())
    assert key == spec.key(base.key()), "keys must be deterministic"
    assert key == _copy_sources(tmp_path / "again").key(base.key()), "keys must not depend on where the repo is"

    # Not inputs: byte-code caches, files outside the wheel sources.
    (spec.repo / "guest_agent/__pycache__").mkdir(exist_ok=True)
    (spec.repo / "guest_agent/__pycache__/x.cpython-311.pyc").write_bytes(b"junk")
    (spec.repo / "docs").mkdir()
    (spec.repo / "docs/notes.md").write_text("not an input")
    assert spec.key(base.key()) == key

    # Inputs of the final layer: agent code, its mode bits, the workloads, the unit.
    agent = spec.repo / "guest_agent/__init__.py"
    agent.write_text(agent.read_text() + "\n# changed\n")
    changed = spec.key(base.key())
    assert changed != key
    agent.chmod(0o755)
    assert spec.key(base.key()) != changed
    before = spec.key(base.key())
    (spec.lab / "fphint_lab/guest/new_workload.py").write_text("print('hi')\n")
    assert spec.key(base.key()) != before
    before = spec.key(base.key())
    package = spec.lab / "fphint_lab/__init__.py"
    package.write_text(package.read_text() + "# changed\n")
    assert spec.key(base.key()) != before, "the lab's __init__ goes into the guest too"
    before = spec.key(base.key())
    (spec.lab / "fphint_lab/demo.py").write_text("not installed in the guest\n")
    assert spec.key(base.key()) == before
    before = spec.key(base.key())
    unit = spec.repo / UNIT_IN_REPO
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text((unit.read_text() if unit.exists() else PLACEHOLDER_UNIT.read_text()) + "# changed\n")
    assert spec.unit_file() == unit and spec.key(base.key()) != before

    # The base key ignores the agent but follows its own inputs.
    assert BaseSpec().key() == base.key()
    assert BaseSpec(packages=(*base.packages, "strace")).key() != base.key()
    overlay = tmp_path / "overlay"
    shutil.copytree(base.overlay, overlay)
    assert BaseSpec(overlay=overlay).key() == base.key()
    (overlay / "etc/hostname").write_text("other\n")
    assert BaseSpec(overlay=overlay).key() != base.key()


def _debugfs_cat(image: Path, path: str) -> str:
    out = subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout


@vm_test
def test_second_build_is_instant(vm_image: Image) -> None:
    disk_mtime = vm_image.disk.stat().st_mtime_ns
    again = ensure_image()
    assert again.built == (), "a second build with unchanged inputs must not build anything"
    assert (again.key, again.disk) == (vm_image.key, vm_image.disk)
    assert again.disk.stat().st_mtime_ns == disk_mtime


@vm_test
def test_image_contents(vm_image: Image) -> None:
    info = json.loads(_debugfs_cat(vm_image.disk, IMAGE_INFO_IN_GUEST))
    assert info["image_key"] == vm_image.key and info["base_key"] == vm_image.base_key
    unit = _debugfs_cat(vm_image.disk, "/etc/systemd/system/fph-agent.service")
    expected_unit = (REPO / UNIT_IN_REPO) if (REPO / UNIT_IN_REPO).is_file() else PLACEHOLDER_UNIT
    assert unit == expected_unit.read_text()
    entry_point = _debugfs_cat(vm_image.disk, "/opt/fphint/bin/fph-agent")
    assert entry_point.startswith("#!/opt/fphint/bin/python\n") and "from guest_agent.cli import main" in entry_point
    site = info["workloads_site"]
    assert site.startswith("/usr/local/lib/python3"), site
    for name in ("fphint_lab/guest/churn.py", "fphint_lab/__init__.py"):
        assert _debugfs_cat(vm_image.disk, f"{site}/{name}") == (LAB / name).read_text()
    base = vm_image.manifest["base"]
    assert isinstance(base, dict)
    assert base["python_pins"] == {"grpcio": "1.85.1", "protobuf": "7.35.1", "typing-extensions": "4.16.0"}
    assert vm_image.kernel.stat().st_size > 1 << 20
    assert vm_image.initrd.stat().st_size < 20 << 20, "the initrd should be the small MODULES=list one"


@vm_test
def test_agent_change_rebuilds_only_the_final_layer(vm_image: Image, tmp_path: Path) -> None:
    """A private cache holding (hard links to) the real base; an edited agent."""
    cache = tmp_path / "cache"
    cache.mkdir()
    base_entry = cache_mod.entry(vm_image.dir.parent, "base", vm_image.base_key)
    subprocess.run(["cp", "-al", str(base_entry), str(cache / base_entry.name)], check=True, timeout=120)
    spec = _copy_sources(tmp_path / "repo")
    agent = spec.repo / "guest_agent/__init__.py"
    agent.write_text(agent.read_text() + "\nFPHINT_TEST_MARKER = 1\n")
    unit = spec.repo / UNIT_IN_REPO
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(PLACEHOLDER_UNIT.read_text() + "# from the repository\n")
    try:
        image = ensure_image(cache=cache, spec=spec)
        assert image.built == ("image",)
        assert image.base_key == vm_image.base_key and image.key != vm_image.key
        assert _debugfs_cat(image.disk, "/etc/systemd/system/fph-agent.service").endswith("# from the repository\n")
        site = "/opt/fphint/lib/python3.11/site-packages/guest_agent/__init__.py"
        assert "FPHINT_TEST_MARKER = 1" in _debugfs_cat(image.disk, site)
        assert json.loads(_debugfs_cat(image.disk, IMAGE_INFO_IN_GUEST))["agent_unit"] == "repo"
        assert ensure_image(cache=cache, spec=spec).built == ()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    leaked = base_entry / "rootfs/opt/fphint/lib/python3.11/site-packages/guest_agent"
    assert not leaked.exists(), "installing the agent in the stage must not touch the cached base"
