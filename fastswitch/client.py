"""The FastSwitch client SDK: a sync `Client` and an asyncio `AsyncClient`.

    from fastswitch import Client
    with Client("localhost:50051") as client:
        for chunk in client.generate("The capital of France is", max_tokens=16):
            print(chunk.text, end="", flush=True)

Structured output: `json_schema=` (a dict or JSON text), `json_object=True`, `regex=`, `choice=` (a list
of strings) or `grammar=` (EBNF) constrains the completion, token by token, on the server.

Errors are typed (`InvalidRequest`, `NotFound`, `ResourceExhausted`, `ServiceUnavailable`, ...), each
carrying the server's message. Every call carries a deadline; one channel per client is reused.

Security: `Client(addr, api_key=KEY, tls_ca=PATH)` sends `authorization: Bearer KEY` (default: the
`FASTSWITCH_API_KEY` environment variable) and verifies the server's certificate against the CA file
(default: `FASTSWITCH_TLS_CA`; none: plain text). Calls wait for the connection (up to
`connect_timeout`) and gRPC retries UNAVAILABLE with backoff before any token has arrived. A stream
that ends without a finish reason raises `IncompleteStream`: a cut stream is never a completion.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from fastswitch.v1 import api_pb2, api_pb2_grpc, common_pb2

DEFAULT_ADDR = "localhost:50051"
DEFAULT_TIMEOUT_S = 600.0
UNARY_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
API_KEY_ENV = "FASTSWITCH_API_KEY"
TLS_CA_ENV = "FASTSWITCH_TLS_CA"

# gRPC's own retry policy: UNAVAILABLE (server restarting, draining, not attached yet) is retried with
# exponential backoff, only before the server has answered anything (so no token is ever repeated).
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "fastswitch.v1.FastSwitch"}],
                "waitForReady": True,
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "3s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
CHANNEL_OPTIONS = [
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.keepalive_time_ms", 60_000),  # the server accepts pings every 30 s or more
    ("grpc.keepalive_timeout_ms", 20_000),
]


class FastSwitchError(Exception):
    """Base class of every SDK error; `code` is the gRPC status code."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class InvalidRequest(FastSwitchError):
    """The request was malformed (empty prompt, bad sampling parameters, ...)."""


class NotFound(FastSwitchError):
    """No such request or conversation."""


class ResourceExhausted(FastSwitchError):
    """The request can never fit the server's KV pool, or the server is out of capacity;
    `retry_after_s` is the server's hint when retrying later may succeed."""

    retry_after_s: float | None = None


class PermissionDenied(FastSwitchError):
    """The tenant may not use this resource."""


class ServiceUnavailable(FastSwitchError):
    """The server (or a service behind it) is not reachable or not ready; retrying may help."""


class DeadlineExceeded(FastSwitchError):
    """The call did not finish within its deadline."""


class Unauthenticated(FastSwitchError):
    """No API key, or one the server does not know (`api_key=`, `--api-key`, FASTSWITCH_API_KEY)."""


class ServerError(FastSwitchError):
    """The server failed the request (INTERNAL): e.g. the model step failed twice the same way."""


class IncompleteStream(FastSwitchError):
    """The stream ended without a finish reason: the completion is cut short, not done."""


class RequestCancelled(FastSwitchError):
    """The server ended the request as cancelled (by a Cancel call, or the server stopping)."""


