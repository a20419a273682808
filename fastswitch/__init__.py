"""FastSwitch: fairness-aware LLM serving with cheap KV-cache context switches.

The client SDK lives here (`fastswitch.client`), with the CLI (`fastswitch.cli`), the generated gRPC
stubs (`fastswitch.v1`) and the small pieces every service shares (`svc_common`).
"""

from fastswitch.client import (
    AsyncClient,
    Client,
    Completion,
    Conversation,
    DeadlineExceeded,
    FastSwitchError,
    IncompleteStream,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RequestCancelled,
    ResourceExhausted,
    ServerError,
    ServiceUnavailable,
    TokenChunk,
    Unauthenticated,
)

__all__ = [
    "AsyncClient",
    "Client",
    "Completion",
    "Conversation",
    "DeadlineExceeded",
    "FastSwitchError",
    "IncompleteStream",
    "InvalidRequest",
    "NotFound",
    "PermissionDenied",
    "RequestCancelled",
    "ResourceExhausted",
    "ServerError",
    "ServiceUnavailable",
    "TokenChunk",
    "Unauthenticated",
]
