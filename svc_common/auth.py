"""API keys -> tenants, and the rules of who may do what: one plain module every front uses.

A key file has one key a line (blank lines and `#` comments are skipped):

    KEY TENANT [max-priority=P] [max-requests=N] [admin]

A caller presents `authorization: Bearer KEY` (gRPC metadata or an HTTP header); `KeyRing.authenticate`
turns that into a `Principal`. The rules below take a `Principal | None`: None is an open stack (no key
file), where the request's own tenant is trusted and nothing is capped. No gRPC or HTTP here: the gRPC
interceptor (svc_common/server.py) and the HTTP front both call these functions, and raise the same
errors (svc_common/errors.py), which each front maps onto its own status codes.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from svc_common.errors import NotFoundError, PermissionDeniedError, ResourceExhaustedError, Unauthenticated

DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a key says the caller is, and what it may do."""

    tenant: str
    max_priority: int | None = None  # None: any priority
    max_requests: int | None = None  # live requests at once; None: unbounded
    admin: bool = False  # sees every tenant's figures, may act on every tenant's requests


# The principal of the call being served (set by the front before the handler runs; None: open stack).
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "fastswitch_principal", default=None
)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """The keys of one key file; lookups compare digests, never the keys themselves."""

    def __init__(self, principals: dict[str, Principal]) -> None:
        self._by_digest = {_digest(key): p for key, p in principals.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ValueError(f"cannot read the API key file {path}: {err.strerror or err}") from None
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, source: str = "<api keys>") -> KeyRing:
        """Parse a key file; ValueError names the file and line of the first mistake."""
        principals: dict[str, Principal] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{source}:{number}"
            words = line.split()
            if len(words) < 2:
                raise ValueError(f"{where}: expected `KEY TENANT [max-priority=P] [max-requests=N] [admin]`")
            key, tenant, options = words[0], words[1], words[2:]
            if key in principals:
                raise ValueError(f"{where}: this key is listed twice; each key names one tenant")
            principals[key] = Principal(tenant, **_options(options, where))
        if not principals:
            raise ValueError(f"{source}: no keys (lines `KEY TENANT [max-priority=P] [max-requests=N] [admin]`)")
        return cls(principals)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `authorization` value (`Bearer KEY`); Unauthenticated otherwise."""
        if not authorization:
            raise Unauthenticated("no API key: send `authorization: Bearer KEY` (CLI --api-key or FASTSWITCH_API_KEY)")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed authorization: expected `Bearer KEY`")
        digest = _digest(key.strip())
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise Unauthenticated("unknown API key")


def _options(options: list[str], where: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for option in options:
        name, sep, value = option.partition("=")
        if name == "admin" and not sep:
            out["admin"] = True
            continue
        field = {"max-priority": "max_priority", "max-requests": "max_requests"}.get(name)
        if field is None or not sep:
            raise ValueError(f"{where}: unknown option {option!r} (max-priority=P, max-requests=N, admin)")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{where}: {name} must be an integer, got {value!r}") from None
        if field == "max_requests" and number <= 0:
            raise ValueError(f"{where}: max-requests must be > 0, got {number}")
        out[field] = number
    return out


# -- the rules --------------------------------------------------------------------------------------


def tenant_for(principal: Principal | None, requested: str) -> str:
    """The tenant a request runs as: the key's, whatever the request says (an admin may name one)."""
    if principal is None or (principal.admin and requested):
        return requested or DEFAULT_TENANT
    return principal.tenant


def check_priority(principal: Principal | None, priority: int) -> None:
    if principal is not None and principal.max_priority is not None and priority > principal.max_priority:
        raise PermissionDeniedError(
            f"priority {priority} is above this key's max-priority {principal.max_priority}: ask for at most "
            f"{principal.max_priority}"
        )


def check_live_requests(principal: Principal | None, live: int) -> None:
    """`live`: the tenant's requests that are live now (before this one)."""
    if principal is not None and principal.max_requests is not None and live >= principal.max_requests:
        raise ResourceExhaustedError(
            f"tenant {principal.tenant!r} already has {live} live requests, this key's max-requests; "
            "retry when one finishes",
            retry_after_s=1.0,
        )


def may_act_on(principal: Principal | None, owner_tenant: str) -> bool:
    """Whether the caller may cancel, re-prioritise or end what `owner_tenant` owns."""
    return principal is None or principal.admin or principal.tenant == owner_tenant


def check_owner(principal: Principal | None, owner_tenant: str | None, what: str) -> None:
    """NOT_FOUND for another tenant's request or conversation, worded as for one that does not exist."""
    if owner_tenant is None or not may_act_on(principal, owner_tenant):
        raise NotFoundError(what)


def visible_tenants(principal: Principal | None, tenants: Iterable[str]) -> list[str]:
    """The tenants whose figures the caller may see: all for an admin or an open stack, else its own."""
    if principal is None or principal.admin:
        return list(tenants)
    return [t for t in tenants if t == principal.tenant]
