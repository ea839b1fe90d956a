"""Fixtures for VM tests.

* ``vm_image`` (session): the cached guest image, built on first use
  (a few minutes from scratch, instant afterwards; vm-images/build.py).
* ``vm_factory`` (function) / ``vm_module_factory`` (module): a
  :class:`harness.VMFactory` whose VMs are all shut down at the end, failure
  or not. Each factory has its own run directory under /tmp (sockets, serial
  and QEMU logs, qcow2 overlays): removed after success, kept after a failure,
  with the logs' tails printed in the report. $FPHINT_VM_KEEP=1 keeps it always.

VM tests are skipped (with the reason) when not root, when a tool is missing,
or when $FPHINT_SKIP_VM_TESTS is set; otherwise a failing image build is an error.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fphint_lab.vm.harness import VMFactory, remove_stale_ram_files
from vmimage.accel import AccelError, choose
from vmimage.builder import Image, cached_image, ensure_image, keys
from vmimage.cache import default_cache_dir
from vmimage.final import ImageSpec
from vmimage.qemu import default_binary, qemu_version

SKIP_ENV = "FPHINT_SKIP_VM_TESTS"
KEEP_ENV = "FPHINT_VM_KEEP"
REQUIRED_TOOLS = ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4", "unshare", "chroot", "dpkg-query")


def vm_unavailable() -> str | None:
    """Why VM tests cannot run here, or None."""
    if os.environ.get(SKIP_ENV):
        return f"${SKIP_ENV} is set"
    if os.geteuid() != 0:
        return "VM tests need root (the image build uses debootstrap and chroot)"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (scripts/install-deps.sh installs them)"
    return None


def _accel_line() -> str:
    """The accelerator VM tests run on (vmimage.accel; probes once per host boot)."""
    spec = ImageSpec()
    image = cached_image(default_cache_dir(spec.repo), keys(spec=spec).image)
    try:
        return choose(default_binary(), image.kernel if image else None).describe()
    except AccelError as exc:
        return f"error: {exc}"


def pytest_report_header(config: pytest.Config) -> str:
    binary = default_binary()
    return f"VM tests: QEMU {qemu_version(binary)} ({binary}); accelerator {_accel_line()}"


@pytest.fixture(autouse=True)
def _record_qemu(request: pytest.FixtureRequest, record_property: object) -> None:
    """Every test's report names the QEMU that ran its guests, and a test with
    guests the accelerator they ran on (junit-xml properties)."""
    binary = default_binary()
    record_property("qemu", f"{qemu_version(binary)} {binary}")  # type: ignore[operator]
    if "vm_image" in request.fixturenames:
        record_property("accel", _accel_line())  # type: ignore[operator]


@pytest.fixture(scope="session")
def vm_image() -> Image:
    reason = vm_unavailable()
    if reason:
        pytest.skip(reason)
    remove_stale_ram_files()
    return ensure_image()


def _factory(request: pytest.FixtureRequest, image: Image, label: str) -> Iterator[VMFactory]:
    safe = "".join(c if c.isalnum() else "-" for c in label)[:40]
    rundir = Path(tempfile.mkdtemp(prefix=f"fphvm-{safe}-", dir="/tmp"))
    factory = VMFactory(image, rundir)
    failed_before = request.session.testsfailed
    try:
        yield factory
    finally:
        errors = factory.shutdown_all()
        failed = request.session.testsfailed > failed_before or bool(errors)
        if failed:
            for vm in factory.vms:
                print(vm.describe(), file=sys.stderr)
            for exc in errors:
                print(f"teardown error: {exc}", file=sys.stderr)
        if failed or os.environ.get(KEEP_ENV):
            print(f"VM logs kept in {rundir}", file=sys.stderr)
        else:
            shutil.rmtree(rundir, ignore_errors=True)
        if errors:
            raise errors[0]


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest, vm_image: Image) -> Iterator[VMFactory]:
    yield from _factory(request, vm_image, request.node.name)


@pytest.fixture(scope="module")
def vm_module_factory(request: pytest.FixtureRequest, vm_image: Image) -> Iterator[VMFactory]:
    yield from _factory(request, vm_image, request.module.__name__.rsplit(".", 1)[-1])