_ERRORS: dict[grpc.StatusCode, type[FastSwitchError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.ALREADY_EXISTS: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailable,
    grpc.StatusCode.FAILED_PRECONDITION: ServiceUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INTERNAL: ServerError,
    grpc.StatusCode.UNKNOWN: ServerError,
    grpc.StatusCode.CANCELLED: RequestCancelled,
}


def _typed(err: grpc.RpcError) -> FastSwitchError:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _ERRORS.get(code, FastSwitchError) if code is not None else FastSwitchError
    typed = cls(f"{details} [{code.name if code else 'UNKNOWN'}]", code)
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    retry_after = dict(trailers or ()).get("retry-after")
    if isinstance(typed, ResourceExhausted) and retry_after:
        typed.retry_after_s = float(retry_after)
    return typed


def _incomplete(request_id: str) -> IncompleteStream:
    return IncompleteStream(
        f"the stream of request {request_id or '(unnamed)'} ended without a finish reason: the output is "
        "incomplete (the server or the connection went away); retry the request"
    )


def _credentials(tls_ca: str | None) -> grpc.ChannelCredentials | None:
    path = os.environ.get(TLS_CA_ENV, "") if tls_ca is None else tls_ca
    if not path:
        return None
    try:
        return grpc.ssl_channel_credentials(root_certificates=Path(path).read_bytes())
    except OSError as err:
        raise InvalidRequest(f"cannot read the TLS CA file {path}: {err.strerror or err}") from None


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
    return (("authorization", f"Bearer {key}"),) if key else ()


# The standard health check, called raw (an empty HealthCheckRequest is b""): it needs no key and no
# extra package, and with wait_for_ready it tells "not reachable within connect_timeout" apart from a
# slow request.
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def _identity(data: bytes) -> bytes:
    return data


def _probe_failed(err: grpc.RpcError) -> bool:
    return err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)  # type: ignore[attr-defined]


def _unreachable(addr: str, timeout: float) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"cannot reach a FastSwitch server at {addr} within {timeout:g}s: is it running (`fastswitch up`), "
        "and do --tls-ca / the server's TLS setting agree? [UNAVAILABLE]",
        grpc.StatusCode.UNAVAILABLE,
    )


_FINISH = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_EOS: "eos",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_ERROR: "error",
}


