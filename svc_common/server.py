"""grpc.aio server plumbing shared by the three services, and the channels between them.

Health starts NOT_SERVING and flips to SERVING once the service says it is ready; reflection is on;
SIGINT/SIGTERM drain: health NOT_SERVING, the service refuses new work (`draining`), live work has up
to `drain_timeout_s` to finish, then `stop(grace)`. Ports use TLS when given a certificate and key;
with a key ring, `AuthInterceptor` turns each call's `authorization` metadata into a Principal
(svc_common/auth.py) before the handler runs. Keepalives run on every connection both ways.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from svc_common.auth import KeyRing, current_principal
from svc_common.errors import ErrorMappingInterceptor

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the internal links: whole step plans and results
# Keepalive pings every 60 s on every connection (a peer that does not answer in 20 s is gone); servers
# accept a client's pings every 30 s or more. gRPC's defaults otherwise: pings only while calls are open,
# and at most 2 without data in between (an earlier, more eager setting stalled the step stream).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]
SERVER_KEEPALIVE_OPTIONS = [
    *KEEPALIVE_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 30_000),
    # Never GOAWAY a peer for "too many pings": an executor did so to an idle scheduler's Execute stream
    # after 4 minutes (ENHANCE_YOUR_CALM), which the scheduler then took for a lost executor.
    ("grpc.http2.max_ping_strikes", 0),
]
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    *KEEPALIVE_OPTIONS,
]


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def dial_host(host: str) -> str:
    """Where to reach a service bound on `host` from this machine (a wildcard means loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read the {what} {path}: {err.strerror or err}") from None


def link_channel(addr: str, tls_ca: str = "", options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """An aio channel to another service: TLS verified against `tls_ca` when given, else plain text."""
    opts = options if options is not None else CHANNEL_OPTIONS
    if tls_ca:
        creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca, "TLS CA file"))
        return grpc.aio.secure_channel(addr, creds, options=opts)
    return grpc.aio.insecure_channel(addr, options=opts)


def sync_channel(addr: str, tls_ca: str = "") -> grpc.Channel:
    """The blocking twin of `link_channel` (health checks from `fastswitch up`)."""
    if tls_ca:
        creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca, "TLS CA file"))
        return grpc.secure_channel(addr, creds)
    return grpc.insecure_channel(addr)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call to the `protected` services; sets `current_principal` for the handler.

    Health and reflection stay open. An unknown or missing key raises `Unauthenticated`, which the
    error-mapping interceptor (outside this one) turns into UNAUTHENTICATED.
    """

    def __init__(self, keys: KeyRing, protected: Iterable[str]) -> None:
        self.keys = keys
        self.prefixes = tuple(f"/{name}/" for name in protected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.prefixes):
            return handler
        keys = self.keys

        def principal_of(context: grpc.aio.ServicerContext) -> None:
            metadata = dict(context.invocation_metadata() or ())
            current_principal.set(keys.authenticate(metadata.get("authorization")))

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                principal_of(context)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                principal_of(context)
                async for item in inner_us(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        raise TypeError(f"{handler_call_details.method}: only unary and server-streaming calls can be authenticated")


class ServiceHost:
    """One aio server with health + reflection, TLS when configured, and a draining stop on signals."""

    def __init__(
        self,
        address: str,
        service_names: Iterable[str],
        *,
        tls_cert: str = "",
        tls_key: str = "",
        keys: KeyRing | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.service_names = list(service_names)
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorMappingInterceptor()]
        if keys is not None:
            interceptors.append(AuthInterceptor(keys, self.service_names))
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", max_message_bytes),
            *SERVER_KEEPALIVE_OPTIONS,
        ]
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], self.server
        )
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
        if tls_cert:
            creds = grpc.ssl_server_credentials([(_read(tls_key, "TLS key"), _read(tls_cert, "TLS certificate"))])
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {address}: is the port already in use?")
        self.tls = bool(tls_cert)
        self._stopping = asyncio.Event()
        self.draining = False
        self._ready = False
        self._serving = False

    async def set_serving(self, serving: bool) -> None:
        """Health for every service name; never SERVING again once draining has begun."""
        serving = serving and not self.draining
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def run(
        self,
        ready: Callable[[], Awaitable[None]] | None = None,
        on_stop: Callable[[], Awaitable[None]] | None = None,
        grace_s: float = 5.0,
        busy: Callable[[], bool] | None = None,
        drain_timeout_s: float = 0.0,
        serving_after_ready: bool = True,
    ) -> None:
        """Start, run `ready` (loading), mark SERVING, wait for a signal, drain, then stop gracefully.

        `busy` says whether live work remains; after a signal the host waits up to `drain_timeout_s`
        for it to become False. `serving_after_ready=False`: the service flips health itself.
        """
        await self.set_serving(False)
        await self.server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGUSR1, _log_tasks)
        if ready is not None:
            await ready()
        if serving_after_ready:
            await self.set_serving(True)
        log.info("serving", port=self.port, tls=self.tls)
        await self._stopping.wait()
        self.draining = True
        await self.set_serving(False)
        if busy is not None and drain_timeout_s > 0:
            log.info("draining", timeout_s=drain_timeout_s)
            deadline = time.monotonic() + drain_timeout_s
            while busy() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            log.info("drained" if not busy() else "drain_timed_out")
        log.info("shutting_down", grace_s=grace_s)
        if on_stop is not None:
            await on_stop()
        await self.server.stop(grace_s)


def _log_tasks() -> None:
    """SIGUSR1: log where every task of this process is waiting (a hung service explains itself)."""

    def attr(obj: Any, *names: str) -> Any:
        return next((v for n in names if (v := getattr(obj, n, None)) is not None), None)

    for task in asyncio.all_tasks():
        frames, coro = [], task.get_coro()
        while coro is not None:  # down the chain of awaits to where the task waits
            frame = attr(coro, "cr_frame", "ag_frame", "gi_frame")
            if frame is not None:
                frames.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            coro = attr(coro, "cr_await", "ag_await", "gi_yieldfrom")
        log.warning("task_stack", task=task.get_name(), stack=frames)
