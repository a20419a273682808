"""Domain errors and their one mapping onto gRPC status codes.

Logic raises these plain exceptions; `ErrorMappingInterceptor` turns them into a status with the
message at the server edge, so servicers stay thin and no handler aborts with a blanket INTERNAL.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

log = structlog.get_logger(__name__)

# Requests refused at this process's edge, by status name (`stats` shows them as `refused_<code>`).
REFUSED: Counter[str] = Counter()


class ServingError(Exception):
    """Base class: carries the gRPC status code it maps to (and, optionally, when to retry)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhaustedError(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDeniedError(ServingError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class ShuttingDown(Unavailable):
    """UNAVAILABLE that clients must not retry here: this process is draining and will be gone. Sent with
    gRPC's `grpc-retry-pushback-ms: -1`, which stops a client's retry policy (a retry that waits for
    ready would otherwise wait for a server that has exited, up to the call's whole deadline)."""

    retry_here = False


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServingError):
        return exc.code, str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping any handler (unary or streaming) to a specific status code."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
            code, message = _status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("rpc_failed", method=method)
            else:
                REFUSED[code.name.lower()] += 1
                log.info("rpc_rejected", method=method, code=code.name, reason=message)
            retry_after = getattr(exc, "retry_after_s", None)
            trailers: tuple[tuple[str, str], ...] = ()
            if retry_after is not None:
                trailers += (("retry-after", f"{retry_after:g}"),)
            if not getattr(exc, "retry_here", True):
                trailers += (("grpc-retry-pushback-ms", "-1"),)
            await context.abort(code, message, trailing_metadata=trailers)

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_uu(request, context)
                except (grpc.aio.AbortError, AssertionError):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status here, once
                    await abort(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )

        def streaming(inner: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
            """Wraps a server-streaming or bidi handler (first argument: request or request iterator)."""

            async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for item in inner(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    await abort(context, exc)

            return wrapped

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                streaming(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                streaming(handler.stream_stream), handler.request_deserializer, handler.response_serializer
            )
        return handler


class AlreadyExists(ServingError):
    code = grpc.StatusCode.ALREADY_EXISTS
