"""Assembly of the collector daemon: gRPC servers, health, reflection, limits,
graceful shutdown.

Guests and operators get separate servers: the guest-facing one (FreePageHints)
listens on the configured TCP addresses itself and on a private Unix socket
that the Unix/vsock bridges (peers.py) relay to, so every bridged call carries
the kernel's account of its peer; the admin one (CollectorAdmin) only on a
Unix socket with mode 0600, so no guest can reach it. The guest-facing server
has no server-wide call limit that unauthenticated callers could fill: calls
without a valid token end at once, and the only unauthenticated calls that
may stay open (health Watch, reflection) have budgets of their own
(budgets.py). docs/security.md has the whole trust model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fphint import addresses
from fphint.v1 import admin_pb2, admin_pb2_grpc, hints_pb2, hints_pb2_grpc

from .admin import AdminService
from .budgets import Budget, CappedHealth, add_capped_reflection
from .config import CollectorConfig, Limits
from .epochs import Collector
from .metrics import Metrics
from .migrate.observer import NO_OBSERVER, MigrationObserver
from .peers import Bridge, PeerTable
from .service import FreePageHintsService

log = logging.getLogger(__name__)

HINTS_SERVICE = hints_pb2.DESCRIPTOR.services_by_name["FreePageHints"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["CollectorAdmin"].full_name


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def server_options(limits: Limits) -> list[tuple[str, int]]:
    ms = _ms
    return [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        ("grpc.keepalive_time_ms", ms(limits.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", ms(limits.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_connection_age_ms", ms(limits.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(limits.max_connection_age_grace_s)),
        ("grpc.so_reuseport", 0),
    ]


def guest_server_options(limits: Limits) -> list[tuple[str, int]]:
    """:func:`server_options` plus the bounds on connections that untrusted peers open."""
    return [
        *server_options(limits),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.server_handshake_timeout_ms", _ms(limits.handshake_timeout_s)),
        ("grpc.max_connection_idle_ms", _ms(limits.connection_idle_s)),
    ]


def _prepare_unix(path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.is_socket():
        p.unlink()  # a stale socket from a previous run


class CollectorServer:
    """The daemon's servers around one :class:`Collector`.

    ``start()`` binds and serves; ``stop(grace)`` marks health NOT_SERVING,
    ends agent streams and epochs, then stops with a grace period.
    """

    def __init__(
        self, config: CollectorConfig, metrics: Metrics | None = None, observer: MigrationObserver = NO_OBSERVER
    ) -> None:
        self.config = config
        self.observer = observer
        self.collector = Collector(config, metrics)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.admin_server: grpc.aio.Server | None = None
        self.admin: AdminService | None = None
        #: Actual bound addresses (port 0 resolved), in config order.
        self.bound: list[addresses.Address] = []
        self._stopped = asyncio.Event()
        #: Unix and vsock listeners: accepted here, relayed to gRPC's private socket.
        self.bridges: list[Bridge] = []
        #: 0700 directory for sockets only the collector itself may reach.
        self._private: Path | None = None
        self.peers: PeerTable | None = None

    async def start(self) -> None:
        cfg, limits = self.config, self.config.limits
        if not cfg.listen:
            raise ValueError("nothing to listen on: give at least one listen address")
        self.server = grpc.aio.server(options=guest_server_options(limits))
        metrics = self.collector.metrics
        if any(a.kind in ("unix", "vsock") for a in cfg.listen):
            self._private = Path(tempfile.mkdtemp(prefix="fphint-collector-"))  # mode 0700
            self.peers = PeerTable(self._private)
        hints_pb2_grpc.add_FreePageHintsServicer_to_server(
            FreePageHintsService(self.collector, self.peers), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(
            CappedHealth(self.health, Budget("health_watch", limits.max_health_watches, metrics)), self.server
        )
        add_capped_reflection(
            (HINTS_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
            Budget("reflection", limits.max_reflection_streams, metrics),
        )
        backend = str(self._private / "grpc.sock") if self._private is not None else ""
        if backend:
            self.server.add_insecure_port(f"unix:{backend}")
        caps = {
            "max_connections": limits.max_bridge_connections,
            "max_per_cid": limits.max_connections_per_cid,
            "max_per_process": limits.max_connections_per_process,
        }
        for addr in cfg.listen:
            if addr.kind in ("unix", "vsock"):
                assert self.peers is not None
                if addr.kind == "unix":
                    _prepare_unix(addr.path)
                    self.bridges.append(Bridge.unix(addr.path, self.peers, backend, metrics, **caps))
                else:  # grpcio wheels lack vsock anyway
                    self.bridges.append(Bridge.vsock(addr.port, self.peers, backend, metrics, **caps))
                self.bound.append(addr)
                continue
            port = self.server.add_insecure_port(addr.grpc_target())
            if addr.kind == "tcp":
                addr = addresses.Address("tcp", host=addr.host, port=port)
            self.bound.append(addr)
        if cfg.admin is not None:
            # Operators are trusted: many concurrent admin calls on one connection are fine.
            admin_opts = [o for o in server_options(limits) if o[0] != "grpc.max_concurrent_streams"]
            admin_opts.append(("grpc.max_concurrent_streams", limits.max_concurrent_rpcs))
            self.admin_server = grpc.aio.server(options=admin_opts)
            self.admin = AdminService(self.collector, self.observer)
            admin_pb2_grpc.add_CollectorAdminServicer_to_server(self.admin, self.admin_server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.admin_server)
            reflection.enable_server_reflection((ADMIN_SERVICE, reflection.SERVICE_NAME), self.admin_server)
            _prepare_unix(cfg.admin.path)
            old = os.umask(0o077)
            try:
                self.admin_server.add_insecure_port(cfg.admin.grpc_target())
                await self.admin_server.start()
            finally:
                os.umask(old)
        await self.server.start()
        for bridge in self.bridges:
            await bridge.start()
        for name in ("", HINTS_SERVICE, ADMIN_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.metrics is not None:
            self.collector.metrics.serve(*cfg.metrics)
        log.info(
            "collector serving",
            extra={
                "listen": [str(a) for a in self.bound],
                "admin": str(cfg.admin) if cfg.admin else None,
                "vms": len(cfg.vms),
            },
        )

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING first, so balancers and agents see it."""
        if self._stopped.is_set():
            return
        grace = self.config.shutdown_grace_s if grace is None else grace
        log.info("collector stopping", extra={"grace_s": grace})
        await self.health.enter_graceful_shutdown()
        if self.admin is not None:
            await self.admin.migrations.shutdown()  # migrate_cancel on each source first
        self.collector.shutdown()
        waits = [s.stop(grace) for s in (self.server, self.admin_server) if s is not None]
        for bridge in self.bridges:
            bridge.stop_accepting()
        await asyncio.gather(*waits)
        for bridge in self.bridges:
            bridge.close()
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def run(config: CollectorConfig, observer: MigrationObserver = NO_OBSERVER) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    srv = CollectorServer(config, observer=observer)
    await srv.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await srv.stop()
