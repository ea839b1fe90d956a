"""Migration scenarios over one emulated link, shared by the e2e tests, the
comparison benchmark (bench/migration_comparison.py) and ``make demo``.

A *scenario* is how the guest is set up to help (or not help) a migration:
its kernel command line, its virtio-balloon variant, and whether fphint's
collector and agent take part. :func:`run_chain` boots one guest for a
scenario and migrates it ``runs`` times in a chain (A -> B -> C ...; a boot
costs ~20 s of a host core). Before each migration the guest leaves garbage
in free memory (``fill.py``) and runs a light churn workload (``churn.py``:
allocate, write, verify, free, in a loop) that keeps going during the
migration. Every migration goes through the same :class:`LinkRelay` in front
of the destination, where the bytes on the wire are counted; QEMU's own
bandwidth limit is off. After each one the destination guest is checked:
QEMU still running, same boot id, no oops in the kernel log, and the churn
workload verifies every byte it wrote.

How the migration itself is driven is a :class:`Migrator`: plainly through
QMP (:class:`PlainMigrator`), or through the fphint collector daemon.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from vmimage.accel import ACCEL_ENV, choose, parse_mode
from vmimage.builder import ensure_image
from vmimage.qemu import Balloon, default_binary

from ..linkrelay import GIGABIT, LinkRelay, LinkStats
from .harness import (
    FAST_BANDWIDTH,
    SHM_DIR,
    VM,
    MigrationError,
    MigrationResult,
    VMError,
    VMFactory,
    migrate,
    remove_stale_ram_files,
    start_incoming,
)

LOG = logging.getLogger(__name__)

MiB = 1 << 20


#: Kernel argument that keeps the image's agent unit from starting: guests
#: of the other scenarios run as they would without fphint installed (the
#: eBPF agent holds ~150 MiB and reads ~100 MiB of kernel headers into the
#: page cache when it compiles, all of which a migration must send).
NO_AGENT = "systemd.mask=fph-agent.service"
Agent = Literal["off", "auto", "kpageflags"]


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    #: Extra kernel arguments.
    append: tuple[str, ...] = ()
    balloon: Balloon = "none"
    #: fphint's collector and the guest agent take part.
    fphint: bool = False
    #: The guest agent: not started, the image's unit (source auto: eBPF
    #: first), or started by hand with the kpageflags source.
    agent: Agent = "off"
    #: Opt-in rows: the clean page cache dropped before each migration (by
    #: the agent's --reclaim-page-cache for fphint, by the lab otherwise).
    reclaim: bool = False
    note: str = ""

    @property
    def kernel_args(self) -> tuple[str, ...]:
        return self.append if self.agent == "auto" else (*self.append, NO_AGENT)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("plain", "plain", note="Debian defaults (init_on_alloc=1), no balloon"),
        Scenario(
            "init_on_free",
            "init_on_free=1",
            append=("init_on_free=1",),
            note="the guest zeroes every page it frees: free memory is already zero",
        ),
        Scenario(
            "balloon_hint",
            "balloon free-page-hint",
            balloon="hint",
            note="QEMU virtio-balloon free-page-hint, default init_on_alloc=1",
        ),
        Scenario(
            "balloon_hint_ioa0",
            "balloon free-page-hint, init_on_alloc=0",
            append=("init_on_alloc=0",),
            balloon="hint",
            note="QEMU virtio-balloon free-page-hint with init_on_alloc=0",
        ),
        Scenario(
            "balloon_report",
            "balloon free-page-reporting",
            balloon="report",
            note="virtio-balloon free-page-reporting: the guest discards free 2 MiB+ blocks",
        ),
        Scenario(
            "fphint",
            "fphint",
            fphint=True,
            agent="auto",
            note="fphint: collector daemon, proxy, the image's agent unit (source auto: eBPF)",
        ),
        Scenario(
            "fphint_kpageflags",
            "fphint, kpageflags agent",
            fphint=True,
            agent="kpageflags",
            note="fphint with the agent's /proc/kpageflags source (no bcc/LLVM in the guest)",
        ),
        Scenario(
            "init_on_free_reclaim",
            "init_on_free=1, page cache dropped",
            append=("init_on_free=1",),
            reclaim=True,
            note="opt-in row: init_on_free=1 and the clean page cache dropped right before the migration",
        ),
        Scenario(
            "fphint_reclaim",
            "fphint, page cache dropped",
            # The unit inherits the manager's environment: the agent's opt-in.
            append=("systemd.setenv=FPHINT_RECLAIM_PAGE_CACHE=1",),
            fphint=True,
            agent="auto",
            reclaim=True,
            note="opt-in row: the agent drops the clean page cache before the migration's first scan",
        ),
    )
}


@dataclass(frozen=True)
class Workload:
    """What the guest does around each migration: garbage left in free memory,
    then either a light churn loop (``churn.py``) or the busy guest
    (``busy.py``: its vCPU saturated by anonymous and tmpfs memory churn,
    page-cache drops and forks), running through the migration and verified
    on the destination."""

    #: MiB filled with a pattern and freed before the migration (garbage in free memory).
    fill_mib: int = 512
    churn_workers: int = 1
    churn_loop_mib: int = 16
    churn_keep_mib: int = 16
    churn_dwell: float = 0.3
    #: Seconds between the fill and the migration (free-page reporting acts
    #: on blocks freed for about 2 s; every scenario waits the same).
    settle_s: float = 3.0
    #: The busy guest instead of the light churn (the busy_* fields size it).
    busy: bool = False
    busy_anon_workers: int = 2
    busy_anon_mib: int = 64
    busy_keep_mib: int = 16
    busy_tmpfs_mib: int = 64
    busy_tmpfs_keep_mib: int = 16
    busy_cache_mib: int = 32
    busy_drop_every: float = 1.0
    busy_forkers: int = 1

    @property
    def name(self) -> str:
        return "busy" if self.busy else "churn"

    @property
    def script(self) -> str:
        """The in-guest workload that runs during the migration and checks afterwards."""
        return "busy.py" if self.busy else "churn.py"

    def churn_args(self) -> list[str]:
        return [
            "--workers",
            str(self.churn_workers),
            "--loop-mib",
            str(self.churn_loop_mib),
            "--keep-mib",
            str(self.churn_keep_mib),
            "--dwell",
            str(self.churn_dwell),
        ]

    def busy_args(self) -> list[str]:
        return [
            "--anon-workers",
            str(self.busy_anon_workers),
            "--anon-mib",
            str(self.busy_anon_mib),
            "--keep-mib",
            str(self.busy_keep_mib),
            "--tmpfs-mib",
            str(self.busy_tmpfs_mib),
            "--tmpfs-keep-mib",
            str(self.busy_tmpfs_keep_mib),
            "--cache-mib",
            str(self.busy_cache_mib),
            "--drop-every",
            str(self.busy_drop_every),
            "--forkers",
            str(self.busy_forkers),
        ]

    def start_args(self) -> list[str]:
        return ["start", *(self.busy_args() if self.busy else self.churn_args())]

    def describe(self) -> str:
        """One line for reports."""
        return f"fill and free {self.fill_mib} MiB, then {self.script} {' '.join(self.start_args())}"


@dataclass
class Outcome:
    """What a :class:`Migrator` reports about one migration."""

    result: MigrationResult
    #: Seconds from starting the migration (the first QMP or CLI call) to the
    #: destination having loaded everything.
    wall_s: float
    #: fphint only: the collector's report (JSON), the agent's source.
    report: Mapping[str, Any] | None = None
    agent_source: str = ""


class Migrator(Protocol):
    def migrate(self, src: VM, dst: VM, link: LinkRelay, timeout: float) -> Outcome:
        """Migrate ``src`` to ``dst`` (already listening behind ``link``)."""


#: On in every scenario, as fph-collector migrate turns it on: with it the
#: source's total time and downtime end when the destination has loaded the
#: last byte (its SHUT on the return path), without it when the source's
#: socket accepted it, with the link's buffers still to drain.
SAME_CLOCK = {"return-path": True}


class PlainMigrator:
    """QEMU's own migration, straight to the link (QEMU's bandwidth limit off)."""

    def migrate(self, src: VM, dst: VM, link: LinkRelay, timeout: float) -> Outcome:
        t = time.monotonic()
        result = migrate(src, link.uri, dst=dst, max_bandwidth=FAST_BANDWIDTH, timeout=timeout, capabilities=SAME_CLOCK)
        return Outcome(result, time.monotonic() - t)


@dataclass
class RunResult:
    """One migration of a scenario's chain: the comparison's row material."""

    scenario: str
    run: int
    qemu: str
    #: The accelerator's label ("TCG", "KVM (-cpu host)"), guest RAM, workload name.
    accel: str = ""
    guest_mib: int = 0
    workload: str = "churn"
    ok: bool = False
    #: Why the run is not ok (migration failed, guest hurt, workload found bad bytes).
    problems: list[str] = field(default_factory=list)
    survived: bool = False
    #: Source -> destination bytes of the main channel, counted in the link relay.
    wire_bytes: int = 0
    wire_back_bytes: int = 0
    #: QEMU's own counters (source query-migrate).
    qemu_transferred: int = 0
    normal_pages: int = 0
    duplicate_pages: int = 0
    dirty_sync_count: int = 0
    total_time_ms: int = 0
    downtime_ms: int = 0
    #: Bytes QEMU sent while the guest was stopped (QEMU 8.1+).
    downtime_bytes: int = 0
    setup_time_ms: int = 0
    wall_s: float = 0.0
    #: Guest CPU (from the guest's /proc/stat) over the migration: busy seconds and busy share.
    guest_cpu_busy_s: float = 0.0
    guest_cpu_share: float = 0.0
    churn_iterations: int = 0
    guest_used_mib: float = 0.0
    agent_source: str = ""
    report: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Section: guest probes


def cpu_jiffies(vm: VM) -> tuple[int, int]:
    """(busy, total) jiffies of the guest's CPUs from /proc/stat."""
    fields = [int(x) for x in vm.output("head -1 /proc/stat").split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest/guest_nice are already in user/nice
    return total - idle, total


def used_mib(vm: VM) -> float:
    """MemTotal - MemFree, as in the reference measurements."""
    info = dict(line.split(":", 1) for line in vm.output("cat /proc/meminfo").splitlines() if ":" in line)
    kib = int(info["MemTotal"].split()[0]) - int(info["MemFree"].split()[0])
    return kib / 1024


def guest_problems(vm: VM, boot_id: str) -> list[str]:
    """What is wrong with a migrated guest: dead QEMU, new boot, kernel trouble."""
    if not vm.is_running():
        return [f"{vm.name}: QEMU exited (status {vm.exitcode}); console tail:\n" + vm.describe(1500)]
    problems = []
    try:
        now = vm.boot_id()
        if now != boot_id:
            problems.append(f"{vm.name}: boot id changed ({boot_id} -> {now}): the guest rebooted")
        problems += [f"{vm.name}: kernel log: {line}" for line in vm.kernel_trouble()]
    except VMError as exc:
        problems.append(f"{vm.name}: guest unreachable: {exc}")
    except Exception as exc:  # console timeouts: a hung guest
        problems.append(f"{vm.name}: guest does not answer: {type(exc).__name__}: {exc}")
    return problems


def churn_check(vm: VM, script: str = "churn.py") -> tuple[list[str], int]:
    """Stop the churn (or busy) workload and let it verify everything; (problems, iterations)."""
    try:
        check = vm.workload(script, "check", timeout=240, check=False)
    except Exception as exc:
        return [f"{vm.name}: churn check did not run: {type(exc).__name__}: {exc}"], 0
    iterations = sum(int(w.get("iterations", 0)) for w in check.get("workers", []))
    if check.get("ok"):
        return [], iterations
    bad = []
    for w in check.get("workers", []):
        for e in w.get("errors", [])[:5]:
            bad.append(f"worker {w.get('id')}: {e}")
        if w.get("keep_bad_pages"):
            bad.append(f"worker {w.get('id')}: {w['keep_bad_pages']} bad pages in its keep region")
    return [f"{vm.name}: workload verification failed: {check.get('problems')} {bad[:12]}"], iterations


# Section: chains


@contextlib.contextmanager
def vm_session(
    label: str, keep: bool = False, accel: str | None = None, *, shared_destination_ram: bool = True
) -> Iterator[VMFactory]:
    """A VM factory outside pytest (benchmark, demo): builds or reuses the
    image, and shuts every VM down at the end; the run directory (logs) is
    removed unless something failed or ``keep``.

    :param accel: kvm, tcg or auto (an --accel option); None: ``$FPH_ACCEL``,
        else auto (vmimage.accel.choose, decided here once for every guest).
    :param shared_destination_ram: see :class:`VMFactory`.
    """
    parse_mode(accel if accel is not None else os.environ.get(ACCEL_ENV))  # a bad value fails before any build
    remove_stale_ram_files()
    image = ensure_image()
    chosen = choose(default_binary(), image.kernel, accel)
    rundir = Path(tempfile.mkdtemp(prefix=f"fphvm-{label}-", dir="/tmp"))
    factory = VMFactory(image, rundir, accel=chosen, shared_destination_ram=shared_destination_ram)
    failed = False
    try:
        yield factory
    except BaseException:
        failed = True
        for vm in factory.vms:
            print(vm.describe(), file=sys.stderr)
        raise
    finally:
        errors = factory.shutdown_all()
        if failed or errors or keep or os.environ.get("FPHINT_VM_KEEP"):
            print(f"VM logs kept in {rundir}", file=sys.stderr)
        else:
            shutil.rmtree(rundir, ignore_errors=True)


#: Host memory a migration pair needs beyond its two RAMs: two QEMUs
#: (~0.3 GiB each), the collector, the relay, and room for everyone else.
PAIR_MARGIN_MIB = 1536


def meminfo_mib(path: str = "/proc/meminfo") -> dict[str, float]:
    """/proc/meminfo in MiB."""
    out = {}
    for line in Path(path).read_text().splitlines():
        key, _, rest = line.partition(":")
        if rest.split():
            out[key] = int(rest.split()[0]) / 1024
    return out


def pair_fits(
    guest_mib: int,
    *,
    shm_dir: Path = SHM_DIR,
    meminfo: Mapping[str, float] | None = None,
    shm_free_mib: float | None = None,
    shared_destination_ram: bool = True,
) -> str | None:
    """Why a source and destination of ``guest_mib`` each cannot run here now
    (None: they fit).

    Both RAMs end up fully allocated (a migration reads or writes every
    page): 2 x guest RAM of available memory, plus :data:`PAIR_MARGIN_MIB`;
    the source's RAM file lives in tmpfs (``shm_dir``), and so does the
    destination's unless ``shared_destination_ram`` is False (anonymous RAM).
    """
    need = 2 * guest_mib
    shm_need = need if shared_destination_ram else guest_mib
    info = meminfo if meminfo is not None else meminfo_mib()
    available = info.get("MemAvailable", 0.0)
    if shm_free_mib is None:
        st = os.statvfs(shm_dir)
        shm_free_mib = st.f_bavail * st.f_frsize / MiB
    shm_free = shm_free_mib
    if shm_free < shm_need:
        return (
            f"a {guest_mib} MiB guest pair needs {shm_need} MiB in {shm_dir}, which has {shm_free:.0f} MiB free "
            f"(raise its size: mount -o remount,size=... {shm_dir})"
        )
    if available < need + PAIR_MARGIN_MIB:
        return (
            f"a {guest_mib} MiB guest pair needs {need + PAIR_MARGIN_MIB} MiB of host memory (two RAMs "
            f"of {guest_mib} MiB + {PAIR_MARGIN_MIB} MiB for the QEMUs and the rest), but only "
            f"{available:.0f} MiB is available (MemAvailable of {info.get('MemTotal', 0):.0f} MiB)"
        )
    return None


def boot_for(
    factory: VMFactory,
    scenario: Scenario,
    name: str,
    *,
    mem_mib: int = 1024,
    guest_fields: Mapping[str, Any] | None = None,
) -> VM:
    """Boot a source guest configured for ``scenario``."""
    fields: dict[str, Any] = {"mem_mib": mem_mib, "append": scenario.kernel_args, "balloon": scenario.balloon}
    fields.update(guest_fields or {})
    vm = factory.boot(name, **fields)
    if scenario.agent == "kpageflags":
        vm.run(
            "systemd-run --unit fph-agent-kpageflags --property=Restart=on-failure "
            "/opt/fphint/bin/fph-agent --source kpageflags --log-format json run"
        )
    if scenario.balloon != "none":
        # udev loads virtio_balloon; hinting/reporting start once it is bound.
        vm.run(
            "for i in $(seq 50); do [ -d /sys/bus/virtio/drivers/virtio_balloon ] && break; sleep 0.2; done; "
            "modprobe virtio_balloon"
        )
    return vm


def prepare(vm: VM, workload: Workload) -> None:
    """Garbage in free memory, then the churn (or busy) workload running."""
    # Under TCG a fill writes and verifies ~50-60 MiB/s: 6 GiB take ~2 min.
    filled = vm.workload("fill.py", str(workload.fill_mib), timeout=max(300.0, workload.fill_mib / 10))
    if filled["bad_pages"]:
        raise VMError(f"{vm.name}: fill.py read back bad pages before any migration: {filled}")
    started = vm.workload(workload.script, *workload.start_args(), timeout=240)
    if not started.get("ok"):
        raise VMError(f"{vm.name}: {workload.script} did not start: {started}")
    time.sleep(workload.settle_s)


def set_switchover_bandwidth(vm: VM, rate_bps: float | None) -> None:
    """Tell QEMU the link's rate for its switchover decision (not a limit).

    QEMU otherwise estimates the bandwidth from how fast its socket drains.
    Behind a proxy that buffers (fphint's holds records until the gate has
    decided), the estimate runs far above the link, QEMU stops the guest with
    100+ MiB of the first pass left, and sends it during the downtime
    (measured: 110-166 MiB and 1.1-1.9 s of downtime, against 10-27 MiB and
    0.3-0.5 s with the link's rate set). Every scenario gets the same setting.
    QEMU before 8.2 lacks the parameter: left alone there.
    """
    version = tuple(int(x) for x in vm.qemu_version.split(".")[:2] if x.isdigit())
    if version < (8, 2):
        return
    vm.cmd("migrate-set-parameters", {"avail-switchover-bandwidth": int(rate_bps / 8) if rate_bps else 0})


def migrate_once(
    factory: VMFactory,
    src: VM,
    dst_name: str,
    migrator: Migrator,
    *,
    scenario: Scenario,
    run: int,
    boot_id: str,
    link_rate_bps: float | None = GIGABIT,
    timeout: float = 300.0,
    paused: bool = False,
    verify: bool = True,
    workload: Workload | None = None,
) -> tuple[RunResult, VM]:
    """One migration of a prepared, churning ``src`` through a fresh link.

    :param paused: leave the destination paused (-S) for a RAM comparison;
        then nothing is verified in the guest here (``verify`` is ignored).
    :return: the run's figures and the destination VM (running unless ``paused``).
    """
    res = RunResult(
        scenario.name,
        run,
        src.qemu_version,
        accel=src.accel.label,
        guest_mib=src.guest.mem_mib,
        workload=(workload or Workload()).name,
    )
    busy0, total0 = cpu_jiffies(src)
    if scenario.reclaim and not scenario.fphint:  # fphint's agent does its own, at the first request
        src.run("echo 1 > /proc/sys/vm/drop_caches")
    res.guest_used_mib = round(used_mib(src), 1)
    set_switchover_bandwidth(src, link_rate_bps)
    dst = factory.destination(src, dst_name, paused=paused)
    incoming = start_incoming(dst)
    with LinkRelay(incoming, rate_bps=link_rate_bps) as link:
        try:
            out = migrator.migrate(src, dst, link, timeout)
        except MigrationError as exc:
            res.problems.append(f"migration failed: {exc}")
            _fill_link(res, link.stats())
            return res, dst
        try:
            stats = link.wait_idle(10)
        except Exception:
            stats = link.stats()
    _fill_link(res, stats)
    r = out.result
    res.qemu_transferred = int(r.ram.get("transferred", 0))
    res.normal_pages = int(r.ram.get("normal", 0))
    res.duplicate_pages = int(r.ram.get("duplicate", 0))
    res.dirty_sync_count = int(r.ram.get("dirty-sync-count", 0))
    res.total_time_ms = r.total_time_ms
    res.downtime_ms = r.downtime_ms
    res.setup_time_ms = int(r.info.get("setup-time", 0))
    res.downtime_bytes = int(r.ram.get("downtime-bytes", 0))
    res.wall_s = round(out.wall_s, 3)
    res.report = out.report
    res.agent_source = out.agent_source
    if paused:
        res.ok = True
        return res, dst
    problems = guest_problems(dst, boot_id)
    if not problems:
        busy1, total1 = cpu_jiffies(dst)
        hz = 100  # USER_HZ
        res.guest_cpu_busy_s = round((busy1 - busy0) / hz, 2)
        res.guest_cpu_share = round((busy1 - busy0) / max(1, total1 - total0), 3)
    res.survived = not problems
    if verify and not problems:
        bad, res.churn_iterations = churn_check(dst, (workload or Workload()).script)
        problems += bad
    res.problems += problems
    res.ok = not res.problems
    return res, dst


def _fill_link(res: RunResult, stats: LinkStats) -> None:
    res.wire_bytes = stats.main.forward_bytes
    res.wire_back_bytes = stats.main.backward_bytes


def run_chain(
    factory: VMFactory,
    scenario: Scenario,
    runs: int,
    migrator: Migrator,
    *,
    workload: Workload = Workload(),
    link_rate_bps: float | None = GIGABIT,
    guest_fields: Mapping[str, Any] | None = None,
    on_result: Callable[[RunResult], None] | None = None,
    before_migrate: Callable[[VM], None] | None = None,
    mem_mib: int = 1024,
    label: str | None = None,
    after_boot: Callable[[VM], None] | None = None,
) -> list[RunResult]:
    """Boot a guest of ``mem_mib`` for ``scenario`` and migrate it ``runs``
    times in a chain.

    A run whose destination did not survive (or whose migration failed) ends
    the chain; the next run boots a fresh guest. Before each boot the host
    must have room for a source and a destination (:func:`pair_fits`); a run
    without it is recorded with the reason, nothing is booted. VMs are named
    after ``label`` (default: the scenario's name; unique per factory).
    ``after_boot`` runs once per boot, before the first fill (e.g. wait for
    the agent: a user's guest has had its agent up long before a migration).
    """
    label = label or scenario.name
    results: list[RunResult] = []
    src: VM | None = None
    boot_id = ""
    boots = 0
    for run in range(runs):
        if src is None:
            no_room = pair_fits(mem_mib)
            if no_room:
                res = RunResult(
                    scenario.name, run, "", guest_mib=mem_mib, workload=workload.name, problems=[f"not run: {no_room}"]
                )
                results.append(res)
                if on_result:
                    on_result(res)
                continue
            boots += 1
            src = boot_for(factory, scenario, f"{label}-boot{boots}", mem_mib=mem_mib, guest_fields=guest_fields)
            boot_id = src.boot_id()
            if after_boot is not None:
                after_boot(src)
        try:
            prepare(src, workload)
            if before_migrate is not None:
                before_migrate(src)
        except Exception as exc:
            res = RunResult(
                scenario.name,
                run,
                src.qemu_version,
                problems=[f"preparing the guest failed: {exc}"],
                accel=src.accel.label,
                guest_mib=src.guest.mem_mib,
                workload=workload.name,
            )
            results.append(res)
            if on_result:
                on_result(res)
            _retire(src)
            src = None
            continue
        res, dst = migrate_once(
            factory,
            src,
            f"{label}-r{run}",
            migrator,
            scenario=scenario,
            run=run,
            boot_id=boot_id,
            link_rate_bps=link_rate_bps,
            workload=workload,
        )
        results.append(res)
        if on_result:
            on_result(res)
        if res.survived and res.qemu_transferred:
            _retire(src)
            src = dst
        else:
            # Migration failed (source still runs) or the destination is hurt:
            # start the next run from a fresh boot, so one failure costs one run.
            _retire(dst)
            _retire(src)
            src = None
    if src is not None:
        _retire(src)
    return results


def _retire(vm: VM) -> None:
    """Shut a VM down now (it frees its RAM file); errors only logged."""
    try:
        vm.shutdown(timeout=15)
    except Exception as exc:
        LOG.warning("%s: shutdown: %s", vm.name, exc)


# Section: summaries


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    n: int

    def fmt(self, scale: float = 1.0, digits: int = 0) -> str:
        if not self.n:
            return "-"
        m, lo, hi = (round(v / scale, digits) for v in (self.median, self.low, self.high))
        f = f"{{:.{digits}f}}"
        return f.format(m) if lo == hi else f"{f.format(m)} ({f.format(lo)}–{f.format(hi)})"


def spread(values: Sequence[float]) -> Spread:
    vals = [float(v) for v in values]
    if not vals:
        return Spread(0.0, 0.0, 0.0, 0)
    return Spread(statistics.median(vals), min(vals), max(vals), len(vals))


@dataclass(frozen=True)
class Summary:
    scenario: str
    label: str
    runs: int
    completed: int
    survived: int
    corrupt: int
    wire_bytes: Spread
    total_time_ms: Spread
    downtime_ms: Spread
    wall_s: Spread
    guest_cpu_share: Spread
    dirty_sync_count: Spread

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(scenario: Scenario, results: Sequence[RunResult]) -> Summary:
    """Medians and spreads over the runs whose migration completed."""
    done = [r for r in results if r.qemu_transferred]
    return Summary(
        scenario=scenario.name,
        label=scenario.label,
        runs=len(results),
        completed=len(done),
        survived=sum(r.survived for r in results),
        corrupt=sum(any("verification failed" in p for p in r.problems) for r in results),
        wire_bytes=spread([r.wire_bytes for r in done]),
        total_time_ms=spread([r.total_time_ms for r in done]),
        downtime_ms=spread([r.downtime_ms for r in done]),
        wall_s=spread([r.wall_s for r in done]),
        guest_cpu_share=spread([r.guest_cpu_share for r in done if r.survived]),
        dirty_sync_count=spread([r.dirty_sync_count for r in done]),
    )


def table(summaries: Sequence[Summary]) -> str:
    """A Markdown table: medians with (min–max) over the runs."""
    head = (
        "| scenario | runs | wire MiB | total time ms | downtime ms | guest CPU busy % | syncs "
        "| survived | corrupted |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for s in summaries:
        rows.append(
            f"| {s.label} | {s.completed}/{s.runs} | {s.wire_bytes.fmt(MiB, 1)} | {s.total_time_ms.fmt()} "
            f"| {s.downtime_ms.fmt()} | {s.guest_cpu_share.fmt(0.01)} | {s.dirty_sync_count.fmt()} "
            f"| {s.survived}/{s.runs} | {s.corrupt} |"
        )
    return "\n".join(rows)
