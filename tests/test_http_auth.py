"""The HTTP front's API keys and TLS: each rule of svc_common/auth.py over HTTP, on the real model.

One stack for the module, as `fastswitch up --http-port P --api-keys FILE --tls-cert C --tls-key K`
starts it: HTTPS on the HTTP port, TLS and keys on the scheduler, the front passing each caller's key on.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

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
        yield {"stack": stack, "ca": cert, "url": stack.http_url, "tls": ssl.create_default_context(cafile=cert)}


def call(secure: dict[str, Any], method: str, path: str, key: str | None = None, body: Any = None) -> tuple[int, str]:
    """(status, body text) of one HTTPS request, with `authorization: Bearer key` when given."""
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(secure["url"] + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120, context=secure["tls"]) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def chat(secure: dict[str, Any], key: str | None, **extra: Any) -> tuple[int, str]:
    return call(secure, "POST", "/v1/chat/completions", key, {**CHAT, **extra})


def grpc_client(secure: dict[str, Any], key: str) -> Client:
    return Client(secure["stack"].addr, api_key=key, tls_ca=secure["ca"], timeout=120)


def error_of(text: str) -> dict[str, Any]:
    return json.loads(text)["error"]


def test_the_http_port_serves_https_to_a_client_that_trusts_the_certificate(secure) -> None:
    assert secure["url"].startswith("https://")
    api = openai.OpenAI(
        base_url=secure["url"] + "/v1",
        api_key="k-bob",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=secure["tls"]),
    )
    reply = api.chat.completions.create(model="", messages=CHAT["messages"], max_tokens=2, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):  # plain HTTP to the TLS port
        urllib.request.urlopen(secure["url"].replace("https://", "http://") + "/health", timeout=5)


def test_no_key_or_an_unknown_key_is_401_and_health_stays_open(secure) -> None:
    for key, says in ((None, "no API key"), ("k-nobody", "unknown API key")):
        for status, text in (chat(secure, key), call(secure, "GET", "/v1/models", key)):
            assert status == 401, text
            assert says in error_of(text)["message"] and error_of(text)["type"] == "authentication_error"
    assert call(secure, "GET", "/health")[0] == 200


def test_the_tenant_is_the_keys_not_the_bodys_user(secure) -> None:
    with grpc_client(secure, "k-root") as root:
        before = root.stats()["tenants"]
        status, text = chat(secure, "k-bob", user="mallory")
        assert status == 200, text
        after = root.stats()["tenants"]
    assert "mallory" not in after
    generated = after["bob"]["generated_tokens"] - before.get("bob", {}).get("generated_tokens", 0)
    assert generated == 2


def test_a_priority_above_the_keys_cap_is_403_and_within_it_is_served(secure) -> None:
    # The body's priority is vLLM's (lower is served earlier): -5 asks for FastSwitch priority 5 > 2.
    status, text = chat(secure, "k-alice", priority=-5)
    assert status == 403 and "max-priority 2" in error_of(text)["message"], text
    assert chat(secure, "k-alice", priority=-2)[0] == 200


def test_the_keys_max_requests_is_enforced_by_the_scheduler_as_429(secure) -> None:
    with grpc_client(secure, "k-alice") as alice:
        stream = alice.generate("Count slowly:", max_tokens=400, ignore_eos=True)
        next(stream)  # alice's one live request
        try:
            status, text = chat(secure, "k-alice")
            assert status == 429 and "max-requests" in error_of(text)["message"], text
        finally:
            stream.close()  # cancels it
    deadline = time.monotonic() + 30
    while (status := chat(secure, "k-alice")[0]) == 429:
        assert time.monotonic() < deadline, "the cancelled request still counts after 30 s"
        time.sleep(0.1)
    assert status == 200


def test_another_tenants_conversation_is_404_as_if_it_did_not_exist(secure) -> None:
    assert chat(secure, "k-alice", conversation_id="c-http")[0] == 200
    theirs = call(secure, "DELETE", "/v1/conversations/c-http", "k-bob")
    missing = call(secure, "DELETE", "/v1/conversations/c-never", "k-bob")
    assert theirs[0] == missing[0] == 404
    said = error_of(theirs[1])["message"].replace("c-http", "X")
    assert said == error_of(missing[1])["message"].replace("c-never", "X")
    assert call(secure, "DELETE", "/v1/conversations/c-http", "k-alice")[0] == 200


def test_metrics_need_an_admin_key(secure) -> None:
    assert call(secure, "GET", "/metrics")[0] == 401
    status, text = call(secure, "GET", "/metrics", "k-bob")
    assert status == 403 and "admin" in error_of(text)["message"]
    status, text = call(secure, "GET", "/metrics", "k-root")
    assert status == 200
    assert "fastswitch_http_requests_total" in text and "fastswitch_requests_running" in text
