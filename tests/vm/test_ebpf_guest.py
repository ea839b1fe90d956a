"""The eBPF source inside a real Debian 12 guest (kernel 6.1): the paths this
machine's 6.18 kernel cannot exercise. BTF without ``enum pagetype`` (the
6.1 inverted PG_buddy), ``vmemmap_base`` read at its kallsyms address (KASLR
on), Debian's own split header tree, the 6.1 verifier, and the self-test
against the guest's /proc/kpageflags; then the agent under its systemd unit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from fphint_lab.vm.harness import VM, VMFactory

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1200)]

AGENT_PYTHON = "/opt/fphint/bin/python"

PROBE = r"""
import json, os, sys, time
from guest_agent.sources.ebpf import EbpfSource, bpf_program_text, selftest
from guest_agent.sources.kpageflags import KpageflagsSource
src = EbpfSource()
probe = src.probe()
out = {"release": os.uname().release, "available": probe.available, "reason": probe.reason}
if probe.available:
    t = time.monotonic(); src.open(); out["open_s"] = time.monotonic() - t
    out["facts"] = src.facts
    out["bcc_imported"] = "bcc" in sys.modules
    with open("/proc/self/status") as f:
        out["rss_kib"] = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    cmp = selftest.run(src.scanner, "/proc/kpageflags")
    out["compare"] = {"scanned": cmp.scanned, "kpageflags": cmp.kpageflags, "unexplained": cmp.unexplained,
                      "missing": cmp.missing, "failure": cmp.failure()}
    t = time.monotonic(); snap = src.snapshot(); out["scan_ms"] = (time.monotonic() - t) * 1000
    out["pages"] = snap.pages
    out["kpf_pages"] = KpageflagsSource().snapshot().pages
    text = bpf_program_text(src)
    out["flags"] = [l.strip("/ ") for l in text.splitlines() if l.startswith("//   -D")]
    src.close()
print(json.dumps(out))
"""

#: What fph-agent.service needs for the eBPF source: ProtectKernelModules=yes
#: makes /usr/lib/modules inaccessible, and with it the kernel headers bcc
#: compiles against. (ProtectKernelLogs=yes also drops CAP_SYSLOG, which hides
#: kallsyms addresses; the source then finds vmemmap_base by tracepoint
#: pairing, which works in the unit.)


@pytest.fixture(scope="module")
def guest(vm_module_factory: VMFactory) -> Iterator[VM]:
    yield vm_module_factory.boot(mem_mib=1024)


def agent_choice(vm: VM, since: str = "", timeout: float = 300) -> str:
    """The agent service's "using free-page source X" line (it chooses before
    it looks for a collector), or its last lines if it never says."""
    cmd = "journalctl -u fph-agent -o cat" + (f" --since '{since}'" if since else "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = vm.run(cmd, check=False).output
        for line in out.splitlines():
            if "using free-page source" in line or "no free-page source works" in line:
                return json.loads(line)["msg"] if line.startswith("{") else line
        time.sleep(5)
    return vm.run(cmd + " | tail -5", check=False).output


def test_ebpf_source_works_on_debian_6_1(guest: VM) -> None:
    guest.run(f"cat > /tmp/ebpf_probe.py <<'EOF'\n{PROBE}\nEOF")
    out = guest.json(f"{AGENT_PYTHON} /tmp/ebpf_probe.py", timeout=900)
    print(json.dumps(out, indent=1))
    assert out["release"].startswith("6.1."), out["release"]
    assert out["available"], out["reason"]
    facts = out["facts"]
    assert "6.1-6.10 inverted PG_buddy" in facts["encoding"]
    assert facts["vmemmap_base"].split()[1].startswith("(kallsyms"), facts["vmemmap_base"]
    assert facts["headers"] == "native kernel headers"
    assert "-DFPH_BUDDY_MASK=0xf0000080ULL" in out["flags"]
    assert not out["compare"]["failure"], out["compare"]
    assert out["compare"]["unexplained"] == 0, out["compare"]
    assert out["pages"] > 0.5 * out["kpf_pages"] > 0
    assert not out["bcc_imported"], "the loader child compiles; this process must not import bcc"
    assert out["rss_kib"] < 80 * 1024, out["rss_kib"]
    assert not guest.kernel_trouble()


def test_installed_unit_picks_ebpf(guest: VM) -> None:
    """The unit as installed lets bcc see the kernel headers (no ProtectKernelModules)."""
    assert agent_choice(guest) == "using free-page source ebpf"
    status = "/proc/$(systemctl show -p MainPID --value fph-agent)/status"
    rss_kib = int(guest.output(f"awk '/VmHWM/ {{print $2}}' {status}"))
    now_kib = int(guest.output(f"awk '/VmRSS/ {{print $2}}' {status}"))
    mem = {
        k.rstrip(":"): int(v) // 1024
        for k, v in (
            line.split()[:2]
            for line in guest.output("grep -E '^(MemFree|Cached|AnonPages):' /proc/meminfo").splitlines()
        )
    }
    print(f"agent RSS in the guest: {now_kib / 1024:.0f} MiB (peak {rss_kib / 1024:.0f} MiB); guest meminfo MiB: {mem}")
    assert now_kib < 80 * 1024, "bcc and LLVM stay in the loader child"
    assert rss_kib < 256 * 1024, "the unit caps memory at 256M"
    assert not guest.kernel_trouble()
