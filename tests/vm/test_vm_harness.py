"""The harness's own behaviour that needs no booted guest: the QEMU command
line, launch failures, stale RAM file cleanup, a failed migration (with
real QEMU processes whose CPUs never start), and the collector daemon run as
shipped unless a test asks for the witness."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from fphint_lab.vm import daemon_witness
from fphint_lab.vm.fphint_daemon import CollectorDaemon, DaemonError, FphintMigrator
from fphint_lab.vm.harness import (
    VM,
    MigrationError,
    VMError,
    VMFactory,
    VMLaunchError,
    migrate,
    remove_stale_ram_files,
    start_incoming,
    wait_incoming,
)
from vmimage.accel import Accel, tcg
from vmimage.builder import Image
from vmimage.qemu import FW_CFG_TOKEN, Endpoints, GuestConfig, qemu_argv


def _endpoints(tmp: Path, incoming: bool = False, paused: bool = False, shared_ram: bool = True) -> Endpoints:
    return Endpoints(
        name="x",
        mem_path=tmp / "x.ram",
        qmp=tmp / "x.qmp",
        shell=tmp / "x.shell",
        shell_log=tmp / "x.shell.log",
        console_log=tmp / "x.console.log",
        incoming=incoming,
        paused=paused,
        shared_ram=shared_ram,
    )


def _guest(tmp: Path, **kw: object) -> GuestConfig:
    return GuestConfig(kernel=tmp / "vmlinuz", initrd=tmp / "initrd", disk=tmp / "d.qcow2", **kw)  # type: ignore[arg-type]


def test_argv_shape(tmp_path: Path) -> None:
    argv = qemu_argv(
        _guest(tmp_path, token="a,b", mem_mib=512, append=("init_on_free=1",)), _endpoints(tmp_path), accel=tcg("test")
    )
    joined = " ".join(argv)
    assert argv[argv.index("-accel") + 1] == "tcg" and "-cpu" not in argv
    assert f"mem-path={tmp_path}/x.ram,share=on" in joined and "-m 512M" in joined
    assert f"name={FW_CFG_TOKEN},string=a,,b" in argv, "a comma in a fw_cfg string must be doubled"
    assert argv[argv.index("-append") + 1].endswith("panic=-1 init_on_free=1")
    assert "-incoming" not in argv and "-S" not in argv
    assert "-no-reboot" in argv
    dst = qemu_argv(_guest(tmp_path), _endpoints(tmp_path, incoming=True, paused=True))
    assert dst[-3:] == ["-S", "-incoming", "defer"]
    assert not any("fw_cfg" in a for a in dst)


def test_anonymous_ram_has_no_file_and_keeps_the_block_name(tmp_path: Path) -> None:
    shared = " ".join(qemu_argv(_guest(tmp_path), _endpoints(tmp_path, incoming=True), accel=tcg("test")))
    anon = qemu_argv(_guest(tmp_path), _endpoints(tmp_path, incoming=True, shared_ram=False), accel=tcg("test"))
    assert "memory-backend-file,id=mem," in shared and "memory-backend-ram" not in shared
    backend = anon[anon.index("-object") + 1]
    assert backend.startswith("memory-backend-ram,id=mem,") and "mem-path" not in backend and "share" not in backend
    assert "memory-backend=mem" in anon[anon.index("-machine") + 1], "the RAMBlock keeps its name: it must migrate"


def test_argv_on_kvm_names_the_cpu_model(tmp_path: Path) -> None:
    """What a user's KVM host runs: -accel kvm with the probe's CPU model."""
    argv = qemu_argv(_guest(tmp_path), _endpoints(tmp_path), accel=Accel("kvm", "host", "probed"))
    i = argv.index("-accel")
    assert argv[i : i + 4] == ["-accel", "kvm", "-cpu", "host"] and argv.count("-accel") == 1
    default_model = qemu_argv(_guest(tmp_path), _endpoints(tmp_path), accel=Accel("kvm", None, "probed"))
    assert "kvm" in default_model and "-cpu" not in default_model


@pytest.mark.parametrize(
    ("balloon", "needle"),
    [
        ("plain", "virtio-balloon-pci,id=balloon0"),
        ("hint", "free-page-hint=on,iothread="),
        ("report", "free-page-reporting=on"),
    ],
)
def test_balloon_variants(tmp_path: Path, balloon: str, needle: str) -> None:
    argv = qemu_argv(_guest(tmp_path, balloon=balloon), _endpoints(tmp_path))
    assert any(needle in a for a in argv)
    if balloon == "hint":
        assert any(a.startswith("iothread,id=") for a in argv), "QEMU refuses free-page-hint without an iothread"


def test_fw_cfg_refuses_nul(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NUL"):
        qemu_argv(_guest(tmp_path, token="a\0b"), _endpoints(tmp_path))


def test_launch_failure_shows_command_and_output(tmp_path: Path) -> None:
    script = tmp_path / "fake-qemu"
    script.write_text("#!/bin/sh\necho 'qemu-system-x86_64: -drive nonsense: bad option' >&2\nexit 1\n")
    script.chmod(0o755)
    vm = VM("broken", _guest(tmp_path), tmp_path, shm_dir=tmp_path, binary=str(script))
    with pytest.raises(VMLaunchError) as info:
        vm.launch(timeout=20)
    text = str(info.value)
    assert info.value.exitcode == 1 and "bad option" in text and "fake-qemu" in text
    assert not vm.is_running()
    vm.shutdown()  # harmless after a failed launch


def test_stale_ram_files_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"fphvm-{dead.pid}-abcd1234-src.ram"
    mine = tmp_path / f"fphvm-{os.getpid()}-abcd1234-src.ram"
    other = tmp_path / "something-else.ram"
    for p in (stale, mine, other):
        p.write_bytes(b"x")
    assert remove_stale_ram_files(tmp_path) == [stale]
    assert mine.exists() and other.exists() and not stale.exists()


@pytest.mark.vm
@pytest.mark.qemu
@pytest.mark.root
@pytest.mark.timeout(1500)
def test_failed_migration_is_reported_and_source_survives(vm_factory: VMFactory, vm_image: Image) -> None:
    """Nothing listens on the target: MigrationError, and QEMU still answers."""
    src = vm_factory.vm("src", vm_factory.guest(mem_mib=256), paused=True)
    src.launch()
    with pytest.raises(MigrationError, match="failed") as info:
        migrate(src, "tcp:127.0.0.1:1", timeout=60)
    assert info.value.info["status"] == "failed"
    assert src.is_running() and src.status() in ("prelaunch", "paused")
    ram = src.ram_path
    src.shutdown()
    assert not ram.exists(), "shutdown removes the RAM file"


@pytest.mark.vm
@pytest.mark.qemu
@pytest.mark.root
@pytest.mark.timeout(600)
def test_a_file_backed_source_migrates_into_an_anonymous_destination(vm_image: Image, tmp_path: Path) -> None:
    """What the comparison bench runs (its destinations on anonymous RAM):
    bytes written into the source's RAM file arrive in the destination's
    anonymous RAM (read back with pmemsave), and that VM has no RAM file."""
    factory = VMFactory(vm_image, tmp_path, accel=tcg("test"), shared_destination_ram=False)
    try:
        src = factory.vm("src", factory.guest(mem_mib=256), paused=True)
        src.launch()
        offset, length = 64 << 20, 1 << 20
        pattern = os.urandom(length)
        with open(src.ram_path, "r+b") as f:  # share=on: this file is the guest's RAM
            f.seek(offset)
            f.write(pattern)
        dst = factory.destination(src, "dst", paused=True)
        assert not dst.endpoints.shared_ram and not dst.endpoints.mem_path.exists()
        with pytest.raises(VMError, match="anonymous RAM"):
            _ = dst.ram_path
        migrate(src, start_incoming(dst), dst=dst, timeout=120)
        wait_incoming(dst, 60)
        dump = tmp_path / "dump.bin"
        dst.cmd("pmemsave", {"val": offset, "size": length, "filename": str(dump)})
        assert dump.read_bytes() == pattern
    finally:
        errors = factory.shutdown_all()
        assert not errors, errors


def test_binary_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$FPH_QEMU wins; else QEMU 10.0 when installed (7.2 loses TCG writes while migrating); else Debian's."""
    from vmimage import qemu as qemu_mod

    monkeypatch.setenv(qemu_mod.QEMU_ENV, "/opt/my/qemu")
    assert qemu_argv(_guest(tmp_path), _endpoints(tmp_path))[0] == "/opt/my/qemu"
    assert VM("x", _guest(tmp_path), tmp_path).binary == "/opt/my/qemu"
    monkeypatch.delenv(qemu_mod.QEMU_ENV)
    fake10 = tmp_path / "qemu10"
    monkeypatch.setattr(qemu_mod, "QEMU10", fake10)
    assert qemu_mod.default_binary() == qemu_mod.QEMU
    fake10.write_text("#!/bin/sh\necho 'QEMU emulator version 10.0.2 (test)'\n")
    fake10.chmod(0o755)
    assert qemu_mod.default_binary() == str(fake10)
    assert qemu_mod.qemu_version(str(fake10)) == "10.0.2"
    assert qemu_mod.qemu_version(str(tmp_path / "missing")).startswith("unknown")


