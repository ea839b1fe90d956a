"""``EbpfSource``: the free-page source that reads struct page from BPF."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ... import memory
from ..base import FreePageSource, Probe, ScanSummary, SourceUnavailable
from . import checks, headers, selftest, system, vmemmap
from .hooks import Hooks, grace_period
from .layout import PageLayout, PageLayoutError, release_version
from .live import EbpfLiveFrees
from .program import ISOLATE_KPROBE, TRACKERS, Ctl, LoadedProgram, LoadError, ProgramConfig, tracepoint_fields
from .scanner import RamMap, Scanner, ScanPart
from .system import KernelPaths
from .tracked import TrackedAnswer

log = logging.getLogger(__name__)

#: Self-test attempts before giving up (churn can spoil one).
SELF_TEST_TRIES = 3


@dataclass(frozen=True)
class Options:
    self_test: bool = True
    #: Live frees: at most this many free events per ~1.07 s (each one block),
    #: through a ring of this many pages (a burst beyond it is dropped).
    live_per_s: int = 32768
    live_ring_pages: int = 128
    #: Free blocks are collected in portions of this many PFNs (a power of
    #: two): the unit sent early, and the size of the record array.
    portion_pfns: int = 1 << 17
    #: Tests only, to show what the checks catch. Never turn off in the agent.
    crosscheck: bool = True
    recheck: bool = True
    tracked_subtraction: bool = True
    #: Seconds the loader child may take to compile and load (TCG guests
    #: need ~30 s).
    load_timeout: float = 120.0
    #: Allow scan once, then track (docs/safety-rule.md §5.6); it is used
    #: only where every exit from the free lists is marked.
    tracking: bool = True


class EbpfSource(FreePageSource):
    """Free buddy blocks read from ``struct page`` by a BPF program.

    ``probe()`` checks cheaply; ``open()`` compiles and loads the program,
    finds vmemmap_base, attaches the allocation tracepoints and proves the
    whole chain against /proc/kpageflags.
    """

    name = "ebpf"

    def __init__(self, paths: KernelPaths | None = None, options: Options | None = None) -> None:
        self.paths = paths or KernelPaths()
        self.options = options or Options()
        self._findings: checks.Findings | None = None
        self._prog: LoadedProgram | None = None
        self._scanner: Scanner | None = None
        self._live: EbpfLiveFrees | None = None
        self._facts: dict[str, str] = {}
        self._lock = threading.Lock()
        self._track_why = "not open"
        #: Bumped by cancel_scans(); a scan that began before stops.
        self._scan_gen = 0

    # -- setup -----------------------------------------------------------------

    def probe(self) -> Probe:
        self._findings = checks.run(self.paths)
        found = self._findings
        return Probe(self.name, not found.reason, found.reason)

    def open(self) -> None:
        if self._scanner is not None:
            return
        found = self._findings if self._findings and not self._findings.reason else None
        if found is None:
            found = checks.run(self.paths)
            self._findings = found
        if found.reason or found.layout is None:
            raise SourceUnavailable(found.reason)
        try:
            self._open(found)
        except BaseException:
            self.close()
            raise
        finally:
            # The parsed BTF (every type of the kernel) is ~13 MiB of Python
            # objects and nothing reads it after open: every resident page of
            # the agent is guest memory each migration sends.
            found.btf = None
            memory.give_back()

    def _open(self, found: checks.Findings) -> None:
        assert found.layout is not None
        t0 = time.monotonic()
        opts = self.options
        config = program_config(found.layout, self.paths, opts)
        try:
            prog = self._prog = LoadedProgram(
                config, found.kernel_source, tracefs=self.paths.tracefs, timeout=opts.load_timeout
            )
        except LoadError as e:
            raise SourceUnavailable(_load_reason(e)) from e
        try:
            where = vmemmap.discover(prog, self.paths.kallsyms)
        except (vmemmap.VmemmapError, OSError) as e:
            raise SourceUnavailable(f"cannot find vmemmap_base: {e}") from e
        except LoadError as e:
            raise SourceUnavailable(f"cannot find vmemmap_base: {e}") from e
        prog.ctl[Ctl.VMEMMAP] = where.base
        prog.ctl[Ctl.NOCHECK] = 0 if opts.crosscheck else 1
        hooks = Hooks(prog)
        kprobe, kfn = ISOLATE_KPROBE
        try:
            prog.attach_kprobe(kprobe, kfn)
            hooks.kprobes.append((kprobe, kfn))
        except (OSError, LoadError) as e:
            log.info("no kprobe on %s (%s)", kprobe, e)
        for tp, (fn, _args, required) in TRACKERS.items():
            if tp in found.absent_tracepoints:
                continue
            if tp == FAST_ISOLATE and hooks.kprobes:
                # The kprobe marks exactly the block the fast path isolates;
                # the tracepoint could only mark everything above min_pfn.
                continue
            try:
                prog.attach_raw(tp, fn)
                hooks.raw.append((tp, fn))
            except Exception as e:
                if required:
                    raise SourceUnavailable(f"cannot attach to tracepoint {tp}: {e}") from e
        # Attached now; the self-test's scans must not race the attaching.
        hooks.attached = True
        try:
            grace_period()
        except OSError as e:
            log.warning("no RCU grace period from membarrier (%s): exit hooks stay attached", e)
            hooks.detachable = False
            time.sleep(0.05)
        attached = hooks.names()
        self._track_why = tracking_refusal(attached, opts)
        self._scanner = Scanner(prog, RamMap(self.paths, config.bitmap_pfns), hooks)
        self._scanner.tracked.subtract = opts.tracked_subtraction
        self._facts = {
            "encoding": found.layout.encoding.source,
            "struct_page": (
                f"size {found.layout.sizeof_page}, page_type@{found.layout.off_page_type}, "
                f"private@{found.layout.off_private}, _refcount@{found.layout.off_refcount}, "
                f"max order {found.layout.max_order}"
            ),
            "vmemmap_base": f"{where.base:#x} ({where.method})",
            "headers": headers.describe(found.kernel_source),
            "tracepoints": ",".join(attached),
            "scan_windows": str(prog.config.scan_windows),
            "tracking": f"off: {self._track_why}" if self._track_why else "on",
        }
        if found.notes:
            self._facts["notes"] = "; ".join(found.notes)
        if opts.self_test:
            self._self_test()
        self._facts["open_s"] = f"{time.monotonic() - t0:.2f}"
        log.info("ebpf source ready: %s", self._facts)

    def _self_test(self) -> None:
        assert self._scanner is not None
        result = selftest.Comparison()
        for attempt in range(SELF_TEST_TRIES):
            result = selftest.run(self._scanner, self.paths.kpageflags)
            if not result.failure():
                self._facts["self_test"] = result.summary()
                return
            log.info("ebpf self-test attempt %d failed: %s", attempt + 1, result.failure())
        raise SourceUnavailable(
            f"self-test against {self.paths.kpageflags} failed: {result.failure()} ({result.summary()})"
        )

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        self._scanner = None
        if self._prog is not None:
            self._prog.close()
            self._prog = None

    # -- use -------------------------------------------------------------------

    @property
    def loaded_config(self) -> ProgramConfig | None:
        """The configuration of the loaded program (None until open)."""
        return self._prog.config if self._prog is not None else None

    @property
    def facts(self) -> dict[str, str]:
        """What open() found, for the logs and the agent's attach facts."""
        return dict(self._facts)

    @property
    def scanner(self) -> Scanner:
        if self._scanner is None:
            raise SourceUnavailable("ebpf source is not open")
        return self._scanner

    def parts(self, deadline: float | None = None) -> Iterator[ScanPart]:
        """Scan now, yielding non-empty parts as soon as each is ready.

        Each part is sound on its own; send it before asking for the next to
        keep the time from request to first chunk short. :meth:`cancel_scans`
        stops it between two BPF runs.
        """
        gen = self._scan_gen
        with self._lock:  # one scan at a time: they share the BPF arrays
            for part in self.scanner.parts(deadline, lambda: self._scan_gen != gen):
                if part.ranges:
                    yield part

    def cancel_scans(self) -> None:
        self._scan_gen += 1

    @property
    def can_track(self) -> bool:
        return not self._track_why

    def set_tracking(self, on: bool) -> bool:
        """Scan once, then track (on) or not (off); False when this kernel
        does not allow it (``facts['tracking']`` says why)."""
        if on and self._track_why:
            return False
        self.scanner.set_tracking(on)
        return on

    def tracked(self) -> TrackedAnswer | None:
        """The pages free now by tracking, without a scan; None when not tracking
        or no scan has run since tracking began."""
        return self.scanner.answer() if self._scanner is not None else None

    def scan_summary(self) -> ScanSummary:
        stats = self.scanner.last
        return ScanSummary(
            complete=stats.complete,
            details={
                "bpf_runs": float(stats.runs + stats.filter_runs),
                "parts": float(stats.parts),
                "blocks": float(stats.blocks),
                "blocks_dropped": float(stats.dropped),
                "wide_events": float(stats.wide_events),
                "all_dropped": float(stats.overflowed),
                **stats.extra,
            },
        )

    def live_frees(self) -> EbpfLiveFrees:
        if self._prog is None or self._scanner is None:
            raise SourceUnavailable("ebpf source is not open")
        if self._live is None:
            scanner = self._scanner
            self._live = EbpfLiveFrees(self._prog, keep_attached=lambda: scanner.tracking)
            scanner.on_idle = self._live.detach_if_idle
        return self._live


