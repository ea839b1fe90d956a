"""One real guest, booted once for this module with systemd: what the e2e
tests rely on works — the shell, QMP, the agent's unit and environment,
fw_cfg, guest-to-host networking, bcc with the guest kernel's headers, and
the RAM file being guest RAM."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from fphint_lab.guest import mempattern
from fphint_lab.vm.harness import VM, VMFactory
from fphint_lab.vm.qmp import QMPCommandError
from vmimage.builder import Image
from vmimage.final import IMAGE_INFO_IN_GUEST
from vmimage.qemu import FW_CFG_COLLECTOR, FW_CFG_TOKEN, RAM_BACKEND_ID, collector_address

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1500)]

#: Has a comma, which QEMU's option syntax must escape.
TOKEN = "test-token,with=comma"
FW_CFG_DIR = "/sys/firmware/qemu_fw_cfg/by_name"


class Listener:
    """A TCP server on host 127.0.0.1 standing in for the collector: records lines."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("r") as f:
                conn.settimeout(10)
                try:
                    for line in f:
                        with self._cond:
                            self.lines.append(line.rstrip("\n"))
                            self._cond.notify_all()
                except OSError:  # slirp may reset the connection when QEMU goes
                    pass

    def wait_line(self, timeout: float) -> str | None:
        with self._cond:
            self._cond.wait_for(lambda: bool(self.lines), timeout)
            return self.lines[-1] if self.lines else None


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.sock.close()


@pytest.fixture(scope="module")
def guest(vm_module_factory: VMFactory, listener: Listener) -> VM:
    return vm_module_factory.boot(token=TOKEN, collector=collector_address(listener.port))


def test_boots_this_image_with_systemd(guest: VM, vm_image: Image) -> None:
    assert guest.output("ps -p 1 -o comm=") == "systemd"
    state = guest.output("timeout 120 systemctl is-system-running --wait || true", timeout=150)
    assert state in ("running", "degraded"), f"boot did not finish: {state}"
    assert guest.output("systemctl is-active multi-user.target") == "active"
    assert guest.output("uname -r") == vm_image.kernel_version
    info = json.loads(guest.output(f"cat {IMAGE_INFO_IN_GUEST}"))
    assert info["image_key"] == vm_image.key


def test_agent_unit_is_installed_and_enabled(guest: VM) -> None:
    """Enabled and loaded; whether it runs without a collector, boot went on."""
    assert guest.output("systemctl is-enabled fph-agent.service") == "enabled"
    props = dict(
        line.split("=", 1)
        for line in guest.output(
            "systemctl show fph-agent.service -p LoadState -p FragmentPath -p ExecStart"
        ).splitlines()
    )
    assert props["LoadState"] == "loaded"
    assert props["FragmentPath"] == "/etc/systemd/system/fph-agent.service"
    assert "/opt/fphint/bin/fph-agent" in props["ExecStart"]
    assert guest.output("systemctl list-dependencies --plain multi-user.target | grep -c fph-agent") == "1"


def test_agent_environment(guest: VM) -> None:
    probe = (
        "import json, importlib.metadata as m, bcc, grpc, google.protobuf, fphint, guest_agent; "
        "print(json.dumps({n: m.version(n) for n in ('grpcio', 'protobuf', 'fphint')}))"
    )
    versions = guest.json(f"/opt/fphint/bin/python -c {json.dumps(probe)}", timeout=120)
    assert versions["grpcio"] == "1.85.1" and versions["protobuf"] == "7.35.1"
    guest.run("test -f /lib/modules/$(uname -r)/build/Makefile")


def test_fw_cfg_carries_token_and_collector(guest: VM, listener: Listener) -> None:
    assert guest.output("lsmod | grep -c '^qemu_fw_cfg'") == "1"
    assert guest.output(f"cat {FW_CFG_DIR}/{FW_CFG_TOKEN}/raw") == TOKEN
    assert guest.output(f"cat {FW_CFG_DIR}/{FW_CFG_COLLECTOR}/raw") == collector_address(listener.port)


