"""The API-key file and the tenant rules (svc_common/auth.py), without a server."""

from __future__ import annotations

import pytest

from svc_common import auth
from svc_common.auth import KeyRing, Principal
from svc_common.errors import NotFoundError, PermissionDeniedError, ResourceExhaustedError, Unauthenticated

KEYS = """
# key          tenant  options
k-alice        alice   max-priority=2 max-requests=3
k-bob          bob
k-root         ops     admin
"""


def test_a_key_file_maps_each_key_to_its_tenant_and_limits() -> None:
    ring = KeyRing.parse(KEYS)
    assert ring.authenticate("Bearer k-alice") == Principal("alice", max_priority=2, max_requests=3)
    assert ring.authenticate("bearer k-bob") == Principal("bob")
    assert ring.authenticate("Bearer k-root").admin


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic k-bob", "Bearer k-nobody", "k-bob"])
def test_a_missing_malformed_or_unknown_key_is_unauthenticated(header: str | None) -> None:
    with pytest.raises(Unauthenticated):
        KeyRing.parse(KEYS).authenticate(header)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("lonely\n", ":1: expected"),
        ("a t\na u\n", ":2: this key is listed twice"),
        ("a t max-priority=high\n", "max-priority must be an integer"),
        ("a t max-requests=0\n", "max-requests must be > 0"),
        ("a t superuser\n", "unknown option 'superuser'"),
        ("# only comments\n", "no keys"),
    ],
)
def test_a_bad_key_file_names_the_line_and_the_mistake(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        KeyRing.parse(text, source="keys.txt")


def test_an_unreadable_key_file_says_so(tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot read the API key file"):
        KeyRing.load(tmp_path / "missing")


def test_the_tenant_is_the_keys_whatever_the_request_says() -> None:
    alice, admin = Principal("alice"), Principal("ops", admin=True)
    assert auth.tenant_for(alice, "bob") == "alice"
    assert auth.tenant_for(admin, "bob") == "bob"  # an admin may act for a tenant
    assert auth.tenant_for(admin, "") == "ops"
    assert auth.tenant_for(None, "") == "default"  # open stack: the request's own tenant
    assert auth.tenant_for(None, "bob") == "bob"


def test_a_priority_above_the_keys_cap_is_denied() -> None:
    capped = Principal("alice", max_priority=2)
    auth.check_priority(capped, 2)
    with pytest.raises(PermissionDeniedError, match="max-priority 2"):
        auth.check_priority(capped, 3)
    auth.check_priority(Principal("bob"), 10**6)
    auth.check_priority(None, 10**6)


def test_a_tenant_at_its_max_requests_is_refused_with_a_retry_hint() -> None:
    capped = Principal("alice", max_requests=3)
    auth.check_live_requests(capped, 2)
    with pytest.raises(ResourceExhaustedError) as err:
        auth.check_live_requests(capped, 3)
    assert err.value.retry_after_s == 1.0


def test_another_tenants_request_looks_like_no_request() -> None:
    alice = Principal("alice")
    auth.check_owner(alice, "alice", "no such request")
    auth.check_owner(Principal("ops", admin=True), "bob", "no such request")
    auth.check_owner(None, "bob", "no such request")
    for owner in ("bob", None):
        with pytest.raises(NotFoundError, match="no such request"):
            auth.check_owner(alice, owner, "no such request")


def test_stats_show_a_tenant_only_itself_and_an_admin_everyone() -> None:
    tenants = ["alice", "bob", "default"]
    assert auth.visible_tenants(Principal("alice"), tenants) == ["alice"]
    assert auth.visible_tenants(Principal("ops", admin=True), tenants) == tenants
    assert auth.visible_tenants(None, tenants) == tenants