#: The compaction fast path's tracepoint (6.2+): a lower bound only.
FAST_ISOLATE = "mm_compaction_fast_isolate_freepages"


def tracking_refusal(attached: list[str], options: Options) -> str:
    """Why this kernel's attached hooks do not allow tracking, or "".

    Tracking needs every exit from the buddy free lists marked
    (docs/safety-rule.md §5.6): the allocation tracepoints (required to
    open at all) and every isolation of a free block, either from the kprobe
    on ``__isolate_free_page`` or from both compaction tracepoints (Linux 6.1
    isolates blocks in ``fast_isolate_freepages`` with no tracepoint).
    """
    if not options.tracking:
        return "turned off (Options.tracking)"
    if f"kprobe:{ISOLATE_KPROBE[0]}" in attached:
        return ""
    need = ("mm_compaction_isolate_freepages", "mm_compaction_fast_isolate_freepages")
    missing = [tp for tp in need if tp not in attached]
    if missing:
        return f"no kprobe on {ISOLATE_KPROBE[0]} and no tracepoint {', '.join(missing)}"
    return ""


#: Scan windows per BPF run the verifier accepts, by kernel: 6.1's verifier
#: walks the candidate loop far more often (1M-instruction limit past 32
#: windows, Debian 12's 6.1.0), 6.18's accepts 256. A refusal costs seconds
#: before the loader halves and retries, so start where it will pass.
OLD_VERIFIER = (6, 4)


