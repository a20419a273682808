"""The OpenAI-compatible HTTP API as a thin ASGI adapter over the scheduler's gRPC API.

Every generation request goes through `Front.prepare()`: who is asking (`identify`), which model,
which features (`response_format`), then the SDK keywords. Then `Front.respond()` runs it on the
scheduler through one reused `AsyncClient` channel, with a deadline, and answers with one JSON body or
server-sent events.

With a key file (`--api-keys`, the scheduler's format and rules: svc_common/auth.py), `identify` turns
`authorization: Bearer KEY` into the caller's tenant (401 without a known key), a priority above the
key's cap is 403, and /metrics needs an admin key; the key is passed on to the scheduler, which
enforces the same rules (a key's max-requests: 429; another tenant's conversation: 404).

A client that goes away, before or during the stream, cancels the gRPC call, and the scheduler frees
the request's blocks.

Errors are OpenAI's error JSON, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status
of the standard gRPC mapping (INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.types import Message, Receive, Scope, Send

from fastswitch.client import (
    AsyncClient,
    Completion,
    DeadlineExceeded,
    FastSwitchError,
    InvalidRequest,
    ModelInfo,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceUnavailable,
    TokenChunk,
    Unauthenticated,
)
from openai_svc import protocol
from openai_svc.config import HttpConfig
from openai_svc.protocol import ChatCompletionRequest, CompletionRequest, UnsupportedFeature
from svc_common import auth
from svc_common.errors import PermissionDeniedError, ServingError

log = structlog.get_logger(__name__)

T = TypeVar("T")

# The standard gRPC -> HTTP mapping of the SDK's error types.
HTTP_STATUS: dict[type[FastSwitchError], int] = {
    InvalidRequest: 400,
    Unauthenticated: 401,
    NotFound: 404,
    PermissionDenied: 403,
    ResourceExhausted: 429,
    ServiceUnavailable: 503,
    DeadlineExceeded: 504,
}
GRPC_TO_HTTP = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
}
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/conversations", "/health", "/metrics")


CUT_STREAM = "the scheduler's stream ended without a finish reason; the answer may be incomplete: retry"


class ApiError(Exception):
    """An error to answer with OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s  # the scheduler's hint, sent as Retry-After

    @classmethod
    def from_sdk(cls, err: FastSwitchError) -> ApiError:
        status = next((s for t, s in HTTP_STATUS.items() if isinstance(err, t)), 500)
        retry_after = err.retry_after_s if isinstance(err, ResourceExhausted) else None
        return cls(status, str(err), code=err.code.name.lower() if err.code is not None else None,
                   retry_after_s=retry_after)  # fmt: skip

    @classmethod
    def from_rule(cls, err: ServingError) -> ApiError:
        """An auth rule's refusal (svc_common/auth.py), with the HTTP status of its gRPC code."""
        status = GRPC_TO_HTTP.get(err.code.name, 500)
        return cls(status, str(err), code=err.code.name.lower())

    def response(self) -> JSONResponse:
        headers = {"retry-after": str(max(1, math.ceil(self.retry_after_s)))} if self.retry_after_s else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The HTTP client disconnected."""


@dataclass(slots=True)
class Caller:
    """Who is asking: the tenant served and accounted, and the scheduler client that acts for them."""

    tenant: str
    client: AsyncClient  # with the caller's API key, when keys are configured
    principal: auth.Principal | None = None  # None: no key file (an open front)


@dataclass(slots=True)
class Prepared:
    """A generation request, checked and translated: what `respond()` runs."""

    client: AsyncClient
    kind: str  # "chat" | "text"
    response_id: str
    model: str
    prompt: str
    generate: dict[str, Any]  # the SDK's generate() keywords
    stream: bool
    include_usage: bool
    defaulted_max_tokens: bool


class HttpMetrics:
    """The front's own metrics; `/metrics` serves them after the scheduler's."""

    def __init__(self) -> None:
        disable_created_metrics()  # no `_created` series beside every counter and histogram
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fastswitch_http_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.duration = Histogram(
            "fastswitch_http_request_duration_seconds",
            "Seconds from an HTTP request's arrival to the end of its response (the whole stream)",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
            registry=self.registry,
        )
        self.ttft = Histogram(
            "fastswitch_http_time_to_first_token_seconds",
            "Seconds from an HTTP request's arrival to its first token leaving the front (streams)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "fastswitch_http_requests_in_progress", "HTTP requests being answered", registry=self.registry
        )
        self.disconnects = Counter(
            "fastswitch_http_client_disconnects",
            "Generations cancelled because the HTTP client went away",
            registry=self.registry,
        )
        self.scheduler_up = Gauge(
            "fastswitch_http_scheduler_up",
            "1 when the last /metrics scrape reached the scheduler",
            registry=self.registry,
        )


class Front:
    """Everything the routes do, in one place."""

    def __init__(self, config: HttpConfig, client: AsyncClient | None = None) -> None:
        self.config = config
        self._client = client
        self.keys = auth.KeyRing.load(config.api_keys) if config.api_keys else None
        self.metrics = HttpMetrics()
        self._model: ModelInfo | None = None
        self.started = int(time.time())

    @property
    def client(self) -> AsyncClient:
        if self._client is None:  # made on the server's event loop: a grpc.aio channel belongs to one loop
            self._client = AsyncClient(
                self.config.scheduler_addr,
                timeout=self.config.request_timeout_s,
                api_key="",  # no key of its own: each call carries its caller's
                tls_ca=self.config.scheduler_tls_ca,
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def model(self, client: AsyncClient | None = None) -> ModelInfo:
        """The served model (asked once of the scheduler, with the caller's client, then kept)."""
        if self._model is None:
            try:
                self._model = await (client or self.client).describe_model()
            except FastSwitchError as err:
                raise ApiError(503, f"the scheduler at {self.config.scheduler_addr} is not ready: {err}") from err
        return self._model

    async def model_id(self, client: AsyncClient | None = None) -> str:
        return self.config.served_model_name or (await self.model(client)).model

    # -- request handling ---------------------------------------------------------------------------

    def identify(self, request: Request, body: protocol._GenerationBody | None) -> Caller:
        """Who is asking, the one place identity is decided.

        Open front (no key file): the tenant is the body's `user` (or the `user` query parameter where
        there is no body). With keys: `authorization: Bearer KEY` names the tenant (an admin key may name
        one with `user`); no or an unknown key is 401 (`Unauthenticated`, mapped by the app)."""
        requested = (body.user or "") if body is not None else request.query_params.get("user", "")
        if self.keys is None:
            return Caller(requested, self.client)
        authorization = request.headers.get("authorization")
        principal = self.keys.authenticate(authorization)
        key = (authorization or "").strip().partition(" ")[2].strip()
        return Caller(auth.tenant_for(principal, requested), self.client.with_api_key(key), principal)

    def check_admin(self, caller: Caller, what: str) -> None:
        if caller.principal is not None and not caller.principal.admin:
            raise PermissionDeniedError(f"{what} covers every tenant: it needs an admin key")

    def structured_output(self, body: protocol._GenerationBody) -> dict[str, Any]:
        """SDK keywords for `response_format` (structured output maps onto the scheduler here)."""
        fmt = body.response_format
        if fmt is None or fmt.get("type") == "text":
            return {}
        raise ApiError(
            400,
            f"response_format type {fmt.get('type')!r} is not supported yet; send {{'type': 'text'}} or omit it",
            param="response_format",
        )

    async def prepare(self, request: Request, body: ChatCompletionRequest | CompletionRequest) -> Prepared:
        caller = self.identify(request, body)
        model = await self.model_id(caller.client)
        if body.model and body.model != model:
            raise ApiError(
                404,
                f"the model {body.model!r} does not exist; this server serves {model!r}",
                "model",
                "model_not_found",
            )
        try:
            body.check_supported()
        except UnsupportedFeature as err:
            raise ApiError(400, str(err), param=err.param) from err
        generate = body.sampling_kwargs(self.config.default_max_tokens)
        generate.update(self.structured_output(body))
        auth.check_priority(caller.principal, generate.get("priority", 0))
        generate["tenant"] = caller.tenant
        request_id = uuid.uuid4().hex
        generate["request_id"] = request_id
        if isinstance(body, ChatCompletionRequest):
            kind, prompt, prefix = "chat", "", "chatcmpl-"
            generate["messages"] = [m.as_dict() for m in body.messages]
        else:
            kind, prompt, prefix = "text", body.prompt_text(), "cmpl-"
            if not prompt:
                raise ApiError(400, "prompt is empty: send at least one character of text", "prompt")
        return Prepared(
            caller.client,
            kind,
            prefix + request_id,
            model,
            prompt,
            generate,
            body.stream,
            body.include_usage(),
            body.requested_max_tokens() is None,
        )

    async def respond(self, request: Request, p: Prepared) -> Response:
        structlog.contextvars.bind_contextvars(request_id=p.generate["request_id"], tenant=p.generate["tenant"])
        arrived = time.perf_counter()
        stream = p.client.generate(p.prompt, **p.generate)
        try:
            if not p.stream:
                completion = await self._unless_gone(request, _collect(stream))
                if completion.finish_reason is None:  # a cut stream is an error, never a completion
                    raise ApiError(503, CUT_STREAM)
                builder = protocol.chat_completion if p.kind == "chat" else protocol.text_completion
                return JSONResponse(builder(p.response_id, p.model, completion), headers=self._headers(p))
            # The first chunk decides the status: a request the scheduler refuses gets a 4xx, not a
            # 200 stream that fails.
            first = await self._unless_gone(request, anext(stream))
        except ClientGone:
            await stream.aclose()
            self.metrics.disconnects.inc()
            log.info("client_disconnected", phase="before_first_token")
            return Response(status_code=499)
        except FastSwitchError as err:
            await stream.aclose()
            raise self._api_error(err, p) from err
        self.metrics.ttft.observe(time.perf_counter() - arrived)
        return EventStream(self._events(p, first, stream), stream, self.metrics, headers=self._headers(p))

    async def _events(self, p: Prepared, first: TokenChunk, rest: AsyncIterator[TokenChunk]) -> AsyncIterator[bytes]:
        created = int(time.time())
        prompt_tokens, cached, tokens = first.prompt_tokens, first.reused_prefix_tokens, 0
        if p.kind == "chat":
            yield _sse(protocol.chat_chunk(p.response_id, p.model, created, {"role": "assistant", "content": ""},
                                           None, p.include_usage))  # fmt: skip
        chunk: TokenChunk | None = first
        try:
            while chunk is not None:
                tokens += len(chunk.token_ids)
                if chunk.text or chunk.finish_reason:
                    if p.kind == "chat":
                        delta = {"content": chunk.text} if chunk.text else {}
                        body = protocol.chat_chunk(
                            p.response_id, p.model, created, delta, chunk.finish_reason, p.include_usage
                        )
                    else:
                        body = protocol.text_chunk(
                            p.response_id, p.model, created, chunk.text, chunk.finish_reason, p.include_usage
                        )
                    yield _sse(body)
                if chunk.finish_reason:
                    break
                chunk = await anext(rest, None)
        except FastSwitchError as err:  # after the 200: the error goes in the stream, as OpenAI does
            yield _sse(self._api_error(err, p).body())
            return
        if chunk is None:  # a cut stream is an error, never a completion
            yield _sse(ApiError(503, CUT_STREAM).body())
            return
        if p.include_usage:
            obj = "chat.completion.chunk" if p.kind == "chat" else "text_completion"
            yield _sse(protocol.usage_chunk(p.response_id, p.model, created, obj,
                                            protocol.usage(prompt_tokens, tokens, cached)))  # fmt: skip
        yield b"data: [DONE]\n\n"

    def _api_error(self, err: FastSwitchError, p: Prepared) -> ApiError:
        api = ApiError.from_sdk(err)
        if p.defaulted_max_tokens and api.status == 400 and "max_tokens" in api.message:
            api.message += (
                f" (the request set no max_tokens; this server's default is {self.config.default_max_tokens}:"
                " set max_tokens lower)"
            )
        return api

    def _headers(self, p: Prepared) -> dict[str, str]:
        return {"x-request-id": p.generate["request_id"]}

    async def _unless_gone(self, request: Request, work: Awaitable[T]) -> T:
        """Await `work` unless the client disconnects first (then it is cancelled: ClientGone)."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if task.done():
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone: nobody to tell
            pass
        raise ClientGone

    async def metrics_text(self, client: AsyncClient | None = None) -> bytes:
        """The scheduler's metrics followed by the front's own (distinct names: one valid exposition)."""
        try:
            scheduler = (await (client or self.client).metrics()).encode()
            self.metrics.scheduler_up.set(1)
        except FastSwitchError as err:
            log.warning("scheduler_metrics_unavailable", error=str(err))
            scheduler = b""
            self.metrics.scheduler_up.set(0)
        return scheduler + generate_latest(self.metrics.registry)


async def _collect(stream: AsyncIterator[TokenChunk]) -> Completion:
    completion = Completion(request_id="", text="")
    async for chunk in stream:
        completion.add(chunk)
    return completion


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that end, and cancel the generation, as soon as the client goes away.

    Starlette's StreamingResponse notices a disconnect only at its next write; a request waiting in
    the queue writes nothing, so this one listens for `http.disconnect` while it streams.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        generation: AsyncIterator[TokenChunk],
        metrics: HttpMetrics,
        headers: dict[str, str],
    ) -> None:
        super().__init__(events, headers={**headers, "cache-control": "no-cache"}, media_type=self.media_type)
        self.events = events
        self.generation = generation
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self._stream(send))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({streaming, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not streaming.done():
                streaming.cancel()
                self.metrics.disconnects.inc()
                log.info("client_disconnected", phase="streaming")
            gone.cancel()
            await asyncio.gather(streaming, gone, return_exceptions=True)
            await self.events.aclose()  # type: ignore[attr-defined]
            await self.generation.aclose()  # type: ignore[attr-defined]  # cancels the gRPC call if still live
        if not streaming.cancelled() and streaming.exception() is not None:
            exc = streaming.exception()
            if not isinstance(exc, OSError):  # a write after the client left
                raise exc  # type: ignore[misc]

    async def _stream(self, send: Send) -> None:
        await self.stream_response(send)


class MetricsMiddleware:
    """Counts every HTTP request by route and status, and times it to the end of its response."""

    def __init__(self, app: Any, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")
        status = {"code": 500}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.perf_counter()
        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            duration = time.perf_counter() - start
            self.metrics.in_progress.dec()
            self.metrics.duration.labels(route).observe(duration)
            self.metrics.requests.labels(route, str(status["code"])).inc()
            if route.startswith("/v1/"):  # the canonical line of a request (scrapes and probes stay quiet)
                log.info("http_request", method=scope["method"], route=route, status=status["code"],
                         duration_s=round(duration, 4))  # fmt: skip
            structlog.contextvars.unbind_contextvars("request_id", "tenant")


def create_app(config: HttpConfig, client: AsyncClient | None = None) -> FastAPI:
    front = Front(config, client)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await front.close()

    app = FastAPI(title="FastSwitch OpenAI-compatible API", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.front = front
    app.add_middleware(MetricsMiddleware, metrics=front.metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(FastSwitchError)
    async def sdk_error(request: Request, err: FastSwitchError) -> JSONResponse:
        return ApiError.from_sdk(err).response()

    @app.exception_handler(ServingError)
    async def rule_error(request: Request, err: ServingError) -> JSONResponse:
        return ApiError.from_rule(err).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_error(err).response()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await front.respond(request, await front.prepare(request, body))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await front.respond(request, await front.prepare(request, body))

    async def model_card(request: Request) -> dict[str, Any]:
        client = front.identify(request, None).client
        info = await front.model(client)
        return {
            "id": await front.model_id(client),
            "object": "model",
            "created": front.started,
            "owned_by": "fastswitch",
            "max_model_len": info.max_model_len,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [await model_card(request)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> dict[str, Any]:
        card = await model_card(request)
        if model != card["id"]:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {card['id']!r}",
                           param="model", code="model_not_found")  # fmt: skip
        return card

    @app.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(conversation_id: str, request: Request) -> dict[str, Any]:
        """Our conversations' end (OpenAI's Conversations API shape): frees the history and KV kept for it."""
        caller = front.identify(request, None)
        await caller.client.end_conversation(conversation_id, tenant=caller.tenant)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    @app.get("/health")
    async def health() -> Response:
        if await front.client.serving():
            if front.keys is not None:  # describing the model needs a caller's key: the scheduler's health says it all
                return JSONResponse({"status": "ok"})
            try:
                await front.model()
                return JSONResponse({"status": "ok"})
            except ApiError:
                pass
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        caller = front.identify(request, None)
        front.check_admin(caller, "/metrics")
        return Response(await front.metrics_text(caller.client), media_type=CONTENT_TYPE_LATEST)

    return app


def _validation_error(err: RequestValidationError) -> ApiError:
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}",
                        code="invalid_json")  # fmt: skip
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    problems = "; ".join(
        f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}" for e in err.errors()
    )
    return ApiError(400, f"invalid request: {problems}", param=param, code="invalid_request")
