"""Which accelerator the lab's guests run on: KVM where a guest really runs on
it, TCG otherwise. Every guest the lab starts takes its ``-accel``/``-cpu``
from :func:`choose` (the harness's VMs, the demo, the benchmarks, the tests,
``build.py --show-command``), and records the :class:`Accel` it got.

Why a probe and not just "/dev/kvm opens": on some hosts (nested, PVM) the
device opens and QEMU's ``info kvm`` says enabled, yet a guest makes no
visible progress (nothing on its serial console for 90 s), and ``-cpu host``
or ``-cpu max`` abort at once on an MSR KVM refuses (0x10a). So *auto* boots
the guest kernel for a few seconds with ``-accel kvm`` and takes KVM only if
it prints its first kernel line (``Linux version ...``) in time, trying CPU
models from the best (``host``) down to QEMU's default; a model whose QEMU
exits is skipped, the first one that starts but stays silent ends the probe
(KVM itself is stuck then, not the model). The outcome is cached per host
boot (``/proc/sys/kernel/random/boot_id``) and QEMU binary, so one test
session or campaign probes once.

Overrides: ``$FPH_ACCEL`` = ``kvm``, ``tcg`` or ``auto`` (the default), or
the ``--accel`` option of the demo and the benchmarks (same values). A forced
KVM uses the CPU model a cached probe found, else ``$FPH_ACCEL_CPU``, else
``host``. What is *unsafe* on an accelerator (the pre-flight's refusals) is
the collector's business; the lab only passes the choice on and records it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

AccelName = Literal["kvm", "tcg"]
Mode = Literal["kvm", "tcg", "auto"]

#: Environment variable that forces the accelerator (kvm, tcg, auto).
ACCEL_ENV = "FPH_ACCEL"
#: CPU model for a forced KVM when no probe found one.
CPU_ENV = "FPH_ACCEL_CPU"
#: Where probe outcomes are cached (a JSON file).
CACHE_ENV = "FPH_ACCEL_CACHE"
#: Seconds a probe guest gets to print its first kernel line.
TIMEOUT_ENV = "FPH_ACCEL_PROBE_TIMEOUT"
#: A kernel for the probe when the caller names none.
KERNEL_ENV = "FPH_ACCEL_KERNEL"
MODES: tuple[Mode, ...] = ("kvm", "tcg", "auto")

KVM_DEVICE = Path("/dev/kvm")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: A real KVM host prints it in 0.2-1 s; under TCG the same kernel needs ~6 s
#: just to decompress, so a stuck KVM is told apart well within this.
PROBE_TIMEOUT = 5.0
#: Tried in this order; None is QEMU's default model (qemu64).
CPU_MODELS: tuple[str | None, ...] = ("host", "max", None)
#: The first line the kernel proper prints (after decompression, in long mode:
#: the setup code's "Probing EDD" can appear on a KVM that then hangs).
KERNEL_LINE = b"Linux version"
#: Bumped when the cached record's meaning changes.
CACHE_VERSION = 1


class AccelError(ValueError):
    """A bad override value (``$FPH_ACCEL``, ``--accel``)."""


@dataclass(frozen=True)
class Accel:
    """The accelerator a guest runs on and why."""

    name: AccelName
    #: ``-cpu`` model; None: QEMU's default.
    cpu: str | None = None
    #: How it was decided: forced (environment/option), probed now, cached
    #: (a probe earlier in this host boot), or fixed by the caller.
    how: Literal["forced", "probed", "cached", "fixed"] = "fixed"
    #: Why, in one line (for TCG after auto: why KVM was refused).
    reason: str = ""

    def qemu_args(self) -> list[str]:
        """The QEMU options for this choice."""
        return ["-accel", self.name, *(["-cpu", self.cpu] if self.cpu else [])]

    @property
    def label(self) -> str:
        """ "KVM (-cpu host)" or "TCG"."""
        return self.name.upper() + (f" (-cpu {self.cpu})" if self.cpu else "")

    def describe(self) -> str:
        """The label with how and why, for reports."""
        return f"{self.label}, {self.how}: {self.reason}" if self.reason else f"{self.label}, {self.how}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Accel:
        name = data.get("name")
        if name not in ("kvm", "tcg"):
            raise ValueError(f"not an accelerator record: {dict(data)!r}")
        cpu = data.get("cpu")
        return cls(name, str(cpu) if cpu else None, data.get("how", "fixed"), str(data.get("reason", "")))


def tcg(reason: str = "") -> Accel:
    """TCG, fixed by the caller (e.g. tests that model TCG's dirty logging)."""
    return Accel("tcg", None, "fixed", reason)


# Section: the probe


@dataclass(frozen=True)
class ProbeResult:
    """One probe guest: did it print its first kernel line, and when."""

    cpu: str | None
    ok: bool
    seconds: float
    #: rc of a QEMU that exited by itself, else None.
    exitcode: int | None = None
    #: What went wrong (the tail of QEMU's stderr, or what the console showed).
    detail: str = ""

    @property
    def exited(self) -> bool:
        return self.exitcode is not None


def probe_argv(binary: str, kernel: Path, cpu: str | None, console: Path) -> list[str]:
    """The command line of a probe guest: the kernel alone (no disk, no
    initrd: it only has to reach its first line), its console in a file."""
    return [
        binary, "-accel", "kvm", *(["-cpu", cpu] if cpu else []),
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot",
        "-smp", "1", "-m", "256M",
        "-kernel", str(kernel),
        "-append", "console=ttyS0,115200 earlyprintk=serial,ttyS0,115200 panic=-1",
        "-serial", f"file:{console}",
    ]  # fmt: skip


def probe_once(binary: str, kernel: Path, cpu: str | None, timeout: float, workdir: Path) -> ProbeResult:
    """Boot the probe guest with ``-cpu cpu`` until its first kernel line,
    QEMU's exit or ``timeout``; the QEMU is always gone on return."""
    console = workdir / f"probe-{cpu or 'default'}.console"
    stderr_path = workdir / f"probe-{cpu or 'default'}.stderr"
    console.write_bytes(b"")
    t0 = time.monotonic()
    with stderr_path.open("wb") as err:
        try:
            proc = subprocess.Popen(
                probe_argv(binary, kernel, cpu, console),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return ProbeResult(cpu, False, 0.0, exitcode=127, detail=f"cannot start {binary}: {exc}")
        try:
            while True:
                seconds = time.monotonic() - t0
                shown = _read(console)
                if KERNEL_LINE in shown:
                    return ProbeResult(cpu, True, round(seconds, 2))
                rc = proc.poll()
                if rc is not None:
                    return ProbeResult(
                        cpu,
                        False,
                        round(seconds, 2),
                        exitcode=rc,
                        detail=_first_error(_read(stderr_path)) or "no output",
                    )
                if seconds > timeout:
                    seen = _oneline(shown)
                    return ProbeResult(
                        cpu,
                        False,
                        round(seconds, 2),
                        detail=(
                            f"no kernel line within {timeout:g} s"
                            + (f" (console: {seen!r})" if seen else " (console empty)")
                        ),
                    )
                time.sleep(0.05)
        finally:
            _end(proc)


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Kill the probe QEMU (its own session: a wrapper script's exec'd QEMU too)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _first_error(data: bytes) -> str:
    """QEMU's first error line (its abort's assertion follows it), else its last line."""
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower():
            return line[:200]
    return lines[-1][:200] if lines else ""


def _status(rc: int) -> str:
    return f"QEMU died of signal {-rc}" if rc < 0 else f"QEMU exited {rc}"


def _oneline(data: bytes, limit: int = 160) -> str:
    text = " | ".join(line.strip() for line in data.decode(errors="replace").splitlines() if line.strip())
    return text if len(text) <= limit else "..." + text[-limit:]


Prober = Callable[[str, Path, "str | None", float, Path], ProbeResult]


def probe_kvm(
    binary: str,
    kernel: Path,
    *,
    timeout: float = PROBE_TIMEOUT,
    models: Sequence[str | None] = CPU_MODELS,
    prober: Prober = probe_once,
) -> Accel:
    """KVM with the first CPU model whose guest prints its first kernel line,
    else TCG with every attempt's reason. A model whose QEMU exits is skipped;
    one that starts but stays silent ends the probe."""
    tried: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fphint-accel-probe-") as tmp:
        for cpu in models:
            r = prober(binary, kernel, cpu, timeout, Path(tmp))
            if r.ok:
                return Accel(
                    "kvm",
                    cpu,
                    "probed",
                    f"a KVM guest printed its first kernel line after {r.seconds:.2f} s"
                    + (f" (skipped: {'; '.join(tried)})" if tried else ""),
                )
            what = f"-cpu {cpu or 'default'}: "
            what += f"{_status(r.exitcode)}: {r.detail}" if r.exitcode is not None else r.detail
            tried.append(what)
            if not r.exited:
                break
    return Accel("tcg", None, "probed", "KVM refused by the probe: " + "; ".join(tried))


def kvm_unusable(device: Path = KVM_DEVICE) -> str | None:
    """Why /dev/kvm cannot be used (None: it opens read-write)."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{device}: {exc.strerror or exc}"
    os.close(fd)
    return None


# Section: the choice


@dataclass
class Choice:
    """Inputs of :func:`choose` that tests replace (paths, the prober)."""

    device: Path = KVM_DEVICE
    boot_id_path: Path = BOOT_ID
    cache: Path | None = None
    prober: Prober = probe_once
    timeout: float | None = None
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)


def parse_mode(value: str | None) -> Mode:
    """``$FPH_ACCEL`` / ``--accel``: kvm, tcg or auto (empty: auto)."""
    v = (value or "auto").strip().lower()
    if v not in MODES:
        raise AccelError(f"accelerator {value!r} is not one of {', '.join(MODES)} (${ACCEL_ENV}, --accel)")
    return v


def choose(binary: str, kernel: Path | None = None, mode: str | None = None, *, inputs: Choice | None = None) -> Accel:
    """The accelerator for guests of ``binary``.

    :param kernel: the guest kernel the probe boots (default: ``$FPH_ACCEL_KERNEL``).
    :param mode: kvm, tcg or auto; None: ``$FPH_ACCEL``, else auto.
    :raise AccelError: ``mode`` or ``$FPH_ACCEL`` is not a known value.
    """
    c = inputs or Choice()
    from_env = mode is None
    m = parse_mode(c.env.get(ACCEL_ENV) if from_env else mode)
    why = f"${ACCEL_ENV}={m}" if from_env else f"--accel {m}"
    if m == "tcg":
        return Accel("tcg", None, "forced", why)
    cache_path = c.cache or cache_file(c.env)
    boot = _boot_id(c.boot_id_path)
    if m == "kvm":
        cached = _cached(cache_path, boot, binary)
        cpu = cached.cpu if cached is not None and cached.name == "kvm" else c.env.get(CPU_ENV) or "host"
        return Accel("kvm", cpu, "forced", why)
    unusable = kvm_unusable(c.device)
    if unusable:
        return Accel("tcg", None, "probed", f"KVM unusable: {unusable}")
    if kernel is None and c.env.get(KERNEL_ENV):
        kernel = Path(c.env[KERNEL_ENV])
    if kernel is None or not kernel.is_file():
        return Accel("tcg", None, "probed", f"no guest kernel to probe KVM with ({kernel or 'none given'})")
    timeout = c.timeout if c.timeout is not None else float(c.env.get(TIMEOUT_ENV) or PROBE_TIMEOUT)
    with _locked(cache_path):
        cached = _cached(cache_path, boot, binary)
        if cached is not None:
            return Accel(cached.name, cached.cpu, "cached", cached.reason)
        found = probe_kvm(binary, kernel, timeout=timeout, prober=c.prober)
        _store(cache_path, boot, binary, found)
    return found


# Section: the per-boot cache


def cache_file(env: Mapping[str, str] | None = None) -> Path:
    """``$FPH_ACCEL_CACHE``, else /run/fphint (tmpfs: gone at reboot) as root,
    else the temp directory."""
    env = os.environ if env is None else env
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV])
    if os.geteuid() == 0:
        return Path("/run/fphint/accel-probe.json")
    return Path(tempfile.gettempdir()) / f"fphint-accel-probe-{os.getuid()}.json"


def _boot_id(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown"


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _cached(path: Path, boot: str, binary: str) -> Accel | None:
    """The probe outcome stored for ``binary`` in this host boot, if any."""
    data = _load(path)
    if data.get("version") != CACHE_VERSION or data.get("boot_id") != boot:
        return None
    entry = data.get("binaries", {}).get(binary)
    if not isinstance(entry, dict):
        return None
    try:
        return Accel.from_dict(entry)
    except ValueError:
        return None


def _store(path: Path, boot: str, binary: str, accel: Accel) -> None:
    data = _load(path)
    if data.get("version") != CACHE_VERSION or data.get("boot_id") != boot:
        data = {"version": CACHE_VERSION, "boot_id": boot, "binaries": {}}
    data["binaries"][binary] = {**accel.as_dict(), "probed_at": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One prober at a time per cache (parallel test processes probe once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
