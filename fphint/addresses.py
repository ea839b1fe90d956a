"""Endpoint addresses shared by agent and collector: ``tcp:HOST:PORT``,
``HOST:PORT``, ``unix:/path`` and ``vsock:CID:PORT``.

Both sides accept the same spellings so a unit file or a test can hand one
string to either; this module turns them into gRPC target/bind strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FphintError


class AddressError(FphintError):
    """An endpoint string that names no transport we support."""


@dataclass(frozen=True)
class Address:
    kind: str  # "tcp", "unix" or "vsock"
    host: str = ""
    port: int = 0
    path: str = ""
    cid: int = 0

    def grpc_target(self) -> str:
        """The string grpc.aio channels and servers understand."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "vsock":
            return f"vsock:{self.cid}:{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        if self.kind == "tcp":
            return f"tcp:{self.grpc_target()}"
        return self.grpc_target()


def _port(text: str, spec: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise AddressError(f"{spec!r}: port {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"{spec!r}: port {port} is out of range")
    return port


def parse(spec: str) -> Address:
    """Parse an endpoint.

    :raise AddressError: with the offending text in the message.
    """
    s = spec.strip()
    if s.startswith("unix:"):
        path = s[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise AddressError(f"{spec!r}: empty unix socket path")
        return Address("unix", path=path)
    if s.startswith("vsock:"):
        parts = s.split(":")
        if len(parts) != 3:
            raise AddressError(f"{spec!r}: expected vsock:CID:PORT")
        try:
            cid = int(parts[1])
        except ValueError:
            raise AddressError(f"{spec!r}: CID {parts[1]!r} is not a number") from None
        if not 0 <= cid < 2**32:
            raise AddressError(f"{spec!r}: CID out of range")
        return Address("vsock", cid=cid, port=_port(parts[2], spec))
    if s.startswith("tcp:"):
        s = s[len("tcp:") :]
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise AddressError(f"{spec!r}: expected [IPV6]:PORT")
        return Address("tcp", host=host, port=_port(rest[1:], spec))
    host, sep, port = s.rpartition(":")
    if not sep or not host:
        raise AddressError(f"{spec!r}: expected tcp:HOST:PORT, unix:/path or vsock:CID:PORT")
    return Address("tcp", host=host, port=_port(port, spec))
