"""FastSwitch: fairness-aware LLM serving with cheap KV-cache context switches.

This package is the client: the SDK (everything in `__all__`, documented in the README), the CLI
(`fastswitch.cli`) and the generated gRPC stubs (`fastswitch.v1`). It needs grpcio and protobuf only;
the services come with `pip install 'fastswitch[server]'`.
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
    ModelInfo,
    NotFound,
    PermissionDenied,
    RequestCancelled,
    ResourceExhausted,
    ServerError,
    ServiceUnavailable,
    TokenChunk,
    Unauthenticated,
)

# The one place the version is written: pyproject.toml reads it (setuptools dynamic version).
__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "Completion",
    "Conversation",
    "DeadlineExceeded",
    "FastSwitchError",
    "IncompleteStream",
    "InvalidRequest",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "RequestCancelled",
    "ResourceExhausted",
    "ServerError",
    "ServiceUnavailable",
    "TokenChunk",
    "Unauthenticated",
    "__version__",
]