def scan_windows_for(release: str) -> int:
    try:
        return 128 if release_version(release) >= OLD_VERIFIER else 32
    except PageLayoutError:
        return 32


def program_config(layout: PageLayout, paths: KernelPaths, options: Options) -> ProgramConfig:
    """The program's numbers for this kernel and RAM size."""
    if options.portion_pfns <= 0 or options.portion_pfns & (options.portion_pfns - 1):
        raise ValueError(f"portion_pfns={options.portion_pfns} is not a power of two")
    ram = system.ram_pfn_ranges(paths.iomem)
    extra: dict[str, int] = {}
    try:  # kmem:mm_page_free's record layout, for the vmemmap pairing
        fields = tracepoint_fields(paths.tracefs, "kmem", "mm_page_free")
        extra = {"tp_free_pfn": fields["pfn"][0], "tp_free_order": fields["order"][0]}
    except (OSError, KeyError):
        pass
    return ProgramConfig(
        layout=layout,
        bitmap_pfns=ram[-1][1] if ram else 64,
        scan_windows=scan_windows_for(system.kernel_release()),
        nr_recs=options.portion_pfns,
        live_per_slot=options.live_per_s,
        live_pages=options.live_ring_pages,
        no_recheck=not options.recheck,
        **extra,
    )


def _load_reason(e: LoadError) -> str:
    text = str(e)
    if "Operation not permitted" in text or "Permission denied" in text:
        return f"BPF not permitted: {text}"
    return text
