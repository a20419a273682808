"""A stack with TLS on every port and an API-key file: every rule of issue 13, each its own test, over gRPC.

One stack for the module (real certificates made here with openssl; the real model). Each test leaves
no live request behind.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastswitch import (
    AsyncClient,
    Client,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceUnavailable,
    Unauthenticated,
)
from tests.conftest import make_certificate, running_stack

pytestmark = [pytest.mark.model, pytest.mark.slow]

KEYS = """
k-alice  alice  max-priority=2 max-requests=2
k-bob    bob
k-flood  flood
k-root   ops    admin
"""
MAX_WAITING = 3


@pytest.fixture(scope="module")
def secure(model_dir: str) -> Iterator[dict[str, object]]:
    directory = tempfile.mkdtemp(prefix="fastswitch-sec-")
    cert, key = make_certificate(directory)
    keys = os.path.join(directory, "keys.txt")
    with open(keys, "w") as f:
        f.write(KEYS)
    with running_stack(
        device_blocks=64,
        host_blocks=32,
        max_running=4,
        max_step_tokens=64,
        max_waiting=MAX_WAITING,
        max_message_bytes=64 * 1024,
        tls_cert=cert,
        tls_key=key,
        api_keys=keys,
    ) as stack:
        yield {"addr": stack.addr, "ca": cert, "stack": stack}


def client(secure: dict[str, object], key: str | None) -> Client:
    return Client(str(secure["addr"]), api_key=key or "", tls_ca=str(secure["ca"]), timeout=120)


def aclient(secure: dict[str, object], key: str) -> AsyncClient:
    return AsyncClient(str(secure["addr"]), api_key=key, tls_ca=str(secure["ca"]), timeout=120)


def wait_idle(secure: dict[str, object]) -> dict[str, float]:
    with client(secure, "k-root") as root:
        deadline = time.monotonic() + 60
        while (stats := root.stats())["live_requests"] > 0:
            assert time.monotonic() < deadline, f"requests still live after 60 s: {stats}"
            time.sleep(0.05)
        return stats


def start_long(secure: dict[str, object], key: str, request_id: str) -> tuple[Client, object]:
    """A request that keeps running (ignore_eos, many tokens) until the test cancels it."""
    c = client(secure, key)
    stream = c.generate("Count slowly:", max_tokens=400, ignore_eos=True, request_id=request_id)
    next(stream)  # the first token: it is live now
    return c, stream


def test_tls_serves_a_completion_to_a_client_that_trusts_the_certificate(secure) -> None:
    with client(secure, "k-bob") as bob:
        answer = bob.complete("The capital of France is", max_tokens=4)
    assert answer.finish_reason == "length" and answer.text.strip()


def test_plain_text_to_the_tls_port_fails(secure) -> None:
    with Client(str(secure["addr"]), api_key="k-bob", tls_ca="", connect_timeout=3) as plain:
        with pytest.raises(ServiceUnavailable):
            plain.complete("hello", max_tokens=2)


def test_the_links_to_the_executor_and_swap_daemon_are_tls_too(secure) -> None:
    stack = secure["stack"]
    for port in (stack.config.port + 1, stack.config.port + 2):  # type: ignore[attr-defined]
        addr = f"127.0.0.1:{port}"
        with grpc.insecure_channel(addr) as channel:
            with pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        creds = grpc.ssl_channel_credentials(open(str(secure["ca"]), "rb").read())
        with grpc.secure_channel(addr, creds) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_call_without_a_key_is_unauthenticated(secure) -> None:
    with client(secure, None) as anonymous:
        with pytest.raises(Unauthenticated, match="no API key"):
            anonymous.complete("hello", max_tokens=2)
        with pytest.raises(Unauthenticated):
            anonymous.stats()


def test_an_unknown_key_is_unauthenticated(secure) -> None:
    with client(secure, "k-mallory") as mallory:
        with pytest.raises(Unauthenticated, match="unknown API key"):
            mallory.complete("hello", max_tokens=2)
        with pytest.raises(Unauthenticated):
            mallory.cancel("anything")


def test_a_request_runs_as_the_keys_tenant_whatever_it_claims(secure) -> None:
    with client(secure, "k-root") as root:
        before = root.stats()["tenants"]
    with client(secure, "k-alice") as alice:
        alice.complete("Hello there", max_tokens=3, tenant="bob")
    with client(secure, "k-root") as root:
        after = root.stats()["tenants"]
    assert after["alice"]["generated_tokens"] == before.get("alice", {}).get("generated_tokens", 0) + 3
    assert after.get("bob") == before.get("bob")


def test_a_priority_above_the_keys_cap_is_permission_denied(secure) -> None:
    with client(secure, "k-alice") as alice:
        with pytest.raises(PermissionDenied, match="max-priority 2"):
            alice.complete("hello", max_tokens=2, priority=3)
        assert alice.complete("hello", max_tokens=2, priority=2).finish_reason is not None
    c, stream = start_long(secure, "k-alice", "alice-prio")
    try:
        with pytest.raises(PermissionDenied):
            c.set_priority("alice-prio", 5)
        c.set_priority("alice-prio", 1)
    finally:
        c.cancel("alice-prio")
        c.close()
    wait_idle(secure)


def test_cancel_of_another_tenants_request_is_not_found(secure) -> None:
    c, stream = start_long(secure, "k-alice", "alice-cancel")
    try:
        with client(secure, "k-bob") as bob:
            with pytest.raises(NotFound) as err:
                bob.cancel("alice-cancel")
            with pytest.raises(NotFound) as missing:
                bob.cancel("no-such-request")
        assert str(err.value).replace("alice-cancel", "X") == str(missing.value).replace("no-such-request", "X")
        with client(secure, "k-root") as root:
            assert root.stats()["live_requests"] == 1  # bob's cancel changed nothing
            root.cancel("alice-cancel")  # an admin may
    finally:
        c.close()
    wait_idle(secure)


def test_set_priority_of_another_tenants_request_is_not_found(secure) -> None:
    c, stream = start_long(secure, "k-alice", "alice-setprio")
    try:
        with client(secure, "k-bob") as bob:
            with pytest.raises(NotFound):
                bob.set_priority("alice-setprio", 0)
    finally:
        c.cancel("alice-setprio")
        c.close()
    wait_idle(secure)


def test_end_conversation_of_another_tenants_conversation_is_not_found(secure) -> None:
    with client(secure, "k-alice") as alice:
        alice.complete("Hi", chat=True, max_tokens=2, conversation_id="secret-plans")
        with client(secure, "k-bob") as bob:
            with pytest.raises(NotFound):
                bob.end_conversation("secret-plans")
            with pytest.raises(NotFound):
                bob.end_conversation("secret-plans", tenant="alice")  # naming the tenant does not help
        alice.end_conversation("secret-plans")  # still there for its owner
        with pytest.raises(NotFound):
            alice.end_conversation("secret-plans")


def test_stats_show_a_tenant_only_its_own_figures(secure) -> None:
    with client(secure, "k-bob") as bob:
        bob.complete("Hello", max_tokens=2)
    with client(secure, "k-alice") as alice:
        alice.complete("Hello", max_tokens=2)
        stats = alice.stats()
    assert set(stats["tenants"]) == {"alice"}
    assert "device_blocks_free" not in stats and "preemptions" not in stats
    assert stats["live_requests"] == 0


def test_an_admin_key_sees_every_tenant(secure) -> None:
    with client(secure, "k-bob") as bob:
        bob.complete("Hello", max_tokens=2)
    with client(secure, "k-root") as root:
        stats = root.stats()
    assert {"bob"} <= set(stats["tenants"]) and "device_blocks_free" in stats


def test_max_requests_bounds_a_tenants_live_requests(secure) -> None:
    opened = [start_long(secure, "k-alice", f"alice-live-{i}") for i in range(2)]
    try:
        with client(secure, "k-alice") as alice:
            with pytest.raises(ResourceExhausted, match="max-requests") as err:
                alice.complete("one too many", max_tokens=2)
            assert err.value.retry_after_s == 1.0
        with client(secure, "k-bob") as bob:  # other tenants are not held back
            assert bob.complete("Hello", max_tokens=2).finish_reason is not None
    finally:
        for i, (c, _) in enumerate(opened):
            c.cancel(f"alice-live-{i}")
            c.close()
    wait_idle(secure)


def test_max_waiting_bounds_the_queue_with_a_retry_hint(secure) -> None:
    async def flood() -> list[object]:
        async with aclient(secure, "k-flood") as c:

            async def one(i: int) -> object:
                try:
                    return await c.complete(f"Story {i}:", max_tokens=24, ignore_eos=True)
                except ResourceExhausted as err:
                    return err

            return await asyncio.gather(*(one(i) for i in range(12)))

    results = asyncio.run(flood())
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    done = [r for r in results if not isinstance(r, ResourceExhausted)]
    assert refused and all("queue is full" in str(r) and r.retry_after_s == 1.0 for r in refused)
    assert len(done) >= MAX_WAITING  # at least a full queue was served
    assert all(r.finish_reason == "length" for r in done)  # type: ignore[attr-defined]
    stats = wait_idle(secure)
    assert stats["device_blocks_free"] == stats["device_blocks_total"]


def test_a_prompt_beyond_the_context_is_invalid_before_anything_is_allocated(secure) -> None:
    before = wait_idle(secure)
    with client(secure, "k-bob") as bob:
        with pytest.raises(InvalidRequest, match="exceeds the model's context"):
            bob.complete("Hello", max_tokens=10_000_000)
    after = wait_idle(secure)
    for name in ("device_blocks_free", "live_requests", "waiting", "conversations"):
        assert after[name] == before[name]


def test_an_oversized_message_is_refused(secure) -> None:
    with client(secure, "k-bob") as bob:
        with pytest.raises(ResourceExhausted):
            bob.complete("x" * 100_000, max_tokens=2)
        assert bob.complete("still serving", max_tokens=2).finish_reason is not None
