"""Cheap checks that decide whether the eBPF source can run here.

Each failure is one line saying what is wrong and, where there is one, what
to do. Nothing is loaded into the kernel; tracefs is mounted if absent (the
agent needs it anyway) and securityfs only for the lockdown read.

Page poisoning and memory encryption make hinting unsafe whatever the source;
the agent refuses on them before trying any source (guest_agent.facts). The
probe asks the same module again so the source is safe used on its own.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from ... import facts
from . import bpfsys, headers, program, system
from .btf import Btf, BtfError
from .layout import PageLayout, PageLayoutError, page_layout
from .system import KernelPaths


def safety_refusal(paths: KernelPaths) -> str:
    """Why no source may hint on this guest, or "" (guest_agent.facts decides)."""
    safety = facts.detect_safety(
        facts.Paths(
            cmdline=Path(paths.cmdline),
            config_gz=Path(paths.config_gz),
            cpuinfo=Path(paths.cpuinfo),
            meminfo=Path(paths.meminfo),
            dev=Path(paths.dev),
        )
    )
    return "; ".join(safety.refusals)


@dataclass
class Findings:
    """What the checks learnt, reused by open()."""

    reason: str = ""
    layout: PageLayout | None = None
    btf: Btf | None = None
    kernel_source: str | None = None
    vmemmap_symbol: bool = False
    #: Optional tracepoints this kernel does not have (not attached).
    absent_tracepoints: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run(paths: KernelPaths, release: str | None = None) -> Findings:
    found = Findings()
    release = release or system.kernel_release()

    found.reason = safety_refusal(paths)
    if found.reason:
        return found

    if not os.path.exists(paths.btf):
        found.reason = f"no BTF at {paths.btf} (kernel built without CONFIG_DEBUG_INFO_BTF)"
        return found
    try:
        found.btf = Btf.load(paths.btf)
        found.layout = page_layout(found.btf, release)
        problems, missing = program.tracepoint_problems(found.btf)
    except (OSError, BtfError, PageLayoutError) as e:
        found.reason = f"cannot use BTF at {paths.btf}: {e}"
        return found
    if problems:
        found.reason = "kernel tracepoints differ from what the BPF code reads: " + "; ".join(problems)
        return found
    if missing:
        found.absent_tracepoints = [m.split(":")[0] for m in missing]
        found.notes.append("optional tracepoints absent: " + ", ".join(missing))

    if not system.bpf_capable(paths.status):
        found.reason = "BPF not permitted: needs CAP_SYS_ADMIN, or CAP_BPF and CAP_PERFMON (run as root)"
        return found
    refused = bpfsys.bpf_refusal()
    if refused:
        found.reason = f"BPF not permitted: {refused}"
        return found

    mode = system.lockdown_mode(paths.securityfs)
    if mode == "confidentiality":
        found.reason = "kernel lockdown is 'confidentiality': BPF may not read kernel memory"
        return found

    # Only where it is: importing bcc would bring LLVM into this process,
    # which is what the loader child is for.
    if importlib.util.find_spec("bcc") is None:
        found.reason = (
            "bcc is not importable: install python3-bpfcc and run under Debian's python3 "
            "(a venv needs --system-site-packages)"
        )
        return found
    try:
        found.kernel_source = headers.kernel_source(release)
    except headers.HeadersMissing as e:
        found.reason = str(e)
        return found

    try:
        found.vmemmap_symbol = system.kallsyms_address("vmemmap_base", paths.kallsyms) is not None
    except OSError:
        found.vmemmap_symbol = False
    try:
        note = system.ensure_tracefs(paths.tracefs)
        if note:
            found.notes.append(note)
    except OSError as e:
        if not found.vmemmap_symbol:
            found.reason = (
                f"tracefs is not mounted at {paths.tracefs} and mounting it failed "
                f"({e.strerror}); it is needed to find vmemmap_base"
            )
            return found
        found.notes.append(f"tracefs unavailable ({e.strerror}); vmemmap_base from kallsyms")

    try:
        with open(paths.kpageflags, "rb") as f:
            f.read(8)
    except OSError as e:
        found.reason = f"cannot read {paths.kpageflags} for the self-test: {e.strerror}"
        return found
    try:
        ram = system.ram_pfn_ranges(paths.iomem)
    except OSError as e:
        found.reason = f"cannot read {paths.iomem}: {e.strerror}"
        return found
    if not ram:
        found.reason = f"{paths.iomem} shows no System RAM addresses (needs root)"
        return found
    return found
