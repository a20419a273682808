"""A draining server's refusal is not retried by the SDK's retry policy (gRPC's retry pushback), while a
plain UNAVAILABLE is: a retry that waits for ready on a server that has exited would wait out the
call's whole deadline (the SIGTERM drain test hung so when the drain ended between two retries)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from conftest import serve_in_thread

from fastswitch.client import CHANNEL_OPTIONS, ServiceUnavailable, _typed
from fastswitch.v1 import api_pb2, api_pb2_grpc
from svc_common.errors import ErrorMappingInterceptor, ShuttingDown, Unavailable


class _Refusing(api_pb2_grpc.FastSwitchServicer):
    def __init__(self) -> None:
        self.calls = 0
        self.error: type[Unavailable] = Unavailable

    async def GetStats(self, request: object, context: object) -> api_pb2.GetStatsResponse:  # noqa: N802
        self.calls += 1
        raise self.error("refused")


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, _Refusing]]:
    servicer = _Refusing()
    with serve_in_thread(
        lambda server: api_pb2_grpc.add_FastSwitchServicer_to_server(servicer, server),
        interceptors=[ErrorMappingInterceptor()],
    ) as addr:
        yield addr, servicer


def _calls_for_one_request(server: tuple[str, _Refusing], error: type[Unavailable]) -> tuple[int, float]:
    addr, servicer = server
    servicer.calls, servicer.error = 0, error
    with grpc.insecure_channel(addr, options=CHANNEL_OPTIONS) as channel:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            api_pb2_grpc.FastSwitchStub(channel).GetStats(api_pb2.GetStatsRequest(), timeout=30)
    assert isinstance(_typed(err.value), ServiceUnavailable)
    return servicer.calls, time.monotonic() - started


def test_a_shutting_down_refusal_is_answered_once_and_a_plain_unavailable_is_retried(server) -> None:
    calls, took = _calls_for_one_request(server, ShuttingDown)
    assert calls == 1 and took < 1.0, (calls, took)
    calls, _ = _calls_for_one_request(server, Unavailable)
    assert calls == 5  # the SDK's retry policy: maxAttempts
