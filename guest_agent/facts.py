"""What the agent tells the collector about its guest, and when it refuses to hint.

Two guest settings make skipped pages unsafe (docs/safety-rule.md §5.3-5.4;
shared/reference/ebpf.md §5-6):

* page poisoning (``page_poison=1``): free pages hold 0xaa and the kernel
  checks the pattern on allocation, but a skipped page arrives as zeros;
* memory encryption (SEV, SEV-ES, SEV-SNP, TDX): the host cannot reason
  about private pages at all.

init_on_free is reported but harmless: free pages are zero already, which is
exactly what the destination gets for a skipped page.
"""

from __future__ import annotations

import gzip
import os
import platform
import resource
import socket
from dataclasses import dataclass, field
from pathlib import Path

import fphint
from fphint.v1 import hints_pb2

from . import memory

_TRUE = {"1", "on", "y", "yes", "true"}


@dataclass(frozen=True)
class Paths:
    """Where facts are read from; tests point these at fixtures."""

    cmdline: Path = Path("/proc/cmdline")
    config_gz: Path = Path("/proc/config.gz")
    cpuinfo: Path = Path("/proc/cpuinfo")
    meminfo: Path = Path("/proc/meminfo")
    dev: Path = Path("/dev")


@dataclass
class GuestSafety:
    page_poisoning: bool = False
    init_on_free: bool = False
    memory_encryption: str = ""
    #: Reasons to refuse hinting; empty means hinting is allowed.
    refusals: list[str] = field(default_factory=list)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def parse_cmdline(text: str) -> dict[str, str]:
    """Kernel parameters up to ``--`` (what follows belongs to init)."""
    out: dict[str, str] = {}
    for word in text.split():
        if word == "--":
            break
        key, _, value = word.partition("=")
        out[key] = value
    return out


def kernel_config(path: Path) -> dict[str, str]:
    try:
        text = gzip.decompress(path.read_bytes()).decode(errors="replace")
    except (OSError, EOFError, gzip.BadGzipFile):
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def detect_safety(paths: Paths = Paths()) -> GuestSafety:
    cmd = parse_cmdline(_read(paths.cmdline))
    cfg = kernel_config(paths.config_gz)
    s = GuestSafety()
    s.page_poisoning = cmd.get("page_poison", "").lower() in _TRUE
    if "init_on_free" in cmd:
        s.init_on_free = cmd["init_on_free"].lower() in _TRUE
    else:
        s.init_on_free = cfg.get("CONFIG_INIT_ON_FREE_DEFAULT_ON") == "y"
    flags = cpu_flags(_read(paths.cpuinfo))
    found = []
    # A host CPU may advertise SEV without using it; inside a guest (the
    # "hypervisor" flag) these flags mean the guest itself is encrypted.
    if "hypervisor" in flags:
        found += [f.replace("_", "-") for f in ("sev_snp", "sev_es", "sev") if f in flags]
    if "tdx_guest" in flags:
        found.append("tdx")
    if (paths.dev / "sev-guest").exists() and not any(f.startswith("sev") for f in found):
        found.append("sev-snp")
    if (paths.dev / "tdx_guest").exists() and "tdx" not in found:
        found.append("tdx")
    s.memory_encryption = ",".join(found)
    if s.page_poisoning:
        s.refusals.append(
            "page poisoning is on (page_poison=1): free pages hold 0xaa, a skipped page would arrive as zeros"
        )
    if s.memory_encryption:
        s.refusals.append(
            f"memory encryption is active ({s.memory_encryption}): the host cannot reason about private pages"
        )
    return s


def total_ram_bytes(paths: Paths = Paths()) -> int:
    for line in _read(paths.meminfo).splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def build_facts(
    safety: GuestSafety,
    sources: list[hints_pb2.SourceStatus],
    chosen: str,
    refusal: str,
    paths: Paths = Paths(),
    details: dict[str, str] | None = None,
) -> hints_pb2.AgentFacts:
    return hints_pb2.AgentFacts(
        source_details=details or {},
        agent_version=fphint.__version__,
        kernel_release=platform.release(),
        page_size=resource.getpagesize(),
        sources=sources,
        chosen_source=chosen,
        refusal=refusal,
        page_poisoning=safety.page_poisoning,
        memory_encryption=safety.memory_encryption,
        init_on_free=safety.init_on_free,
        total_ram_bytes=total_ram_bytes(paths),
        hostname=socket.gethostname(),
    )


def self_usage() -> tuple[float, int, int]:
    """This process's CPU seconds (user + system, all threads), current RSS
    and PSS bytes (PSS 0 where /proc/self/smaps_rollup is missing)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        rss = ru.ru_maxrss * 1024
    return ru.ru_utime + ru.ru_stime, rss, memory.usage().get("Pss", 0)


def is_root() -> bool:
    return os.geteuid() == 0
