"""Every way the eBPF source says no, and the kernel facts it reads.

The fallbacks the agent relies on (BPF not permitted, no BTF, tracefs absent,
no kernel headers, lockdown, poisoning, encryption) each give one clear line.
Live-kernel cases run in a subprocess with capabilities dropped or in a
private mount namespace, so nothing here changes the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from guest_agent.sources.ebpf import checks, headers, system
from guest_agent.sources.ebpf.source import EbpfSource
from guest_agent.sources.ebpf.system import KernelPaths

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

IOMEM = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000a0000-000fffff : Reserved
00100000-bfffffff : System RAM
  01000000-01ffffff : Kernel code
c0000000-febfffff : PCI Bus 0000:00
100000000-23fffffff : System RAM
240000000-27fffffff : Persistent Memory
  240000000-27fffffff : dax0.0
    240000000-25fffffff : System RAM (kmem)
"""


def _write(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


# -- kernel facts ------------------------------------------------------------------------


def test_ram_ranges_from_iomem(tmp_path: Path) -> None:
    ranges = system.ram_pfn_ranges(_write(tmp_path, "iomem", IOMEM))
    assert ranges == [(1, 0x9F), (0x100, 0xC0000), (0x100000, 0x240000), (0x240000, 0x260000)] or ranges == [
        (1, 0x9F),
        (0x100, 0xC0000),
        (0x100000, 0x260000),
    ]
    hidden = IOMEM.replace("00100000-bfffffff", "00000000-00000000").replace("00001000-0009fbff", "00000000-00000000")
    hidden = "\n".join(line for line in hidden.splitlines() if "100000000" not in line and "240000000" not in line)
    assert system.ram_pfn_ranges(_write(tmp_path, "hidden", hidden)) == []


def test_online_blocks_limit_the_scan(tmp_path: Path) -> None:
    mem = tmp_path / "memory"
    _write(mem, "block_size_bytes", "8000000\n")  # 128 MiB = 32768 pages
    for i, state in enumerate(["online", "online", "offline", "online"]):
        _write(mem, f"memory{i}/state", state + "\n")
    _write(mem, "auto_online_blocks", "online\n")
    online = system.online_pfn_ranges(str(mem))
    assert online == [(0, 65536), (98304, 131072)]
    assert system.online_pfn_ranges(str(tmp_path / "absent")) is None
    paths = KernelPaths(iomem=_write(tmp_path, "iomem", "00001000-1fffffff : System RAM\n"), memory_blocks=str(mem))
    assert system.scan_pfn_ranges(paths) == [(1, 65536), (98304, 131072)]


def test_intersect_and_merge() -> None:
    assert system.merge([(5, 9), (0, 3), (3, 4), (8, 12)]) == [(0, 4), (5, 12)]
    assert system.intersect([(0, 10), (20, 30)], [(5, 25)]) == [(5, 10), (20, 25)]
    assert system.intersect([(0, 10)], []) == []


def test_kallsyms_lookup(tmp_path: Path) -> None:
    text = "ffffffff81000000 T _text\nffffffff82e1a0c8 D vmemmap_base\n0000000000000000 D page_offset_base\n"
    path = _write(tmp_path, "kallsyms", text)
    assert system.kallsyms_address("vmemmap_base", path) == 0xFFFFFFFF82E1A0C8
    assert system.kallsyms_address("page_offset_base", path) is None  # hidden (kptr_restrict)
    assert system.kallsyms_address("vmemmap", path) is None


def test_lockdown_mode_is_parsed(tmp_path: Path) -> None:
    _write(tmp_path, "sec/lockdown", "none integrity [confidentiality]\n")
    assert system.lockdown_mode(str(tmp_path / "sec")) == "confidentiality"
    assert system.lockdown_mode(str(tmp_path / "nowhere")) is None


def test_capabilities_decide_bpf_permission(tmp_path: Path) -> None:
    def caps(mask: int) -> str:
        return _write(tmp_path, f"status{mask:x}", f"Name:\tx\nCapEff:\t{mask:016x}\n")

    assert system.bpf_capable(caps(1 << 21))
    assert system.bpf_capable(caps((1 << 39) | (1 << 38)))
    assert not system.bpf_capable(caps(1 << 39))
    assert not system.bpf_capable(caps(0))


def test_kernel_headers_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(headers, "KHEADERS", str(tmp_path / "no-kheaders"))
    modules, cache = tmp_path / "modules", tmp_path / "cache"
    env: dict[str, str] = {}
    with pytest.raises(headers.HeadersMissing, match=r"run scripts/bcc-headers\.sh"):
        headers.kernel_source("9.9.9", str(modules), str(cache), env)
    _write(cache, "include/linux/kconfig.h", "")
    assert headers.kernel_source("9.9.9", str(modules), str(cache), env) == str(cache)
    _write(modules, "9.9.9/source/include/linux/kconfig.h", "")  # Debian's split tree
    assert headers.kernel_source("9.9.9", str(modules), str(cache), env) is None
    with pytest.raises(headers.HeadersMissing, match="BCC_KERNEL_SOURCE=/nonexistent"):
        headers.kernel_source("9.9.9", str(modules), str(cache), {"BCC_KERNEL_SOURCE": "/nonexistent"})


# -- refusals through probe() ------------------------------------------------------------------


def _probe(paths: KernelPaths) -> str:
    probe = EbpfSource(paths).probe()
    assert probe.name == "ebpf"
    assert probe.available == (probe.reason == "")
    return probe.reason


@root_only
def test_real_probe_passes_here() -> None:
    assert _probe(KernelPaths()) == ""


def test_no_btf(tmp_path: Path) -> None:
    reason = _probe(KernelPaths(btf=str(tmp_path / "vmlinux")))
    assert reason == f"no BTF at {tmp_path / 'vmlinux'} (kernel built without CONFIG_DEBUG_INFO_BTF)"


def test_unreadable_btf(tmp_path: Path) -> None:
    reason = _probe(KernelPaths(btf=_write(tmp_path, "vmlinux", "this is not a BTF blob at all")))
    assert reason.startswith("cannot use BTF at") and "bad BTF magic" in reason


def test_poisoning_refused(tmp_path: Path) -> None:
    reason = _probe(KernelPaths(cmdline=_write(tmp_path, "cmdline", "root=/dev/vda page_poison=1 quiet\n")))
    assert reason.startswith("page poisoning is on (page_poison=1)")


def test_encryption_refused(tmp_path: Path) -> None:
    cpuinfo = _write(tmp_path, "cpuinfo", "processor\t: 0\nflags\t\t: fpu hypervisor sev sev_es\n")
    assert _probe(KernelPaths(cpuinfo=cpuinfo)).startswith("memory encryption is active (sev-es,sev)")


def test_lockdown_confidentiality_refused(tmp_path: Path) -> None:
    _write(tmp_path, "sec/lockdown", "none integrity [confidentiality]\n")
    if not system.bpf_capable():
        pytest.skip("the capability check comes first")
    reason = _probe(KernelPaths(securityfs=str(tmp_path / "sec")))
    assert reason == "kernel lockdown is 'confidentiality': BPF may not read kernel memory"


@root_only
def test_no_kernel_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    monkeypatch.setattr(headers, "CACHE_TREE", str(tmp_path / "cache"))
    monkeypatch.setattr(headers, "KHEADERS", str(tmp_path / "kheaders.tar.xz"))
    found = checks.run(KernelPaths(), release="6.18.0-nohdr")
    assert found.reason.startswith("no kernel headers for bcc (/lib/modules/6.18.0-nohdr/build is missing)")
    assert found.reason.endswith("run scripts/bcc-headers.sh (needs linux-headers-amd64)")


@root_only
def test_tracefs_unmountable_without_kallsyms_symbol(tmp_path: Path) -> None:
    not_a_dir = _write(tmp_path, "tracing", "")
    kallsyms = _write(tmp_path, "kallsyms", "ffffffff81000000 T _text\n")
    reason = _probe(KernelPaths(tracefs=not_a_dir, kallsyms=kallsyms))
    assert reason == (
        f"tracefs is not mounted at {not_a_dir} and mounting it failed (Not a directory); "
        "it is needed to find vmemmap_base"
    )
    # With vmemmap_base listed in kallsyms tracefs is not needed.
    kallsyms = _write(tmp_path, "kallsyms2", "ffffffff82e1a0c8 D vmemmap_base\n")
    found = checks.run(KernelPaths(tracefs=not_a_dir, kallsyms=kallsyms))
    assert found.reason == "" and any("tracefs unavailable" in n for n in found.notes)


PROBE_SNIPPET = """
import json, sys
from guest_agent.sources.ebpf.source import EbpfSource
from guest_agent.sources.base import SourceUnavailable
src = EbpfSource()
p = src.probe()
out = {{"available": p.available, "reason": p.reason, "notes": src._findings.notes}}
if {open_it}:
    from guest_agent.sources.ebpf import system
    # Pretend the checks missed it (seccomp, an LSM): loading must say why.
    system.bpf_capable = lambda *a: True
    system.ram_pfn_ranges = lambda *a: [(1, 1 << 20)]
    try:
        src.open()
        out["open"] = "opened"
    except SourceUnavailable as e:
        out["open"] = str(e)
    src.close()
print(json.dumps(out))
"""


def _run_python(prefix: list[str], open_it: bool = False) -> dict[str, object]:
    code = PROBE_SNIPPET.format(open_it=open_it)
    proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@root_only
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing")
def test_bpf_not_permitted() -> None:
    drop = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    out = _run_python(drop, open_it=True)
    assert out["available"] is False
    assert out["reason"] == "BPF not permitted: needs CAP_SYS_ADMIN, or CAP_BPF and CAP_PERFMON (run as root)"
    # When the capability check is fooled, loading fails and says why.
    assert str(out["open"]).startswith("BPF not permitted:"), out


@root_only
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) missing")
def test_tracefs_absent_is_mounted() -> None:
    # A private mount namespace: unmounting tracefs there leaves the machine alone.
    shell = 'umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; exec "$@"'
    out = _run_python(["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, "sh"])
    assert out["available"] is True, out
    assert "mounted tracefs at /sys/kernel/tracing" in out["notes"]  # type: ignore[operator]


def test_paths_are_all_injectable() -> None:
    # Every field is a path string; replace() keeps the others.
    p = replace(KernelPaths(), btf="/x")
    assert p.btf == "/x" and p.iomem == "/proc/iomem"


def test_vmemmap_pairing_winner_needs_a_clear_majority() -> None:
    """Mismatched pairs (a nested free) vote for scattered bases: a busy host's
    80 % winner with a thin tail is clear; an even split or too few votes is not."""
    from guest_agent.sources.ebpf.vmemmap import winner

    base = 0xFFFFEA0000000000
    tail = {base + (i + 1) * 0x1000_0000: 20 for i in range(120)}  # 2400 scattered wrong votes
    assert winner({base: 10243, **tail}) == (base, 10243)
    assert winner({base: 950, base + 0x4000_0000: 50}) == (base, 950)  # 95 %
    assert winner({base: 700, base + 0x4000_0000: 300}) is None  # two real contenders
    assert winner({base: 20}) is None  # too few pairs
    assert winner({}) is None
