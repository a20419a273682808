"""The HTTP front's API keys and TLS: each rule of svc_common/auth.py over HTTP, on the real model.

One stack for the module, as `fastswitch up --http-port P --api-keys FILE --tls-cert C --tls-key K`
starts it: HTTPS on the HTTP port, TLS and keys on the scheduler, the front passing each caller's key on.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from fastswitch import Client
from tests.conftest import free_port, make_certificate, running_stack

pytestmark = [pytest.mark.model, pytest.mark.slow]

KEYS = """
k-alice  alice  max-priority=2 max-requests=1
k-bob    bob
k-root   ops    admin
"""
CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def secure(model_dir: str) -> Iterator[dict[str, Any]]:
    directory = tempfile.mkdtemp(prefix="fastswitch-http-auth-")
    cert, key = make_certificate(directory)
    keys = os.path.join(directory, "keys.txt")
    with open(keys, "w") as f:
        f.write(KEYS)
    with running_stack(
        device_blocks=64, host_blocks=0, max_running=4, tls_cert=cert, tls_key=key, api_keys=keys, http_port=free_port()
    ) as stack:
        yield {"stack": stack, "ca": cert, "url": stack.http_url}


def http(secure: dict[str, Any], key: str | None = None) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=secure["url"], verify=secure["ca"], headers=headers, timeout=120)


def grpc_client(secure: dict[str, Any], key: str) -> Client:
    return Client(secure["stack"].addr, api_key=key, tls_ca=secure["ca"], timeout=120)


def error_of(response: httpx.Response) -> dict[str, Any]:
    return response.json()["error"]


def test_the_http_port_serves_https_to_a_client_that_trusts_the_certificate(secure) -> None:
    assert secure["url"].startswith("https://")
    api = openai.OpenAI(
        base_url=secure["url"] + "/v1", api_key="k-bob", max_retries=0, http_client=httpx.Client(verify=secure["ca"])
    )
    reply = api.chat.completions.create(model="", messages=CHAT["messages"], max_tokens=2, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2
    with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
        httpx.get(secure["url"].replace("https://", "http://") + "/health", timeout=5)


def test_no_key_or_an_unknown_key_is_401_and_health_stays_open(secure) -> None:
    for key, says in ((None, "no API key"), ("k-nobody", "unknown API key")):
        with http(secure, key) as c:
            for response in (c.post("/v1/chat/completions", json=CHAT), c.get("/v1/models")):
                assert response.status_code == 401, response.text
                assert says in error_of(response)["message"]
                assert error_of(response)["type"] == "authentication_error"
    with http(secure) as c:
        assert c.get("/health").status_code == 200


def test_the_tenant_is_the_keys_not_the_bodys_user(secure) -> None:
    with grpc_client(secure, "k-root") as root:
        before = root.stats()["tenants"]
        with http(secure, "k-bob") as c:
            response = c.post("/v1/chat/completions", json={**CHAT, "user": "mallory"})
        assert response.status_code == 200, response.text
        after = root.stats()["tenants"]
    assert "mallory" not in after
    generated = after["bob"]["generated_tokens"] - before.get("bob", {}).get("generated_tokens", 0)
    assert generated == 2


def test_a_priority_above_the_keys_cap_is_403_and_within_it_is_served(secure) -> None:
    with http(secure, "k-alice") as c:
        # The body's priority is vLLM's (lower is served earlier): -5 asks for FastSwitch priority 5 > 2.
        response = c.post("/v1/chat/completions", json={**CHAT, "priority": -5})
        assert response.status_code == 403, response.text
        assert "max-priority 2" in error_of(response)["message"]
        assert c.post("/v1/chat/completions", json={**CHAT, "priority": -2}).status_code == 200


def test_the_keys_max_requests_is_enforced_by_the_scheduler_as_429(secure) -> None:
    with grpc_client(secure, "k-alice") as alice:
        stream = alice.generate("Count slowly:", max_tokens=400, ignore_eos=True)
        next(stream)  # alice's one live request
        try:
            with http(secure, "k-alice") as c:
                response = c.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 429, response.text
            assert "max-requests" in error_of(response)["message"]
        finally:
            stream.close()  # cancels it
    deadline = time.monotonic() + 30
    with http(secure, "k-alice") as c:
        while (response := c.post("/v1/chat/completions", json=CHAT)).status_code == 429:
            assert time.monotonic() < deadline, "the cancelled request still counts after 30 s"
            time.sleep(0.1)
    assert response.status_code == 200


def test_another_tenants_conversation_is_404_as_if_it_did_not_exist(secure) -> None:
    with http(secure, "k-alice") as alice, http(secure, "k-bob") as bob:
        assert alice.post("/v1/chat/completions", json={**CHAT, "conversation_id": "c-http"}).status_code == 200
        theirs, missing = bob.delete("/v1/conversations/c-http"), bob.delete("/v1/conversations/c-never")
        assert theirs.status_code == missing.status_code == 404
        said = error_of(theirs)["message"].replace("c-http", "X")
        assert said == error_of(missing)["message"].replace("c-never", "X")
        assert alice.delete("/v1/conversations/c-http").status_code == 200


def test_metrics_need_an_admin_key(secure) -> None:
    with http(secure) as anonymous, http(secure, "k-bob") as bob, http(secure, "k-root") as root:
        assert anonymous.get("/metrics").status_code == 401
        denied = bob.get("/metrics")
        assert denied.status_code == 403 and "admin" in error_of(denied)["message"]
        allowed = root.get("/metrics")
        assert allowed.status_code == 200
        assert "fastswitch_http_requests_total" in allowed.text and "fastswitch_requests_running" in allowed.text
