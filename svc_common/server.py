"""grpc.aio server plumbing shared by the three services.

Health starts NOT_SERVING and flips to SERVING once the service says it is ready; reflection is on;
SIGINT/SIGTERM enter graceful shutdown (NOT_SERVING, then `stop(grace)`).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from svc_common.errors import ErrorMappingInterceptor

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class ServiceHost:
    """One aio server with health + reflection, and a graceful stop on signals."""

    def __init__(self, address: str, service_names: Iterable[str]) -> None:
        self.server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=CHANNEL_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self.service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.server
        )
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {address}: is the port already in use?")
        self._stopping = asyncio.Event()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def run(
        self,
        ready: Callable[[], Awaitable[None]] | None = None,
        on_stop: Callable[[], Awaitable[None]] | None = None,
        grace_s: float = 5.0,
    ) -> None:
        """Start, run `ready` (loading), mark SERVING, wait for a signal, then stop gracefully."""
        await self.set_serving(False)
        await self.server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        if ready is not None:
            await ready()
        await self.set_serving(True)
        log.info("serving", port=self.port)
        await self._stopping.wait()
        log.info("shutting_down", grace_s=grace_s)
        await self.set_serving(False)
        if on_stop is not None:
            await on_stop()
        await self.server.stop(grace_s)
