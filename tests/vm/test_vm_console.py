"""The serial-shell helper against a real bash on a real pty, without a VM.

The pty starts with echo on and an interactive prompt, as a guest's serial
line does before .bash_profile runs: the computed markers must still frame
exactly the command's output. The socket stands in for QEMU's chardev.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fphint_lab.vm.console import CommandFailed, ConsoleClosed, ConsoleTimeout, Shell


class PtyBash:
    """bash on a pty whose master is bridged to a Unix socket server."""

    def __init__(self, path: Path) -> None:
        self.master, slave = os.openpty()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "dumb", "PS1": "guest$ ", "HOME": "/tmp"}
        self.proc = subprocess.Popen(
            ["bash", "--norc", "--noprofile", "--noediting", "-i"],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(1)
        self.conn: socket.socket | None = None
        threading.Thread(target=self._bridge, daemon=True).start()

    def _bridge(self) -> None:
        conn, _ = self.server.accept()
        self.conn = conn
        threading.Thread(target=self._to_pty, args=(conn,), daemon=True).start()
        try:
            while data := os.read(self.master, 65536):
                conn.sendall(data)
        except OSError:  # teardown closed one end
            pass
        conn.close()

    def _to_pty(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                os.write(self.master, data)
        except OSError:
            pass

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.conn is not None:
            self.conn.close()
        self.server.close()
        os.close(self.master)


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    bash = PtyBash(tmp_path / "shell.sock")
    sh = Shell(tmp_path / "shell.sock", "pty", alive=lambda: bash.proc.poll() is None)
    sh.connect(5)
    sh.wait_ready(20)
    yield sh
    sh.close()
    bash.close()


def test_output_and_status_with_echo_on(shell: Shell) -> None:
    r = shell.run("echo one; echo two >&2; (exit 3)", check=False)
    assert r.output == "one\ntwo\n" and r.rc == 3


def test_failure_raises_with_the_output(shell: Shell) -> None:
    with pytest.raises(CommandFailed) as info:
        shell.run("echo boom; false")
    assert info.value.result.rc == 1 and "boom" in info.value.result.output


def test_multiline_and_stdin_isolation(shell: Shell) -> None:
    """A command that reads stdin must not swallow the harness's next line."""
    r = shell.run("cat\nfor i in 1 2 3; do\n  echo line$i\ndone")
    assert r.output == "line1\nline2\nline3\n"
    assert shell.output("echo after") == "after"


def test_echo_off_and_state_persist(shell: Shell) -> None:
    shell.run("stty -echo; X=42")
    assert shell.output("echo $X") == "42"


def test_put_and_get_binary_file(shell: Shell, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40 + b"\n\r\x00end"
    target = str(tmp_path / "copied.bin")
    shell.put_file(target, data, mode=0o600)
    assert Path(target).read_bytes() == data
    assert oct(Path(target).stat().st_mode & 0o777) == "0o600"
    assert shell.get_file(target) == data


def test_timeout_then_recover(shell: Shell) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConsoleTimeout):
        shell.run("sleep 2", timeout=0.3)
    assert time.monotonic() - t0 < 2
    # The late end marker of the timed-out command must not answer this one.
    assert shell.output("echo fresh", timeout=10) == "fresh"


def test_shell_exit_is_noticed(shell: Shell) -> None:
    with pytest.raises(ConsoleClosed):
        shell.run("exit 0", timeout=10)


def test_overlong_line_is_refused(shell: Shell) -> None:
    with pytest.raises(ValueError, match="too long"):
        shell.run("echo " + "x" * 5000)
