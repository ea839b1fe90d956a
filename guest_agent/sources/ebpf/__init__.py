"""The ``ebpf`` free-page source: free buddy blocks read from ``struct page``.

A BPF program, run synchronously from user space in bounded chunks
(``BPF_PROG_TEST_RUN``), walks the memmap of online RAM and records every free
buddy block with its order. Layouts come from the running kernel's BTF, never
from headers; allocation tracepoints mark an in-kernel bitmap while a scan
runs so blocks that raced with it are dropped; ``mm_page_free`` feeds live
hints during an open epoch. Before first use the whole chain is proven
against /proc/kpageflags. docs/ebpf-source.md has the reasoning and numbers.

Usage (as root, Debian's python3 with python3-bpfcc)::

    from guest_agent.sources.ebpf import EbpfSource, bpf_program_text
    from guest_agent.sources.base import SourceUnavailable

    src = EbpfSource()
    probe = src.probe()
    if probe.available:
        try:
            src.open()                        # compile, load, self-test (~1-2 s)
        except SourceUnavailable as e:
            print("ebpf unavailable:", e)     # fall back to kpageflags
        else:
            for part in src.parts(deadline=time.monotonic() + 1):
                send(part.ranges)             # byte (start, length) ranges
            frees = src.live_frees()
            frees.start()                     # after the request arrived
            extra = frees.drain(max_ranges=1024)
            frees.stop()
            src.close()
    print(bpf_program_text())                 # what --show-bpf prints
"""

from __future__ import annotations

from ..base import SourceUnavailable
from . import program, system
from .btf import Btf, BtfError
from .layout import PageLayoutError, page_layout
from .live import EbpfLiveFrees
from .scanner import ScanPart
from .source import EbpfSource, Options, program_config

__all__ = [
    "EbpfLiveFrees",
    "EbpfSource",
    "Options",
    "ScanPart",
    "bpf_program_text",
]


def bpf_program_text(source: EbpfSource | None = None) -> str:
    """The BPF C program with the -D flags it is (or would be) compiled with.

    With an open source, exactly what it loaded; otherwise the flags computed
    for this kernel now.

    :raise SourceUnavailable: when the flags cannot be computed (no BTF, ...).
    """
    if source is not None and source.loaded_config is not None:
        return program.render(source.loaded_config)
    paths = source.paths if source is not None else system.KernelPaths()
    options = source.options if source is not None else Options()
    try:
        layout = page_layout(Btf.load(paths.btf), system.kernel_release())
    except (OSError, BtfError, PageLayoutError) as e:
        raise SourceUnavailable(f"cannot compute the BPF program's flags: {e}") from e
    return program.render(program_config(layout, paths, options))