@dataclass(slots=True)
class TokenChunk:
    """New text (and the token ids behind it) as it arrives; `finish_reason` is set on the last one."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    produced_unix_ns: int
    prompt_tokens: int = 0
    reused_prefix_tokens: int = 0
    # On the last chunk: seconds the request spent queued, blocked (waiting for KV blocks), in swap_in,
    # prefill, preempted and decode.
    phases: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, msg: api_pb2.GenerateResponse) -> TokenChunk:
        return cls(
            request_id=msg.request_id,
            text=msg.text,
            token_ids=list(msg.token_ids),
            finish_reason=_FINISH.get(msg.finish_reason),
            produced_unix_ns=msg.produced_unix_ns,
            prompt_tokens=msg.prompt_tokens,
            reused_prefix_tokens=msg.reused_prefix_tokens,
            phases=_phases(msg) if msg.HasField("phases") else {},
        )


def _phases(msg: api_pb2.GenerateResponse) -> dict[str, float]:
    return {f.name: getattr(msg.phases, f.name) for f in api_pb2.RequestPhases.DESCRIPTOR.fields}


@dataclass(slots=True)
class ModelInfo:
    """The served model and its limits."""

    model: str
    max_model_len: int
    kv_capacity_tokens: int
    policy: str

    @classmethod
    def from_proto(cls, msg: api_pb2.DescribeModelResponse) -> ModelInfo:
        return cls(msg.model, msg.max_model_len, msg.kv_capacity_tokens, msg.policy)


@dataclass(slots=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    reused_prefix_tokens: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (see TokenChunk)

    def add(self, chunk: TokenChunk) -> None:
        self.request_id = chunk.request_id
        self.text += chunk.text
        self.token_ids.extend(chunk.token_ids)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.prompt_tokens = chunk.prompt_tokens or self.prompt_tokens
        self.reused_prefix_tokens = chunk.reused_prefix_tokens or self.reused_prefix_tokens
        self.phases = chunk.phases or self.phases


def build_request(
    prompt: str,
    *,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: list[str] | tuple[str, ...] = (),
    chat: bool = False,
    ignore_eos: bool = False,
    tenant: str = "",
    priority: int = 0,
    conversation_id: str = "",
    system_prompt: str = "",
    request_id: str = "",
    json_schema: dict[str, Any] | str | None = None,
    json_object: bool = False,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    grammar: str | None = None,
    messages: list[dict[str, str]] | None = None,
) -> api_pb2.GenerateRequest:
    """The Generate request; `messages` (a whole chat, OpenAI style) replaces prompt and system_prompt."""
    sampling = common_pb2.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    if seed is not None:
        sampling.seed = seed
    request = api_pb2.GenerateRequest(
        request_id=request_id,
        prompt=prompt,
        chat=chat,
        sampling=sampling,
        max_tokens=max_tokens,
        stop=list(stop),
        ignore_eos=ignore_eos,
        tenant=tenant,
        priority=priority,
        conversation_id=conversation_id,
        system_prompt=system_prompt,
        messages=[api_pb2.ChatMessage(role=m["role"], content=m.get("content", "")) for m in messages or ()],
    )
    _set_structured_output(request, json_schema, json_object, regex, choice, grammar)
    return request


def _set_structured_output(
    request: api_pb2.GenerateRequest,
    json_schema: dict[str, Any] | str | None,
    json_object: bool,
    regex: str | None,
    choice: Sequence[str] | None,
    grammar: str | None,
) -> None:
    """At most one constraint (the `structured_output` oneof of GenerateRequest)."""
    given = {
        name: value
        for name, value in (
            ("json_schema", json_schema),
            ("json_object", json_object or None),
            ("regex", regex),
            ("choice", choice),
            ("grammar", grammar),
        )
        if value is not None
    }
    if len(given) > 1:
        raise InvalidRequest(
            f"pass at most one of json_schema, json_object, regex, choice, grammar; got {sorted(given)}"
        )
    if json_schema is not None:
        request.json_schema = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
    elif json_object:
        request.json_object = True
    elif regex is not None:
        request.regex = regex
    elif choice is not None:
        if isinstance(choice, str):
            raise InvalidRequest("choice is a list of strings, not one string")
        request.choice.options.extend(choice)
        if not request.choice.options:  # an empty list still selects `choice`: the server says what is wrong
            request.choice.SetInParent()
    elif grammar is not None:
        request.grammar = grammar


def _stats_dict(resp: api_pb2.GetStatsResponse) -> dict[str, Any]:
    out: dict[str, Any] = dict(resp.counters)
    out["tenants"] = {
        name: {"service": t.service, "prompt_tokens": t.prompt_tokens, "generated_tokens": t.generated_tokens}
        for name, t in resp.tenants.items()
    }
    # One dict per executor node, every field (zeros included).
    out["executors"] = [{f.name: getattr(node, f.name) for f in node.DESCRIPTOR.fields} for node in resp.executors]
    return out


class Conversation:
    """Turn after turn of one chat conversation (the chat template applied over all of it).

    The server keeps the history and the earlier turns' KV, so each `send()` prefills only the new
    turn. `end()` (or leaving the `with` block) frees what the server kept.
    """

    def __init__(
        self, client: Client, conversation_id: str = "", tenant: str = "", system_prompt: str = "", **defaults: Any
    ) -> None:
        import uuid

        self.client = client
        self.conversation_id = conversation_id or f"conv-{uuid.uuid4().hex[:12]}"
        self.tenant = tenant
        self.defaults = defaults
        self._system_prompt = system_prompt
        self.turns: list[Completion] = []

    def stream(self, prompt: str, **kwargs: Any) -> Iterator[TokenChunk]:
        completion = Completion(request_id="", text="")
        options = {**self.defaults, **kwargs}
        for chunk in self.client.generate(
            prompt,
            chat=True,
            conversation_id=self.conversation_id,
            tenant=self.tenant,
            system_prompt=self._system_prompt,
            **options,
        ):
            completion.add(chunk)
            yield chunk
        self._system_prompt = ""  # sent with the first turn only
        self.turns.append(completion)

    def send(self, prompt: str, **kwargs: Any) -> Completion:
        for _ in self.stream(prompt, **kwargs):
            pass
        return self.turns[-1]

    def end(self) -> None:
        try:
            self.client.end_conversation(self.conversation_id, tenant=self.tenant)
        except NotFound:
            pass  # nothing kept (e.g. no turn finished)

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


class _Connection:
    """What both clients know of their connection: whether the server has answered on it. An
    UNAVAILABLE error makes the next call probe it again (`_connect`)."""

    _connected: bool = False

    def _open(
        self, grpc_api: Any, addr: str, timeout: float, api_key: str | None, tls_ca: str | None, connect_timeout: float
    ) -> None:
        """Open the channel with `grpc_api` (`grpc` or `grpc.aio`), TLS when a CA is given."""
        self.addr = addr
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._metadata = _metadata(api_key)
        creds = _credentials(tls_ca)
        if creds is None:
            self._channel = grpc_api.insecure_channel(addr, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc_api.secure_channel(addr, creds, options=CHANNEL_OPTIONS)
        self._stub = api_pb2_grpc.FastSwitchStub(self._channel)
        self._health = self._channel.unary_unary(_HEALTH_CHECK, _identity, _identity)
        self._connected = False

    def _error(self, err: grpc.RpcError) -> FastSwitchError:
        typed = _typed(err)
        if isinstance(typed, ServiceUnavailable):
            self._connected = False
        return typed


class Client(_Connection):
    """Blocking client; `generate()` yields TokenChunks as they arrive."""

    def __init__(
        self,
        addr: str = DEFAULT_ADDR,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        api_key: str | None = None,
        tls_ca: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self._open(grpc, addr, timeout, api_key, tls_ca, connect_timeout)

    def _connect(self) -> None:
        """Wait (up to connect_timeout) until the server answers, once per connection."""
        if self._connected:
            return
        try:
            self._health(b"", timeout=self.connect_timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            if _probe_failed(err):
                raise _unreachable(self.addr, self.connect_timeout) from None
        self._connected = True

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str, timeout: float | None = None, **kwargs: Any) -> Iterator[TokenChunk]:
        """TokenChunks until the one with a finish reason; raises a typed error otherwise."""
        deadline = timeout or self.timeout
        start = time.monotonic()
        self._connect()
        call = self._stub.Generate(
            build_request(prompt, **kwargs),
            timeout=max(0.001, deadline - (time.monotonic() - start)),
            metadata=self._metadata,
            wait_for_ready=True,
        )
        request_id = kwargs.get("request_id", "")
        try:
            for msg in call:
                chunk = TokenChunk.from_proto(msg)
                request_id = chunk.request_id
                yield chunk
                if chunk.finish_reason is not None:
                    return
        except grpc.RpcError as err:
            raise self._error(err) from None
        finally:
            call.cancel()  # no-op when finished; frees the request's blocks if the caller stops early
        raise _incomplete(request_id)

    def complete(self, prompt: str, timeout: float | None = None, **kwargs: Any) -> Completion:
        completion = Completion(request_id="", text="")
        for chunk in self.generate(prompt, timeout=timeout, **kwargs):
            completion.add(chunk)
        return completion

    def conversation(
        self, conversation_id: str = "", tenant: str = "", system_prompt: str = "", **defaults: Any
    ) -> Conversation:
        """A multi-turn chat; `defaults` (max_tokens, temperature, ...) apply to every turn."""
        return Conversation(self, conversation_id, tenant, system_prompt, **defaults)

    def cancel(self, request_id: str) -> None:
        self._unary(self._stub.Cancel, api_pb2.CancelRequest(request_id=request_id))

    def set_priority(self, request_id: str, priority: int) -> None:
        self._unary(self._stub.SetPriority, api_pb2.SetPriorityRequest(request_id=request_id, priority=priority))

    def end_conversation(self, conversation_id: str, tenant: str = "") -> None:
        self._unary(
            self._stub.EndConversation,
            api_pb2.EndConversationRequest(tenant=tenant, conversation_id=conversation_id),
        )

    def stats(self) -> dict[str, Any]:
        """Counters and gauges, per-tenant service under "tenants", one dict per node under "executors"."""
        return _stats_dict(self._unary(self._stub.GetStats, api_pb2.GetStatsRequest()))

    def describe_model(self) -> ModelInfo:
        return ModelInfo.from_proto(self._unary(self._stub.DescribeModel, api_pb2.DescribeModelRequest()))

    def metrics(self) -> str:
        """The scheduler's Prometheus metrics (text exposition format)."""
        return self._unary(self._stub.GetMetrics, api_pb2.GetMetricsRequest()).text

    def _unary(self, method: Any, request: Any) -> Any:
        self._connect()
        try:
            return method(request, timeout=UNARY_TIMEOUT_S, metadata=self._metadata, wait_for_ready=True)
        except grpc.RpcError as err:
            raise self._error(err) from None


