"""The accelerator choice (vmimage.accel): probe outcomes, overrides, the
per-boot cache, and that the harness passes the choice on.

The probe logic runs against a fake QEMU (a real process: it reads its argv,
writes the console file it was given, exits or hangs as told per CPU model),
so the KVM path is tested here although this host's KVM runs no guest. One
test runs the real probe with the real QEMU and the image's kernel.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fphint_lab.vm.harness import VM, VMFactory
from vmimage import accel as accel_mod
from vmimage.accel import Accel, AccelError, Choice, choose, probe_argv, probe_kvm, probe_once, tcg
from vmimage.qemu import GuestConfig, default_binary

FAKE_QEMU = r'''#!{python}
"""Fake QEMU for the probe: behaviour per -cpu model from $FAKE_KVM."""
import json, os, sys, time
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(argv) + "\n")
cpu = argv[argv.index("-cpu") + 1] if "-cpu" in argv else "default"
console = next(a for a in argv if a.startswith("file:"))[len("file:"):]
plan = dict(kv.split("=") for kv in os.environ["FAKE_KVM"].split(","))
what = plan.get(cpu, "ok")
if what == "exit":
    print("qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069", file=sys.stderr, flush=True)
    os._exit(134)
if what == "hang":
    with open(console, "a") as c:
        c.write("Probing EDD (edd=off to disable)... ok\n")
    time.sleep(60)
time.sleep(0.1)
with open(console, "a") as c:
    c.write("[    0.000000] Linux version 6.1.0-50-amd64 (fake)\n")
time.sleep(60)
'''


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A fake QEMU binary, a kernel file, a usable fake /dev/kvm, a private cache."""
    binary = tmp_path / "fake-qemu"
    binary.write_text(FAKE_QEMU.format(python=sys.executable))
    binary.chmod(0o755)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    log = tmp_path / "invocations.jsonl"
    env = {"FAKE_LOG": str(log), "FAKE_KVM": "host=ok"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(accel_mod.ACCEL_ENV, raising=False)
    monkeypatch.delenv(accel_mod.CPU_ENV, raising=False)

    def inputs(**kw: object) -> Choice:
        base: dict[str, object] = {
            "device": device,
            "boot_id_path": boot,
            "cache": tmp_path / "cache.json",
            "timeout": 2.0,
            "env": {},
        }
        base.update(kw)
        return Choice(**base)  # type: ignore[arg-type]

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return SimpleNamespace(
        binary=str(binary),
        kernel=kernel,
        device=device,
        boot=boot,
        inputs=inputs,
        calls=calls,
        monkeypatch=monkeypatch,
        tmp=tmp_path,
    )


def test_probe_argv_boots_the_kernel_alone_on_kvm(tmp_path: Path) -> None:
    argv = probe_argv("qemu", tmp_path / "vmlinuz", "host", tmp_path / "c.log")
    assert argv[:5] == ["qemu", "-accel", "kvm", "-cpu", "host"]
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "vmlinuz")
    assert "-initrd" not in argv and "-drive" not in argv and "-no-reboot" in argv
    assert argv[argv.index("-serial") + 1] == f"file:{tmp_path / 'c.log'}"
    assert "-cpu" not in probe_argv("qemu", tmp_path / "k", None, tmp_path / "c")


def test_kvm_with_host_cpu_when_the_guest_prints(fake: SimpleNamespace) -> None:
    got = choose(fake.binary, fake.kernel, inputs=fake.inputs())
    assert (got.name, got.cpu, got.how) == ("kvm", "host", "probed")
    assert "first kernel line" in got.reason
    assert got.qemu_args() == ["-accel", "kvm", "-cpu", "host"]
    assert len(fake.calls()) == 1


def test_cpu_models_that_abort_are_skipped(fake: SimpleNamespace) -> None:
    fake.monkeypatch.setenv("FAKE_KVM", "host=exit,max=exit,default=ok")
    got = choose(fake.binary, fake.kernel, inputs=fake.inputs())
    assert (got.name, got.cpu) == ("kvm", None)
    assert "MSR 0x10a" in got.reason and "skipped" in got.reason
    assert [c[c.index("-cpu") + 1] if "-cpu" in c else None for c in fake.calls()] == ["host", "max", None]


