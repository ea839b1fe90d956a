"""Find ``vmemmap_base``: where ``struct page`` of PFN 0 would be.

x86_64 places the memmap at ``vmemmap_base``, randomised with KASLR
(arch/x86/mm/kaslr.c); ``pfn_to_page(pfn) = vmemmap_base + pfn``. Two ways:

* /proc/kallsyms lists ``vmemmap_base`` when CONFIG_KALLSYMS_ALL=y (Debian's
  kernels): read the word there with a BPF ``peek``.
* Otherwise pair the two forms of the ``mm_page_free`` tracepoint: the raw one
  sees the page pointer, the tracefs one the PFN, back to back on one CPU
  (shared/reference/ebpf.md §1.2). The value nearly every pair agrees on wins.

Either way the self-test against /proc/kpageflags proves it before use.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass

from ...errors import AgentError
from . import bpfsys, system
from .program import Ctl, LoadedProgram

#: Kernel addresses on x86_64 start here (5-level paging; 4-level is higher).
KERNEL_SPACE = 0xFF00000000000000
PAIR_TRACEPOINT = "mm_page_free"
MIN_VOTES = 32
AGREEMENT = 0.9


class VmemmapError(AgentError):
    """vmemmap_base could not be found, or what was found does not hold struct pages."""


@dataclass(frozen=True)
class Vmemmap:
    base: int
    #: How it was found, for the attach facts.
    method: str


def plausible(base: int) -> bool:
    return base >= KERNEL_SPACE and base % 4096 == 0


def from_kallsyms(prog: LoadedProgram, kallsyms: str) -> Vmemmap | None:
    addr = system.kallsyms_address("vmemmap_base", kallsyms)
    if addr is None:
        return None
    if not prog.peek.run(addr):
        raise VmemmapError(f"cannot read vmemmap_base at {addr:#x} from BPF")
    base = prog.ctl[Ctl.PEEK]
    if not plausible(base):
        raise VmemmapError(f"vmemmap_base at {addr:#x} holds {base:#x}, not a kernel address")
    return Vmemmap(base, f"kallsyms vmemmap_base@{addr:#x}")


def _make_frees() -> None:
    """Free a few pages of our own so mm_page_free fires on an idle guest."""
    for _ in range(4):
        m = mmap.mmap(-1, 64 * mmap.PAGESIZE)
        for off in range(0, len(m), mmap.PAGESIZE):
            m[off] = 1
        m.close()


def winner(counts: dict[int, int]) -> tuple[int, int] | None:
    """The base most pairs agree on, if they clearly do: 90 % of the votes, or
    two thirds and ten times the runner-up. A mismatched pair (a free nested
    between the two tracepoints of another, in an interrupt) votes for a
    random base, so wrong bases spread thin; a busy host has more of them.
    The self-test against /proc/kpageflags still checks the base chosen."""
    if not counts:
        return None
    ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)
    best, n = ranked[0]
    total = sum(counts.values())
    second = ranked[1][1] if len(ranked) > 1 else 0
    if n < MIN_VOTES:
        return None
    if n >= AGREEMENT * total or (3 * n >= 2 * total and n >= 10 * second):
        return best, n
    return None


def by_pairing(prog: LoadedProgram, timeout: float = 2.0, attempts: int = 3) -> Vmemmap:
    """Derive the base from mm_page_free pairs (a few tries: on a busy host
    one may see too many mismatched pairs).

    :raise VmemmapError: too few pairs, or no clear winner in any try.
    """
    why = ""
    for _ in range(attempts):
        counts = _pair_votes(prog, timeout)
        if not counts:
            raise VmemmapError("no mm_page_free pairs seen (tracepoints not firing?)")
        found = winner(counts)
        if found is not None:
            best, n = found
            if not plausible(best):
                raise VmemmapError(f"mm_page_free pairs point at {best:#x}, not a kernel address")
            return Vmemmap(best, f"tracepoint pairing ({n}/{sum(counts.values())} pairs agree)")
        best, n = max(counts.items(), key=lambda kv: kv[1])
        why = f"mm_page_free pairs disagree: best {best:#x} has {n} of {sum(counts.values())} votes"
    raise VmemmapError(why)


def _pair_votes(prog: LoadedProgram, timeout: float) -> dict[int, int]:
    votes = prog.map_fd("votes", bpfsys.BPF_MAP_TYPE_HASH)
    bpfsys.hash_delete(votes, list(bpfsys.hash_items(votes, 8, 8)))
    counts: dict[int, int] = {}
    prog.attach_raw(PAIR_TRACEPOINT, "pair_raw")
    try:
        prog.attach_tracepoint(f"kmem:{PAIR_TRACEPOINT}", "pair_tp")
        try:
            deadline = time.monotonic() + timeout
            while True:
                _make_frees()
                time.sleep(0.01)
                counts = {
                    int.from_bytes(k, "little"): int.from_bytes(v, "little")
                    for k, v in bpfsys.hash_items(votes, 8, 8).items()
                }
                total = sum(counts.values())
                if total >= 4 * MIN_VOTES or time.monotonic() > deadline:
                    break
        finally:
            prog.detach_tracepoint(f"kmem:{PAIR_TRACEPOINT}")
    finally:
        prog.detach_raw(PAIR_TRACEPOINT)
    bpfsys.hash_delete(votes, list(bpfsys.hash_items(votes, 8, 8)))
    return counts


def discover(prog: LoadedProgram, kallsyms: str) -> Vmemmap:
    found = from_kallsyms(prog, kallsyms)
    return found if found is not None else by_pairing(prog)