def test_daemon_runs_as_shipped_unless_a_test_asks_for_the_witness(tmp_path: Path) -> None:
    shipped = CollectorDaemon(tmp_path, {"vm": "t"})
    argv = shipped.serve_argv()
    assert argv[1:] == ["-m", "host_collector", "-v", "serve", "--config", str(shipped.config)]
    with pytest.raises(DaemonError, match="needs the witness"):
        shipped.witness("vm")
    with pytest.raises(DaemonError, match="needs the witness"):
        shipped.plant_fault("mem", [1])
    watched = CollectorDaemon(tmp_path, {"vm": "t"}, witness=True).serve_argv()
    assert watched[1:3] == ["-m", daemon_witness.__name__]
    assert watched[watched.index("--") + 1 :] == argv[3:]


def test_the_demo_and_bench_migrator_runs_the_shipped_daemon(tmp_path: Path) -> None:
    """What the demo and bench/migration_comparison.py measure is the product:
    the process FphintMigrator starts is ``python -m host_collector serve``."""
    migrator = FphintMigrator(SimpleNamespace(rundir=tmp_path))
    try:
        assert migrator.daemon.pid is not None
        cmdline = Path(f"/proc/{migrator.daemon.pid}/cmdline").read_bytes().split(b"\0")
        assert [a.decode() for a in cmdline[1:5]] == ["-m", "host_collector", "-v", "serve"]
        assert not migrator.daemon.vm_info(FphintMigrator.VM_NAME).get("attached")  # no guest yet
    finally:
        migrator.close()
    assert not migrator.daemon.is_running()