def test_a_silent_kvm_guest_means_tcg_quickly_and_says_why(fake: SimpleNamespace) -> None:
    """This host: host/max abort on MSR 0x10a, the default model starts and
    prints only the setup code's line. TCG, within the probe timeout, and the
    reason names both failures; no model after the silent one is tried."""
    fake.monkeypatch.setenv("FAKE_KVM", "host=exit,max=hang,default=ok")
    t0 = time.monotonic()
    got = choose(fake.binary, fake.kernel, inputs=fake.inputs(timeout=1.0))
    took = time.monotonic() - t0
    assert (got.name, got.cpu, got.how) == ("tcg", None, "probed")
    assert "QEMU exited 134" in got.reason or ("signal" in got.reason and "MSR 0x10a" in got.reason)
    assert "no kernel line within 1 s" in got.reason and "Probing EDD" in got.reason
    assert len(fake.calls()) == 2, "the default model is not tried after a silent one"
    assert took < 5, f"the probe took {took:.1f} s"


def test_a_probe_leaves_no_qemu_behind(fake: SimpleNamespace) -> None:
    fake.monkeypatch.setenv("FAKE_KVM", "host=hang")
    r = probe_once(fake.binary, fake.kernel, "host", 0.5, fake.tmp)
    assert not r.ok and not r.exited
    ok = probe_once(fake.binary, fake.kernel, "max", 5, fake.tmp)
    assert ok.ok and ok.seconds < 5
    import subprocess

    ps = subprocess.run(["pgrep", "-f", str(fake.binary)], capture_output=True, text=True)
    assert ps.stdout.strip() == "", f"probe QEMU still running: {ps.stdout}"


def test_unusable_device_means_tcg_without_a_probe(fake: SimpleNamespace) -> None:
    def no_probe(*a: object) -> accel_mod.ProbeResult:
        raise AssertionError("probed although /dev/kvm does not open")

    got = choose(fake.binary, fake.kernel, inputs=fake.inputs(device=fake.tmp / "missing", prober=no_probe))
    assert got.name == "tcg" and "KVM unusable" in got.reason and "missing" in got.reason
    none = choose(fake.binary, None, inputs=fake.inputs(prober=no_probe))
    assert none.name == "tcg" and "no guest kernel" in none.reason


def test_overrides(fake: SimpleNamespace) -> None:
    def no_probe(*a: object) -> accel_mod.ProbeResult:
        raise AssertionError("a forced accelerator is not probed")

    forced = choose(fake.binary, fake.kernel, inputs=fake.inputs(env={"FPH_ACCEL": "tcg"}, prober=no_probe))
    assert (forced.name, forced.how) == ("tcg", "forced") and "FPH_ACCEL=tcg" in forced.reason
    kvm = choose(fake.binary, fake.kernel, inputs=fake.inputs(env={"FPH_ACCEL": "KVM"}, prober=no_probe))
    assert (kvm.name, kvm.cpu, kvm.how) == ("kvm", "host", "forced")
    cpu = choose(
        fake.binary, fake.kernel, inputs=fake.inputs(env={"FPH_ACCEL": "kvm", "FPH_ACCEL_CPU": "max"}, prober=no_probe)
    )
    assert cpu.cpu == "max"
    # The option beats the environment.
    opt = choose(fake.binary, fake.kernel, "tcg", inputs=fake.inputs(env={"FPH_ACCEL": "kvm"}, prober=no_probe))
    assert opt.name == "tcg" and "--accel tcg" in opt.reason
    with pytest.raises(AccelError, match="not one of kvm, tcg, auto"):
        choose(fake.binary, fake.kernel, inputs=fake.inputs(env={"FPH_ACCEL": "hvf"}))
    with pytest.raises(AccelError):
        choose(fake.binary, fake.kernel, "xen", inputs=fake.inputs())


def test_forced_kvm_takes_the_model_a_probe_found(fake: SimpleNamespace) -> None:
    fake.monkeypatch.setenv("FAKE_KVM", "host=exit,max=ok")
    assert choose(fake.binary, fake.kernel, inputs=fake.inputs()).cpu == "max"
    forced = choose(fake.binary, fake.kernel, inputs=fake.inputs(env={"FPH_ACCEL": "kvm"}))
    assert (forced.name, forced.cpu, forced.how) == ("kvm", "max", "forced")


