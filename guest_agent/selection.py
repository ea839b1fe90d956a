"""Choosing a free-page source: ebpf, then kpageflags, then no hints.

The first source that both probes available and opens (the eBPF one compiles,
loads and self-tests there) wins. Every source tried, and why any was passed
over, goes into the attach facts; the reason is logged once here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from fphint.v1 import hints_pb2

from .facts import GuestSafety
from .sources.base import FreePageSource, Probe, SourceUnavailable
from .sources.kpageflags import KpageflagsSource

log = logging.getLogger(__name__)

PREFERENCES = ("auto", "ebpf", "kpageflags", "none")


def _ebpf() -> FreePageSource:
    from .sources.ebpf import EbpfSource  # bcc is only importable from Debian's python3

    return EbpfSource()


FACTORIES: dict[str, Callable[[], FreePageSource]] = {"ebpf": _ebpf, "kpageflags": KpageflagsSource}


@dataclass
class Selection:
    source: FreePageSource | None
    statuses: list[hints_pb2.SourceStatus]
    refusal: str

    @property
    def name(self) -> str:
        return self.source.name if self.source else ""


def _try(name: str, factory: Callable[[], FreePageSource]) -> tuple[FreePageSource | None, Probe]:
    try:
        src = factory()
    except ImportError as e:
        return None, Probe(name, False, f"cannot import: {e}")
    except SourceUnavailable as e:
        return None, Probe(name, False, str(e))
    probe = src.probe()
    if not probe.available:
        return None, probe
    try:
        src.open()
    except SourceUnavailable as e:
        src.close()
        return None, Probe(name, False, str(e))
    return src, probe


def select_source(
    preference: str,
    safety: GuestSafety,
    factories: dict[str, Callable[[], FreePageSource]] | None = None,
) -> Selection:
    if preference not in PREFERENCES:
        raise ValueError(f"unknown source {preference!r}; choose from {', '.join(PREFERENCES)}")
    facs = factories if factories is not None else FACTORIES
    if safety.refusals:
        refusal = "; ".join(safety.refusals)
        log.warning("refusing to hint: %s", refusal)
        return Selection(None, [], refusal)
    if preference == "none":
        return Selection(None, [], "hinting disabled by configuration (--source none)")
    names = list(facs) if preference == "auto" else [preference]
    statuses: list[hints_pb2.SourceStatus] = []
    chosen: FreePageSource | None = None
    for name in names:
        if chosen is not None:
            break
        src, probe = _try(name, facs[name])
        statuses.append(hints_pb2.SourceStatus(name=name, available=src is not None, reason=probe.reason))
        if src is None:
            log.warning("free-page source %s unavailable: %s", name, probe.reason)
        else:
            chosen = src
    if chosen is None:
        refusal = "no free-page source works here: " + "; ".join(f"{s.name}: {s.reason}" for s in statuses)
        log.warning("%s", refusal)
        return Selection(None, statuses, refusal)
    log.info("using free-page source %s", chosen.name)
    return Selection(chosen, statuses, "")