class AsyncClient(_Connection):
    """asyncio client; `generate()` is an async iterator of TokenChunks."""

    def __init__(
        self,
        addr: str = DEFAULT_ADDR,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        api_key: str | None = None,
        tls_ca: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self._open(grpc.aio, addr, timeout, api_key, tls_ca, connect_timeout)

    async def _connect(self) -> None:
        """Wait (up to connect_timeout) until the server answers, once per connection."""
        if self._connected:
            return
        try:
            await self._health(b"", timeout=self.connect_timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            if _probe_failed(err):
                raise _unreachable(self.addr, self.connect_timeout) from None
        self._connected = True

    def with_api_key(self, api_key: str) -> AsyncClient:
        """A client on this one's connection that acts with another API key (a front acting for its
        callers). Close only the original: they share the channel."""
        view = copy.copy(self)
        view._metadata = _metadata(api_key)
        return view

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: str, timeout: float | None = None, **kwargs: Any) -> AsyncIterator[TokenChunk]:
        """TokenChunks until the one with a finish reason; raises a typed error otherwise."""
        deadline = timeout or self.timeout
        start = time.monotonic()
        await self._connect()
        call = self._stub.Generate(
            build_request(prompt, **kwargs),
            timeout=max(0.001, deadline - (time.monotonic() - start)),
            metadata=self._metadata,
            wait_for_ready=True,
        )
        request_id = kwargs.get("request_id", "")
        try:
            async for msg in call:
                chunk = TokenChunk.from_proto(msg)
                request_id = chunk.request_id
                yield chunk
                if chunk.finish_reason is not None:
                    return
        except grpc.RpcError as err:
            raise self._error(err) from None
        finally:
            call.cancel()
        raise _incomplete(request_id)

    async def complete(self, prompt: str, timeout: float | None = None, **kwargs: Any) -> Completion:
        completion = Completion(request_id="", text="")
        async for chunk in self.generate(prompt, timeout=timeout, **kwargs):
            completion.add(chunk)
        return completion

    async def cancel(self, request_id: str) -> None:
        await self._unary(self._stub.Cancel, api_pb2.CancelRequest(request_id=request_id))

    async def set_priority(self, request_id: str, priority: int) -> None:
        await self._unary(self._stub.SetPriority, api_pb2.SetPriorityRequest(request_id=request_id, priority=priority))

    async def end_conversation(self, conversation_id: str, tenant: str = "") -> None:
        await self._unary(
            self._stub.EndConversation,
            api_pb2.EndConversationRequest(tenant=tenant, conversation_id=conversation_id),
        )

    async def stats(self) -> dict[str, Any]:
        return _stats_dict(await self._unary(self._stub.GetStats, api_pb2.GetStatsRequest()))

    async def describe_model(self) -> ModelInfo:
        return ModelInfo.from_proto(await self._unary(self._stub.DescribeModel, api_pb2.DescribeModelRequest()))

    async def metrics(self) -> str:
        """The scheduler's Prometheus metrics (text exposition format)."""
        return (await self._unary(self._stub.GetMetrics, api_pb2.GetMetricsRequest())).text

    async def serving(self) -> bool:
        """Whether the scheduler's health service says SERVING (False when it is unreachable)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            resp = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=UNARY_TIMEOUT_S
            )
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def _unary(self, method: Any, request: Any) -> Any:
        await self._connect()
        try:
            return await method(request, timeout=UNARY_TIMEOUT_S, metadata=self._metadata, wait_for_ready=True)
        except grpc.RpcError as err:
            raise self._error(err) from None


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
