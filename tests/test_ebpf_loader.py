"""The loader child and what the agent does without bcc: the raw ring buffer
consumer, every way the child can fail, and (as root) that the agent process
never imports bcc, stays small, and drops the compile's page cache."""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from guest_agent.sources.ebpf import loader, program
from guest_agent.sources.ebpf.ringbuf import BUSY_BIT, DISCARD_BIT, HDR_SIZE, RingReader

ROOT = Path(__file__).resolve().parent.parent


# -- ring buffer consumer -----------------------------------------------------------


class FakeRing:
    """A ring laid out as the kernel maps it: the data area twice in a row."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ring = bytearray(size)
        self.cons = bytearray(8)
        self.prod = bytearray(8)
        self.data = bytearray(2 * size)
        self.pos = 0

    def put(self, payload: bytes, hdr_bits: int = 0) -> None:
        rec = struct.pack("<II", len(payload) | hdr_bits, 0) + payload
        rec += bytes(-len(rec) % 8)
        for i, b in enumerate(rec):
            self.ring[(self.pos + i) % self.size] = b
        self.pos += len(rec)
        self.data[:] = self.ring + self.ring  # what the double mapping shows
        struct.pack_into("<Q", self.prod, 0, self.pos)

    def reader(self) -> RingReader:
        return RingReader(memoryview(self.cons), memoryview(self.prod), memoryview(self.data), self.size)

    @property
    def consumer_pos(self) -> int:
        return int(struct.unpack("<Q", self.cons)[0])


def test_ring_skips_discarded_records_and_reads_across_the_end() -> None:
    r = FakeRing(64)
    got: list[bytes] = []
    r.put(b"A" * 16)  # 24 bytes at 0
    r.put(b"D" * 8, DISCARD_BIT)  # 16 bytes at 24
    r.put(b"B" * 12)  # 24 bytes at 40: its payload wraps past 64
    assert r.reader().consume(lambda d: got.append(bytes(d))) == 2
    assert got == [b"A" * 16, b"B" * 12]
    assert r.consumer_pos == 64
    r.put(b"C" * 5)  # header at 64 & 63 == 0 again
    got.clear()
    assert r.reader().consume(lambda d: got.append(bytes(d))) == 1
    assert got == [b"C" * 5] and r.consumer_pos == 64 + HDR_SIZE + 8


def test_ring_stops_at_a_busy_record() -> None:
    r = FakeRing(64)
    r.put(b"x" * 8)
    r.put(b"y" * 8, BUSY_BIT)
    r.put(b"z" * 8)
    got: list[bytes] = []
    assert r.reader().consume(lambda d: got.append(bytes(d))) == 1
    assert got == [b"x" * 8] and r.consumer_pos == 16, "the busy record and all after it wait"


def test_ring_size_must_be_a_doubled_power_of_two() -> None:
    with pytest.raises(ValueError):
        RingReader(memoryview(bytearray(8)), memoryview(bytearray(8)), memoryview(bytearray(96)), 48)


# -- the child failing ----------------------------------------------------------------


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_child_that_dies_says_why() -> None:
    argv = _child("import sys; print('compiler exploded', file=sys.stderr); sys.exit(3)")
    with pytest.raises(loader.LoaderError, match=r"child died: exit status 3: compiler exploded"):
        loader.run({}, timeout=30, argv=argv)


def test_child_that_hangs_times_out() -> None:
    with pytest.raises(loader.LoaderError, match=r"sent nothing within 1 s"):
        loader.run({}, timeout=1, argv=_child("import time; time.sleep(60)"))


@pytest.mark.parametrize(
    "manifest, fds, why",
    [
        (b"not json", 0, "bad manifest"),
        (b'{"programs": {"scan": 3}, "maps": {}}', 1, "fd index 3 out of range"),
        (b'{"programs": {"scan": 0}, "maps": {"ctl": 0}}', 1, "an fd named twice"),
        (b'{"maps": {}}', 0, "bad manifest: KeyError"),
        (b"[" * (loader.MANIFEST_MAX + 10), 0, "manifest exceeds"),
    ],
)
def test_child_sending_garbage_is_refused(manifest: bytes, fds: int, why: str) -> None:
    code = f"""
    import os, socket, sys
    s = socket.socket(fileno=int(sys.argv[1]))
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range({fds})]
    socket.send_fds(s, [{manifest!r}], fds)
    """
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(loader.LoaderError, match=why):
        loader.run({}, timeout=30, argv=_child(code))
    assert len(os.listdir("/proc/self/fd")) == before, "received fds are closed"


def test_a_failing_child_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """What EbpfSource turns into SourceUnavailable (and the agent into a fallback)."""
    from guest_agent.sources.ebpf.btf import Btf
    from guest_agent.sources.ebpf.layout import page_layout

    try:
        lay = page_layout(Btf.load(), os.uname().release)
    except OSError as e:
        pytest.skip(f"no BTF: {e}")
    monkeypatch.setattr(loader, "default_argv", lambda: _child("import sys; sys.exit(9)"))
    with pytest.raises(program.LoadError, match="child died: exit status 9"):
        program.LoadedProgram(program.ProgramConfig(lay, 1 << 20), None)


def test_the_real_child_module_runs_cleanly() -> None:
    """The child is its own module: nothing the agent imports pulls it in, so
    ``-m`` runs it without runpy's "found in sys.modules" warning (an error here)."""
    argv = [sys.executable, "-W", "error::RuntimeWarning", "-m", loader.MODULE]
    got = loader.run({}, timeout=60, argv=argv)  # an empty request: the child answers with why it cannot load
    assert got.error and not got.programs and not got.maps, got
    probe = "import sys, guest_agent.sources.ebpf; print(sorted(m for m in sys.modules if 'loader_child' in m or m == 'bcc'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports, at any depth of its code (lazy imports count)."""
    is_pkg = path.name == "__init__.py"
    here = ".".join(path.relative_to(ROOT).with_suffix("").parts[: -1 if is_pkg else None])
    parent = here if is_pkg else here.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = parent.split(".")[: len(parent.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            out |= {f"{target}.{a.name}" for a in node.names} | ({target} if node.module else set())
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith(package)}


def test_no_module_of_the_agent_imports_in_a_cycle() -> None:
    files = {
        ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
        for f in (ROOT / "guest_agent").rglob("*.py")
    }
    # A package is initialised before its modules run, so an edge to an ancestor closes no cycle.
    graph = {
        m: {d for d in _imports(f, "guest_agent") if d in files and d != m and not m.startswith(d + ".")}
        for m, f in files.items()
    }

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return False

    cycles = sorted((a, b) for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles, cycles


# -- the agent process (root, BPF) -------------------------------------------------------

AGENT = """
import json, sys
from guest_agent.sources.ebpf import EbpfSource
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
s = EbpfSource()
s.open()
prog = s.scanner.prog
print(json.dumps({
    "bcc": sorted(m for m in sys.modules if m == "bcc" or m.startswith("bcc.")),
    "rss": status("VmRSS"), "anon": status("RssAnon"), "file": status("RssFile"),
    "open_s": float(s.facts["open_s"]), "load_s": prog.load_s,
    "child_files": sorted(prog._files), "dropped": prog.dropped.files,
    "maps": open("/proc/self/maps").read(),
}))
s.close()
"""


@pytest.fixture(scope="module")
def agent() -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    proc = subprocess.run([sys.executable, "-c", AGENT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.root
@pytest.mark.bpf
def test_agent_never_loads_bcc_or_llvm(agent: dict[str, Any]) -> None:
    assert agent["bcc"] == []
    maps = str(agent["maps"])
    assert "libLLVM" not in maps and "libbcc" not in maps and "clang" not in maps
    assert any("libbcc" in f for f in agent["child_files"]), "the child did compile"


@pytest.mark.root
@pytest.mark.bpf
def test_agent_rss_after_open_is_small(agent: dict[str, Any]) -> None:
    mib = {k: int(agent[k]) / 2**20 for k in ("rss", "anon", "file")}
    print(
        f"\nagent after open(): RSS {mib['rss']:.1f} MiB (anon {mib['anon']:.1f}, file {mib['file']:.1f}); "
        f"open {agent['open_s']} s, loader child {float(agent['load_s']):.2f} s"
    )
    assert mib["rss"] < 80, "was 131 MiB with bcc in the process"


def _resident_bytes(path: str) -> int:
    out = subprocess.run(["fincore", "-nbo", "RES", path], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def _mapped_anywhere(path: str) -> bool:
    real = os.path.realpath(path)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                if real in f.read():
                    return True
        except OSError:
            continue
    return False


@pytest.mark.root
@pytest.mark.bpf
def test_the_compiles_page_cache_is_dropped(agent: dict[str, Any]) -> None:
    """libLLVM's pages leave the page cache once the child is gone (unless
    some other process maps it: then the kernel keeps them, rightly)."""
    if subprocess.run(["which", "fincore"], capture_output=True).returncode:
        pytest.skip("fincore missing")
    files = [f for f in agent["child_files"] if "libLLVM" in f]
    assert files and int(agent["dropped"]) > len(files)
    for f in files:
        if not _mapped_anywhere(f):
            assert _resident_bytes(f) < 2**20, f"{f} still has {_resident_bytes(f)} bytes cached"
