"""The BPF program: its -D flags, loading (in a child), and handles to it.

scan.bpf.c holds the C; this module computes every number it needs (from BTF
and the RAM size), has a loader child compile and load it, attaches the
tracepoint programs, and maps the shared arrays into this process.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import mmap
import os
import re
from dataclasses import dataclass

from ...errors import AgentError
from . import loader, pagecache, perf
from .bpfsys import (
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_RINGBUF,
    BPF_PROG_TYPE_KPROBE,
    BPF_PROG_TYPE_RAW_TRACEPOINT,
    BPF_PROG_TYPE_TRACEPOINT,
    TestRunner,
    map_array,
    map_info,
    prog_type,
    raw_tracepoint_open,
)
from .btf import Btf, BtfError, Kind
from .layout import PageLayout
from .program_text import SOURCE_FILE, program_source
from .ringbuf import RingBuffer
from .system import PAGE_SHIFT

log = logging.getLogger(__name__)


class Ctl(enum.IntEnum):
    """Word indexes of the control block shared with scan.bpf.c (FPH_C_*)."""

    VMEMMAP = 0
    GATE = 1
    CURSOR = 2
    NREC = 3
    FAULTS = 4
    REJECTS = 5
    RUN_START = 6
    RUN_END = 7
    RUN_N = 8
    FILTERED = 9
    DROPPED = 10
    NOCHECK = 11
    BEGINS = 12
    PEEK = 13
    WIDE_N = 14
    LIVE_GEN = 15
    LIVE_SLOT = 16
    LIVE_SLOT_N = 17
    LIVE_LOST = 18
    WIDE = 32


#: Power of two (the C masks indexes with it).
CTL_WORDS = 128
#: (start, end) pairs for events covering too many pages to mark one by one.
WIDE_MAX = (CTL_WORDS - Ctl.WIDE) // 2

#: Raw tracepoints that mark pages leaving the buddy lists: program, and the
#: argument types the C assumes (after the leading ``void *``).
PAGE_ARGS = ("struct page *", "int")
RANGE_ARGS = ("long", "long", "long")
TRACKERS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    # tracepoint: (program, argument kinds, required)
    "mm_page_alloc": ("on_alloc", PAGE_ARGS, True),
    "mm_page_alloc_zone_locked": ("on_alloc_zone_locked", PAGE_ARGS, True),
    "mm_page_alloc_extfrag": ("on_extfrag", (*PAGE_ARGS, "int"), True),
    "mm_compaction_isolate_freepages": ("on_isolate", (*RANGE_ARGS, "long"), False),
    "mm_compaction_fast_isolate_freepages": ("on_fast_isolate", (*RANGE_ARGS, "long"), False),
    "test_pages_isolated": ("on_test_isolated", RANGE_ARGS, False),
}
LIVE_TRACEPOINT = ("mm_page_free", "on_free", PAGE_ARGS)
#: Kernel function whose entry marks every free block isolated from the free
#: lists (optional: kernels without kprobes, or where it is inlined, lack it).
ISOLATE_KPROBE = ("__isolate_free_page", "on_isolate_free")
#: Tracepoints whose absence makes the source unusable.
REQUIRED_RAW = ("mm_page_free", *tuple(t for t, (_, _, req) in TRACKERS.items() if req))


def _arg_matches(btf: Btf, tid: int, want: str) -> bool:
    tid = btf.strip(tid)
    if want == "struct page *":
        return btf.describe(tid) == "struct page *"
    if tid == 0 or btf.kind(tid) not in (Kind.INT, Kind.ENUM):
        return False
    return want == "int" or btf.size(tid) == 8


def tracepoint_problems(btf: Btf) -> tuple[list[str], list[str]]:
    """Check the raw tracepoint prototypes against what the C reads.

    :return: (problems with required tracepoints, optional ones missing).
    """
    problems: list[str] = []
    missing: list[str] = []
    wanted = dict(TRACKERS)
    wanted[LIVE_TRACEPOINT[0]] = (LIVE_TRACEPOINT[1], LIVE_TRACEPOINT[2], True)
    for tp, (_, args, required) in wanted.items():
        tid = btf.find(Kind.TYPEDEF, "btf_trace_" + tp)
        if tid is None:
            (problems if required else missing).append(f"{tp}: not in BTF")
            continue
        try:
            params = btf.func_proto_params(tid)
        except BtfError as e:
            problems.append(f"{tp}: {e}")
            continue
        have = [btf.describe(p) for p in params[1:]]
        if len(params) < 1 + len(args) or not all(_arg_matches(btf, p, w) for p, w in zip(params[1:], args)):
            problems.append(f"{tp}({', '.join(have)}) does not start with ({', '.join(args)})")
    return problems, missing


def tracepoint_fields(tracefs: str, category: str, event: str) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of a tracefs event's record fields."""
    path = os.path.join(tracefs, "events", category, event, "format")
    with open(path) as f:
        text = f.read()
    fields = {}
    for m in re.finditer(r"field:[^;]*?(\w+)(?:\[\d*\])?;\s*offset:(\d+);\s*size:(\d+);", text):
        fields[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return fields


@dataclass(frozen=True)
class ProgramConfig:
    """Every number the C is compiled with."""

    layout: PageLayout
    #: PFNs the allocation bitmap covers (everything scanned lies below).
    bitmap_pfns: int
    #: Records per portion; a portion never spans more PFNs than this.
    nr_recs: int = 1 << 17
    #: Per scan run: 64-PFN windows, and buddy candidates handled per window.
    #: 256 windows verify here too, but a refused program costs the verifier
    #: ~30 s before it gives up, and 128 scan as fast: leave older verifiers room.
    scan_windows: int = 128
    candidates: int = 8
    filter_loop: int = 128
    #: Live frees: events per ~1.07 s slot (the rate bound) and ring pages.
    live_per_slot: int = 32768
    live_pages: int = 128
    #: kmem:mm_page_free record offsets (vmemmap discovery).
    tp_free_pfn: int = 8
    tp_free_order: int = 16
    #: Tests only: read page_type once instead of type -> order -> type.
    no_recheck: bool = False

    @property
    def bitmap_words(self) -> int:
        return max(1, -(-self.bitmap_pfns // 64))

    @property
    def mark_words(self) -> int:
        """Largest range, in bitmap words, an event marks bit by bit."""
        return max(64, (3 << self.layout.max_order) // 64 + 2)

    def defines(self) -> dict[str, int]:
        lay = self.layout
        d = {
            "FPH_SIZEOF_PAGE": lay.sizeof_page,
            "FPH_OFF_TYPE": lay.off_page_type,
            "FPH_OFF_PRIVATE": lay.off_private,
            "FPH_OFF_REFCOUNT": lay.off_refcount,
            "FPH_BUDDY_MASK": lay.encoding.mask,
            "FPH_BUDDY_VALUE": lay.encoding.value,
            "FPH_MAX_ORDER": lay.max_order,
            "FPH_PAGE_SHIFT": PAGE_SHIFT,
            "FPH_NR_RECS": self.nr_recs,
            "FPH_BM_WORDS": self.bitmap_words,
            "FPH_MARK_WORDS": self.mark_words,
            "FPH_SCAN_WINDOWS": self.scan_windows,
            "FPH_CANDIDATES": self.candidates,
            "FPH_FILTER_LOOP": self.filter_loop,
            "FPH_WIDE_MAX": WIDE_MAX,
            "FPH_CTL_WORDS": CTL_WORDS,
            "FPH_LIVE_PER_SLOT": self.live_per_slot,
            "FPH_LIVE_PAGES": self.live_pages,
            "FPH_TPF_PFN": self.tp_free_pfn,
            "FPH_TPF_ORDER": self.tp_free_order,
        }
        d.update({f"FPH_C_{c.name}": int(c) for c in Ctl})
        if self.no_recheck:
            d["FPH_NO_RECHECK"] = 1
        return d

    def cflags(self) -> list[str]:
        def spell(v: int) -> str:
            return f"{v:#x}ULL" if v > 0xFFFF else str(v)

        return [f"-D{k}={spell(v)}" for k, v in self.defines().items()]


def render(config: ProgramConfig) -> str:
    """The program exactly as bcc compiles it, flags first (for --show-bpf)."""
    lines = [f"// {SOURCE_FILE}, compiled by bcc with:"]
    lines += [f"//   {flag}" for flag in config.cflags()]
    return "\n".join(lines) + "\n\n" + program_source()


class LoadError(AgentError):
    """The loader child could not compile or load the program, or sent
    something unusable."""


class ProgramRefused(LoadError):
    """The kernel's verifier refused a program."""


#: Loops are halved this many times when the verifier refuses them
#: (jump-sequence limit, shared/reference/ebpf.md §3).
LOOP_RETRIES = 3


#: Programs the parent runs or attaches: name -> program type. The first
#: four are run synchronously; a refusal of any of them is a refusal of the
#: program (the loops are halved); the others are reported and only fail
#: when attached, as before.
SYNC_PROGRAMS = ("scan", "filter", "begin", "peek")
PROGRAMS: dict[str, str] = {
    **{name: "raw_tracepoint" for name in SYNC_PROGRAMS},
    **{fn: "raw_tracepoint" for fn, _args, _req in TRACKERS.values()},
    LIVE_TRACEPOINT[1]: "raw_tracepoint",
    ISOLATE_KPROBE[1]: "kprobe",
    "pair_raw": "raw_tracepoint",
    "pair_tp": "tracepoint",
}
#: Maps the parent reads (the others are held by the programs using them).
MAPS = ("ctl", "recs", "runs", "dirty", "live", "votes")


class LoadedProgram:
    """The loaded program with its synchronous runners and mapped arrays.

    A loader child compiles and loads (loader.py); this process holds only
    fds and talks to the kernel through bpf(2) and perf_event_open(2), so
    neither bcc nor LLVM is ever loaded here.
    """

    def __init__(
        self,
        config: ProgramConfig,
        kernel_source: str | None,
        tracefs: str = "/sys/kernel/tracing",
        timeout: float | None = None,
    ) -> None:
        self._tracefs = tracefs
        self._timeout = loader.TIMEOUT_S if timeout is None else timeout
        self._loaded = loader.Loaded()
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._rings: list[RingBuffer] = []
        self._links: dict[str, int] = {}
        self._files: dict[str, None] = {}
        #: Seconds spent in loader children, and the page cache dropped after.
        self.load_s = 0.0
        self.dropped: pagecache.Dropped | None = None
        last_error = ""
        try:
            for attempt in range(LOOP_RETRIES + 1):
                cfg = dataclasses.replace(
                    config,
                    scan_windows=max(1, config.scan_windows >> attempt),
                    filter_loop=max(1, config.filter_loop >> attempt),
                )
                try:
                    self._compile_and_load(cfg, kernel_source)
                    self.config = cfg
                    break
                except ProgramRefused as e:
                    last_error = str(e)
                    self.close()
                    log.info(
                        "BPF load failed with loops %d/%d, halving: %s",
                        cfg.scan_windows,
                        cfg.filter_loop,
                        e,
                    )
                except LoadError:
                    self.close()
                    raise
            else:
                raise LoadError(last_error)
        finally:
            self.dropped = pagecache.drop(self._files, pagecache.header_dirs(kernel_source))
            log.info("BPF loader: %.2f s; dropped the page cache of %d files", self.load_s, self.dropped.files)

    def _compile_and_load(self, cfg: ProgramConfig, kernel_source: str | None) -> None:
        request = {
            "cflags": cfg.cflags(),
            "kernel_source": kernel_source,
            "programs": PROGRAMS,
            "required": list(SYNC_PROGRAMS),
            "maps": list(MAPS),
        }
        try:
            got = loader.run(request, self._timeout)
        except loader.LoaderError as e:
            raise LoadError(str(e)) from e
        self._loaded = got
        self.load_s += got.seconds
        self._files.update(dict.fromkeys(got.mapped_files))
        if got.error:
            raise (ProgramRefused if got.refused else LoadError)(got.error)
        missing = [n for n in (*SYNC_PROGRAMS, *MAPS) if n not in got.programs and n not in got.maps]
        if missing:
            raise LoadError(f"the BPF loader child did not send {', '.join(missing)}")
        for name in SYNC_PROGRAMS:
            self._check_prog(name, BPF_PROG_TYPE_RAW_TRACEPOINT)
        self.scan = TestRunner(got.programs["scan"])
        self.filter = TestRunner(got.programs["filter"])
        self.begin = TestRunner(got.programs["begin"])
        self.peek = TestRunner(got.programs["peek"])
        self.ctl_map = self._map("ctl", 8 * CTL_WORDS, 1)
        self.ctl = self._view(self.ctl_map)
        self.recs = self._view(self._map("recs", 8, cfg.nr_recs))
        self.runs = self._view(self._map("runs", 16, cfg.nr_recs))
        self.dirty_map = self._map("dirty", 8, cfg.bitmap_words)
        self.dirty = self._view(self.dirty_map)
        self.dirty_bytes = memoryview(self.dirty_map)[: 8 * cfg.bitmap_words]
        self._views.append(self.dirty_bytes)
        self._zero_dirty = bytes(8 * cfg.bitmap_words)

    def _check_prog(self, name: str, want: int) -> int:
        fd = self._loaded.programs[name]
        try:
            kind = prog_type(fd)
        except OSError as e:
            raise LoadError(f"program {name} from the loader child is not a BPF program: {e}") from e
        if kind != want:
            raise LoadError(f"program {name} from the loader child has type {kind}, not {want}")
        return fd

    def _map(self, name: str, value_size: int, entries: int) -> mmap.mmap:
        fd = self.map_fd(name, BPF_MAP_TYPE_ARRAY)
        info = map_info(fd)
        if (info.value_size, info.max_entries) != (value_size, entries):
            raise LoadError(
                f"map {name} from the loader child holds {info.max_entries} x {info.value_size} bytes, "
                f"not {entries} x {value_size}"
            )
        m = map_array(fd, value_size, entries)
        self._maps.append(m)
        return m

    def _view(self, m: mmap.mmap) -> memoryview:
        v = memoryview(m).cast("Q")
        self._views.append(v)
        return v

    def map_fd(self, name: str, map_type: int) -> int:
        """The fd of a map the child sent, checked to be of ``map_type``."""
        fd = self._loaded.maps[name]
        try:
            info = map_info(fd)
        except OSError as e:
            raise LoadError(f"map {name} from the loader child is not a BPF map: {e}") from e
        if info.type != map_type:
            raise LoadError(f"map {name} from the loader child has type {info.type}, not {map_type}")
        return fd

    def ring(self, name: str) -> RingBuffer:
        """A consumer of ring buffer map ``name``, closed with this program."""
        fd = self.map_fd(name, BPF_MAP_TYPE_RINGBUF)
        ring = RingBuffer(fd, map_info(fd).max_entries)
        self._rings.append(ring)
        return ring

    def clear_dirty(self) -> None:
        self.dirty_bytes[:] = self._zero_dirty

    def _prog_fd(self, fn: str, want: int) -> int:
        if fn not in self._loaded.programs:
            why = self._loaded.errors.get(fn, "not sent by the loader child")
            raise LoadError(f"program {fn} is not loaded: {why}")
        return self._check_prog(fn, want)

    def _unattached(self, key: str) -> str:
        """``key``, refused before anything is opened if it is attached already."""
        if key in self._links:
            raise LoadError(f"{key} is already attached")
        return key

    def _unlink(self, key: str) -> None:
        fd = self._links.pop(key, None)
        if fd is None:
            raise LoadError(f"{key} is not attached")
        os.close(fd)

    def attach_raw(self, tracepoint: str, fn: str) -> None:
        key = self._unattached("raw:" + tracepoint)
        self._links[key] = raw_tracepoint_open(tracepoint, self._prog_fd(fn, BPF_PROG_TYPE_RAW_TRACEPOINT))

    def detach_raw(self, tracepoint: str) -> None:
        self._unlink("raw:" + tracepoint)

    def attach_tracepoint(self, tracepoint: str, fn: str) -> None:
        """Attach ``fn`` to tracefs event ``category:name``."""
        key = self._unattached("tp:" + tracepoint)
        self._links[key] = perf.attach_tracepoint(
            self._tracefs, tracepoint, self._prog_fd(fn, BPF_PROG_TYPE_TRACEPOINT)
        )

    def detach_tracepoint(self, tracepoint: str) -> None:
        self._unlink("tp:" + tracepoint)

    def attach_kprobe(self, function: str, fn: str) -> None:
        """Run ``fn`` at the entry of kernel function ``function``."""
        key = self._unattached("kprobe:" + function)
        self._links[key] = perf.attach_kprobe(function, self._prog_fd(fn, BPF_PROG_TYPE_KPROBE))

    def detach_kprobe(self, function: str) -> None:
        self._unlink("kprobe:" + function)

    def attached(self, key: str) -> bool:
        """``raw:NAME``, ``tp:CAT:NAME`` or ``kprobe:FUNCTION`` is attached."""
        return key in self._links

    def close(self) -> None:
        """Detach and unload everything; safe to call twice."""
        for fd in self._links.values():
            os.close(fd)
        self._links.clear()
        for ring in self._rings:
            ring.close()
        self._rings.clear()
        for v in self._views:
            v.release()
        self._views.clear()
        for m in self._maps:
            m.close()
        self._maps.clear()
        self._loaded.close()
