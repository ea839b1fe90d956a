"""Unauthenticated long-lived calls, each kind from its own small budget.

The guest-facing server also serves gRPC health and reflection, which need
no token. Both have streaming methods a caller may keep open for ever
(health ``Watch``, ``ServerReflectionInfo``). Counted against a server-wide
limit they would let anyone who can connect starve every VM's Attach and
Report; here each kind has its own cap, and a call beyond it is refused at
once with RESOURCE_EXHAUSTED. Agents use neither.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from .metrics import Metrics


class Budget:
    """At most ``limit`` holders at once; nothing waits for a slot."""

    def __init__(self, name: str, limit: int, metrics: Metrics) -> None:
        self.name = name
        self.limit = limit
        self.metrics = metrics
        self.held = 0

    def take(self) -> bool:
        if self.held >= self.limit:
            self.metrics.budget_refused.labels(self.name).inc()
            return False
        self.held += 1
        return True

    def give(self) -> None:
        self.held -= 1

    async def refuse(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.name}: {self.limit} calls open already")


class CappedHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The shared health servicer's answers, with ``Watch`` streams capped."""

    def __init__(self, inner: health.aio.HealthServicer, watches: Budget) -> None:
        self.inner = inner
        self.watches = watches

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        reply: health_pb2.HealthCheckResponse = await self.inner.Check(request, context)
        return reply

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        if not self.watches.take():
            await self.watches.refuse(context)
            return
        try:
            await self.inner.Watch(request, context)
        finally:
            self.watches.give()


class CappedReflection(ReflectionServicer):  # type: ignore[misc]
    """gRPC reflection with its streams capped."""

    def __init__(self, service_names: Sequence[str], streams: Budget) -> None:
        super().__init__(service_names)
        self.streams = streams

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        if not self.streams.take():
            await self.streams.refuse(context)
            return
        try:
            async for reply in super().ServerReflectionInfo(request_iterator, context):
                yield reply
        finally:
            self.streams.give()


def add_capped_reflection(service_names: Sequence[str], server: grpc.aio.Server, streams: Budget) -> None:
    """Like ``reflection.enable_server_reflection``, with :class:`CappedReflection`."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(CappedReflection(service_names, streams), server)
