"""The collector's configuration file: daemon settings and the VM registry.

Example (TOML; integers may be written in hex)::

    [collector]
    listen = ["tcp:0.0.0.0:7420", "unix:/run/fphint/agents.sock"]
    admin = "unix:/run/fphint/admin.sock"
    metrics = "127.0.0.1:9464"

    [[vm]]
    name = "web1"
    token_file = "/etc/fphint/tokens/web1"   # or token = "..."
    vsock_cid = 7                            # optional: calls over vsock from CID 7 are web1's
    unix_uid = 64055                         # optional: web1's token counts on unix: only from this uid
    qmp = "unix:/run/qemu/web1.fphint.qmp"   # fphint's own QMP monitor (migrate, proxy)
    ram = [
      { gpa = 0x0, size = 0x80000000, block = "pc.ram", offset = 0x0 },
      { gpa = 0x100000000, size = 0x40000000, block = "pc.ram", offset = 0x80000000 },
    ]

A VM's ``ram`` may be left out and filled in later from QMP
(:meth:`Collector.set_layout`). ``qmp`` is a monitor of the VM's QEMU that
fphint has to itself (QEMU's QMP serves one client at a time), started with
``-qmp unix:PATH,server=on,wait=off``; ``unix:PATH``, ``/PATH`` or
``tcp:HOST:PORT``. Every error names the file and the entry.

Who may claim which VM (tokens, CIDs, uids) is docs/security.md. The file is
read with bounds (size, nesting) and every value is checked, so a bad file
only ever raises :class:`ConfigError`.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fphint import addresses

from .errors import CollectorError
from .layout import LayoutError, RamLayout, RamRange

#: Tokens shorter than this are refused: they only stop cross-VM impersonation
#: if they cannot be guessed.
MIN_TOKEN_LENGTH = 16
_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: Largest configuration and token file read.
MAX_CONFIG_BYTES = 1 << 20
MAX_TOKEN_BYTES = 4096
#: Integer limits end up in gRPC channel arguments (C ints).
_MAX_LIMIT = (1 << 31) - 1


class ConfigError(CollectorError):
    """A configuration file the collector refuses to start with."""

    default_status = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class Limits:
    """Bounds on what one guest can make the collector spend."""

    max_message_bytes: int = 4 << 20
    max_ranges_per_epoch: int = 1 << 20
    max_ranges_per_chunk: int = 1 << 16
    max_reports_per_vm: int = 4
    max_deadline_s: float = 60.0
    #: A Report call that sends nothing for this long is cut.
    report_idle_timeout_s: float = 10.0
    #: Concurrent calls on the admin server (operators). The guest-facing
    #: server has no server-wide count: anyone who can connect could fill one
    #: (docs/security.md); it has the budgets below instead.
    max_concurrent_rpcs: int = 1024
    max_streams_per_connection: int = 16
    #: Unauthenticated calls that may stay open, each kind from its own
    #: budget: health Watch streams and reflection streams.
    max_health_watches: int = 16
    max_reflection_streams: int = 4
    #: TCP connections the guest-facing gRPC server keeps at once; and per
    #: Unix/vsock bridge, in total, per guest (vsock CID) and per local
    #: process (unix pid; a test or a host tool may run many agents in one).
    max_connections: int = 4096
    max_bridge_connections: int = 1024
    max_connections_per_cid: int = 8
    max_connections_per_process: int = 64
    #: A connection that has not finished its HTTP/2 handshake this soon is
    #: cut, and so is one with no call open this long (an agent always has
    #: its Attach open).
    handshake_timeout_s: float = 5.0
    connection_idle_s: float = 60.0
    #: Largest AttachRequest (the agent's facts); the rest of the 4 MiB
    #: message limit is for Report chunks.
    max_attach_bytes: int = 64 << 10
    keepalive_time_s: float = 20.0
    keepalive_timeout_s: float = 10.0
    max_connection_age_s: float = 3600.0
    max_connection_age_grace_s: float = 30.0
    #: Closed epochs kept per VM for the proxy before the oldest is released.
    retained_epochs: int = 4
    #: Stream the migration proxy may hold back waiting for hints, per
    #: migration, in bytes and seconds; beyond either it goes out unchanged.
    proxy_hold_bytes: int = 128 << 20
    proxy_hold_s: float = 2.0
    #: While this much waits for the gate the proxy stops reading: QEMU then
    #: waits too and counts those bytes as unsent. Read further ahead and they
    #: are bytes QEMU believes delivered, which the link must still carry, in
    #: the downtime if the guest stops meanwhile.
    proxy_readahead_bytes: int = 16 << 20


@dataclass(frozen=True)
class VmEntry:
    name: str
    token: str
    vsock_cid: int | None = None
    layout: RamLayout | None = None
    #: fphint's QMP monitor of this VM's (source) QEMU, as written in the file.
    qmp: str | None = None
    #: If set, this VM's token is accepted on a unix: listener only from a
    #: process with this uid (SO_PEERCRED).
    unix_uid: int | None = None


@dataclass(frozen=True)
class CollectorConfig:
    listen: tuple[addresses.Address, ...] = ()
    admin: addresses.Address | None = None
    metrics: tuple[str, int] | None = None
    default_deadline_s: float = 2.0
    shutdown_grace_s: float = 5.0
    limits: Limits = field(default_factory=Limits)
    vms: tuple[VmEntry, ...] = ()


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got a boolean")
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}: expected {name}, got {type(value).__name__}")
    return value


def _layout(vm: dict[str, Any], where: str) -> RamLayout | None:
    ram = vm.get("ram")
    if ram is None:
        return None
    _expect(ram, list, f"{where}.ram")
    ranges = []
    for i, item in enumerate(ram):
        w = f"{where}.ram[{i}]"
        _expect(item, dict, w)
        unknown = set(item) - {"gpa", "size", "block", "offset"}
        if unknown:
            raise ConfigError(f"{w}: unknown keys {sorted(unknown)}")
        try:
            ranges.append(
                RamRange(
                    gpa=_expect(item["gpa"], int, f"{w}.gpa"),
                    size=_expect(item["size"], int, f"{w}.size"),
                    block=_expect(item["block"], str, f"{w}.block"),
                    offset=_expect(item.get("offset", 0), int, f"{w}.offset"),
                )
            )
        except KeyError as e:
            raise ConfigError(f"{w}: missing {e.args[0]!r}") from None
    blocks = vm.get("blocks")
    try:
        if blocks is None:
            return RamLayout.from_ranges(ranges)
        _expect(blocks, dict, f"{where}.blocks")
        return RamLayout(tuple(ranges), {str(k): _expect(v, int, f"{where}.blocks.{k}") for k, v in blocks.items()})
    except LayoutError as e:
        raise ConfigError(f"{where}: {e}") from None


def qmp_address(spec: str) -> str:
    """Check a QMP monitor address (``unix:PATH``, ``/PATH``, ``tcp:HOST:PORT``); return it as given.

    :raise ConfigError: anything else.
    """
    if spec.startswith("/"):
        return spec
    try:
        addr = addresses.parse(spec)
    except addresses.AddressError as e:
        raise ConfigError(f"qmp {spec!r}: {e}") from None
    if addr.kind not in ("unix", "tcp") or (addr.kind == "tcp" and not spec.startswith("tcp:")):
        raise ConfigError(f"qmp {spec!r}: expected unix:/path, /path or tcp:HOST:PORT")
    return spec


def _token(vm: dict[str, Any], where: str, base: Path) -> str:
    if ("token" in vm) == ("token_file" in vm):
        raise ConfigError(f"{where}: give exactly one of token and token_file")
    if "token" in vm:
        token = str(_expect(vm["token"], str, f"{where}.token"))
    else:
        path = base / _expect(vm["token_file"], str, f"{where}.token_file")
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_TOKEN_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"{where}: cannot read token_file {path}: {e.strerror}") from None
        if len(raw) > MAX_TOKEN_BYTES:
            raise ConfigError(f"{where}: token_file {path} is longer than {MAX_TOKEN_BYTES} bytes")
        token = raw.decode("utf-8", "replace").strip()
    if len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or " " in token:
        raise ConfigError(f"{where}: token must be at least {MIN_TOKEN_LENGTH} printable characters without spaces")
    return token


def _limits(raw: dict[str, Any], where: str) -> Limits:
    defaults = Limits()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if not hasattr(defaults, key):
            continue
        kind = type(getattr(defaults, key))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        _expect(value, kind, f"{where}.{key}")
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{where}.{key}: must be positive and finite")
        if value > _MAX_LIMIT:
            raise ConfigError(f"{where}.{key}: {value} is larger than {_MAX_LIMIT}")
        values[key] = value
    return Limits(**values)


def parse(data: dict[str, Any], source: str = "<config>", base: Path | None = None) -> CollectorConfig:
    """Build a config from parsed TOML. ``source`` prefixes every error."""
    base = base or Path(".")
    unknown = set(data) - {"collector", "vm"}
    if unknown:
        raise ConfigError(f"{source}: unknown tables {sorted(unknown)}")
    col = _expect(data.get("collector", {}), dict, f"{source}: [collector]")
    known = {"listen", "admin", "metrics", "default_deadline_ms", "shutdown_grace_s"} | set(Limits.__dataclass_fields__)
    unknown = set(col) - known
    if unknown:
        raise ConfigError(f"{source}: [collector] unknown keys {sorted(unknown)}")
    try:
        listen = tuple(
            addresses.parse(_expect(a, str, f"{source}: listen"))
            for a in _expect(col.get("listen", []), list, f"{source}: listen")
        )
        admin = addresses.parse(_expect(col["admin"], str, f"{source}: admin")) if "admin" in col else None
    except addresses.AddressError as e:
        raise ConfigError(f"{source}: {e}") from None
    if admin is not None and admin.kind != "unix":
        raise ConfigError(f"{source}: admin must be a unix: socket (it is not for guests)")
    metrics = None
    if "metrics" in col:
        host, _, port = _expect(col["metrics"], str, f"{source}: metrics").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{source}: metrics must be HOST:PORT")
        metrics = (host, int(port))
    deadline_ms = _expect(col.get("default_deadline_ms", 2000), int, f"{source}: default_deadline_ms")
    grace = float(_expect(col.get("shutdown_grace_s", 5.0), (int, float), f"{source}: shutdown_grace_s"))
    if not 0 <= grace <= 3600:
        raise ConfigError(f"{source}: shutdown_grace_s must be in [0, 3600]")
    limits = _limits(col, f"{source}: [collector]")
    if not 0 < deadline_ms <= limits.max_deadline_s * 1000:
        raise ConfigError(f"{source}: default_deadline_ms must be in (0, {limits.max_deadline_s * 1000:.0f}]")

    vms: list[VmEntry] = []
    seen_names: set[str] = set()
    seen_tokens: set[str] = set()
    seen_cids: set[int] = set()
    for i, vm in enumerate(_expect(data.get("vm", []), list, f"{source}: [[vm]]")):
        where = f"{source}: vm[{i}]"
        _expect(vm, dict, where)
        unknown = set(vm) - {"name", "token", "token_file", "vsock_cid", "unix_uid", "ram", "blocks", "qmp"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        name = _expect(vm.get("name"), str, f"{where}.name")
        if not _VM_NAME.match(name):
            raise ConfigError(f"{where}: name {name!r} must be 1-63 of [A-Za-z0-9._-]")
        where = f"{source}: vm {name!r}"
        token = _token(vm, where, base)
        cid = vm.get("vsock_cid")
        if cid is not None:
            _expect(cid, int, f"{where}.vsock_cid")
            if not 3 <= cid < 2**32 - 1:
                raise ConfigError(f"{where}: vsock_cid {cid} is not a guest CID")
            if cid in seen_cids:
                raise ConfigError(f"{where}: vsock_cid {cid} used twice")
            seen_cids.add(cid)
        uid = vm.get("unix_uid")
        if uid is not None:
            _expect(uid, int, f"{where}.unix_uid")
            if not 0 <= uid < 2**32 - 1:
                raise ConfigError(f"{where}: unix_uid {uid} is not a uid")
        if name in seen_names:
            raise ConfigError(f"{where}: name used twice")
        if token in seen_tokens:
            raise ConfigError(f"{where}: token shared with another VM")
        qmp = None
        if "qmp" in vm:
            try:
                qmp = qmp_address(_expect(vm["qmp"], str, f"{where}.qmp"))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        seen_names.add(name)
        seen_tokens.add(token)
        vms.append(VmEntry(name=name, token=token, vsock_cid=cid, layout=_layout(vm, where), qmp=qmp, unix_uid=uid))
    return CollectorConfig(
        listen=listen,
        admin=admin,
        metrics=metrics,
        default_deadline_s=deadline_ms / 1000,
        shutdown_grace_s=grace,
        limits=limits,
        vms=tuple(vms),
    )


def load(path: str | Path) -> CollectorConfig:
    """Read and check a configuration file. :raise ConfigError: anything wrong with it."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES} bytes")
    return loads(raw, str(p), p.parent)


def loads(raw: bytes, source: str = "<config>", base: Path | None = None) -> CollectorConfig:
    """Parse configuration text; raises only :class:`ConfigError`.

    tomllib recurses once per nesting level of arrays and inline tables, so
    a pathological file ends as a ConfigError, not a RecursionError.
    """
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    return parse(data, source, base)