def test_cache_per_boot_and_binary(fake: SimpleNamespace) -> None:
    first = choose(fake.binary, fake.kernel, inputs=fake.inputs())
    again = choose(fake.binary, fake.kernel, inputs=fake.inputs())
    assert first.how == "probed" and again.how == "cached"
    assert (again.name, again.cpu, again.reason) == (first.name, first.cpu, first.reason)
    assert len(fake.calls()) == 1, "a cached outcome is not probed again"
    data = json.loads((fake.tmp / "cache.json").read_text())
    assert data["boot_id"] == "boot-1" and fake.binary in data["binaries"]
    other = fake.tmp / "other-qemu"
    other.symlink_to(fake.binary)
    choose(str(other), fake.kernel, inputs=fake.inputs())
    assert len(fake.calls()) == 2, "another binary is probed on its own"
    fake.boot.write_text("boot-2\n")
    assert choose(fake.binary, fake.kernel, inputs=fake.inputs()).how == "probed"
    assert len(fake.calls()) == 3, "a new host boot probes again"
    (fake.tmp / "cache.json").write_text("{not json")
    assert choose(fake.binary, fake.kernel, inputs=fake.inputs()).how == "probed"


def test_probe_kvm_with_a_stub_prober(tmp_path: Path) -> None:
    seen: list[str | None] = []

    def prober(binary: str, kernel: Path, cpu: str | None, timeout: float, work: Path) -> accel_mod.ProbeResult:
        seen.append(cpu)
        return accel_mod.ProbeResult(cpu, cpu is None, 0.3, exitcode=None if cpu is None else 1, detail="nope")

    got = probe_kvm("q", tmp_path / "k", prober=prober)
    assert seen == ["host", "max", None] and (got.name, got.cpu) == ("kvm", None)


def test_accel_record_round_trip() -> None:
    a = Accel("kvm", "host", "probed", "why")
    assert Accel.from_dict(json.loads(json.dumps(a.as_dict()))) == a
    assert a.label == "KVM (-cpu host)" and "why" in a.describe()
    assert tcg().label == "TCG" and tcg().qemu_args() == ["-accel", "tcg"]
    with pytest.raises(ValueError):
        Accel.from_dict({"name": "hvf"})


def test_vms_carry_the_choice_and_destinations_inherit_it(tmp_path: Path) -> None:
    guest = GuestConfig(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd", disk=tmp_path / "d.qcow2")
    kvm = Accel("kvm", "host", "forced", "test")
    vm = VM("x", guest, tmp_path, accel=kvm)
    assert vm.accel is kvm and vm.argv()[vm.argv().index("-accel") + 1] == "kvm"
    factory = VMFactory(SimpleNamespace(kernel=tmp_path / "vmlinuz"), tmp_path, accel=kvm)  # type: ignore[arg-type]
    assert factory.vm("a", guest).accel is kvm
    assert factory.vm("b", guest, accel=tcg()).accel.name == "tcg"


@pytest.mark.qemu
@pytest.mark.slow
def test_real_probe_on_this_host(tmp_path: Path) -> None:
    """The real QEMU and the image's kernel: whatever this host can do, the
    answer comes within a few seconds and says why."""
    from vmimage.builder import cached_image, keys
    from vmimage.cache import default_cache_dir
    from vmimage.final import ImageSpec

    spec = ImageSpec()
    image = cached_image(default_cache_dir(spec.repo), keys(spec=spec).image)
    if image is None:
        pytest.skip("the guest image is not built (vm-images/build.py)")
    if accel_mod.kvm_unusable() is not None:
        pytest.skip(f"no usable /dev/kvm: {accel_mod.kvm_unusable()}")
    t0 = time.monotonic()
    got = choose(default_binary(), image.kernel, "auto", inputs=Choice(cache=tmp_path / "c.json", env={}))
    took = time.monotonic() - t0
    assert got.how == "probed" and got.reason
    assert took < 3 * accel_mod.PROBE_TIMEOUT + 5, f"{took:.1f} s: {got.describe()}"
    if got.name == "tcg":
        assert "KVM refused by the probe" in got.reason
    print(f"probe on this host after {took:.1f} s: {got.describe()}")