def test_guest_reaches_the_collector_address(guest: VM, listener: Listener) -> None:
    boot_id = guest.boot_id()
    script = (
        "import socket; "
        f"a = open('{FW_CFG_DIR}/{FW_CFG_COLLECTOR}/raw').read().split(':'); "
        "s = socket.create_connection((a[1], int(a[2])), timeout=20); "
        f"s.sendall(b'hello {boot_id}\\n'); s.close()"
    )
    guest.run(f"python3 -c {json.dumps(script)}", timeout=60)
    assert listener.wait_line(20) == f"hello {boot_id}"


def test_shell_round_trip(guest: VM) -> None:
    r = guest.run("echo out; echo err >&2; exit_code() { return 7; }; exit_code", check=False)
    assert (r.output, r.rc) == ("out\nerr\n", 7)
    data = bytes(range(256)) * 16
    guest.shell.put_file("/root/blob", data)
    assert guest.output("sha256sum < /root/blob | cut -d' ' -f1") == hashlib.sha256(data).hexdigest()
    assert guest.shell.get_file("/root/blob") == data


def test_qmp(guest: VM) -> None:
    assert guest.status() == "running"
    memdevs = {m["id"]: m for m in guest.cmd("query-memdev")}
    mem = memdevs[RAM_BACKEND_ID]
    assert mem["share"] is True and mem["size"] == guest.guest.mem_mib << 20
    with pytest.raises(QMPCommandError) as info:
        guest.cmd("no-such-command")
    assert info.value.error_class == "CommandNotFound"
    seen = len(guest.qmp.events())
    guest.cmd("stop")
    guest.qmp.event_wait("STOP", 10, start=seen)
    assert guest.status() == "paused"
    guest.cmd("cont")
    guest.qmp.event_wait("RESUME", 10, start=seen)
    assert guest.output("echo alive") == "alive"


def test_ram_file_is_guest_ram(guest: VM) -> None:
    """A guest process's pages, located with pagemap.py in the guest, hold in
    the RAM file what the process wrote: GPA = offset in the file, which the
    RAM comparison and planted-fault tests rely on."""
    started = guest.workload("churn.py", "start", "--workers", "1", "--loop-mib", "1", "--keep-mib", "1")
    w = started["workers"][0]
    where = guest.workload(
        "pagemap.py", str(w["pid"]), "--addr", str(w["keep_addr"]), "--len", str(w["keep_len"]), "--list"
    )
    want = mempattern.expected(w["keep_seed"], w["keep_len"])
    pfns = where["pfns"]
    assert len(pfns) == w["keep_len"] // 4096 and None not in pfns
    with guest.ram_path.open("rb") as ram:
        for i, pfn in enumerate(pfns):
            ram.seek(pfn * 4096)
            assert ram.read(4096) == want[i * 4096 : (i + 1) * 4096], f"page {i} (pfn {pfn:#x})"
    assert guest.workload("churn.py", "check")["ok"]


def test_kernel_trouble_catches_a_planted_line(guest: VM) -> None:
    """The dmesg checker the e2e tests use: clean after boot, then a planted BUG line."""
    assert guest.kernel_trouble() == []
    guest.run("echo 'BUG: planted by test_vm_boot' > /dev/kmsg")
    assert guest.kernel_trouble() == ["BUG: planted by test_vm_boot"]


BPF_PROBE = r'''
import subprocess, sys
from bcc import BPF
b = BPF(text="""
BPF_ARRAY(execs, u64, 1);
TRACEPOINT_PROBE(sched, sched_process_exec) {
    int k = 0;
    u64 *v = execs.lookup(&k);
    if (v) __sync_fetch_and_add(v, 1);
    return 0;
}
""")
for _ in range(3):
    subprocess.run(["/bin/true"], check=True)
print(b["execs"][0].value)
'''


def test_bcc_compiles_against_the_guest_kernel(guest: VM) -> None:
    """The agent's eBPF path needs bcc + this kernel's headers; under TCG clang is slow."""
    guest.shell.put_file("/root/bpf_probe.py", BPF_PROBE.encode())
    count = int(guest.output("/opt/fphint/bin/python /root/bpf_probe.py", timeout=300).splitlines()[-1])
    assert count >= 3
