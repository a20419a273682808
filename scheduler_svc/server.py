"""Thin gRPC adapter: FastSwitch API requests in, Engine calls, responses out.

Who the caller is comes from the auth interceptor (`current_principal`; None on an open stack); the
rules of what that caller may do are svc_common/auth.py's, shared with the HTTP front.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import structlog

from fastswitch.v1 import api_pb2, api_pb2_grpc, common_pb2
from scheduler_svc.config import NodeAddress
from scheduler_svc.engine import Engine, GenerateInput
from scheduler_svc.grammar import OutputConstraint
from scheduler_svc.sequence import Finish, Sequence
from svc_common import auth
from svc_common.errors import InvalidArgument, PermissionDeniedError, ShuttingDown, Unavailable
from svc_common.model_source import model_name
from svc_common.plan import Sampling
from svc_common.server import ServiceHost

log = structlog.get_logger(__name__)

FINISH_TO_PROTO = {
    Finish.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    Finish.EOS: common_pb2.FINISH_REASON_EOS,
    Finish.STOP: common_pb2.FINISH_REASON_STOP,
    Finish.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    Finish.ERROR: common_pb2.FINISH_REASON_ERROR,
}


class FastSwitchServicer(api_pb2_grpc.FastSwitchServicer):
    def __init__(self, engine: Engine, host: ServiceHost | None = None) -> None:
        self.engine = engine
        self.host = host  # None in tests that drive the servicer alone

    async def _submit(self, request: api_pb2.GenerateRequest, tenant: str) -> Sequence:
        if self.host is not None and self.host.draining:
            raise ShuttingDown("the server is shutting down and takes no new requests; retry on another replica")
        principal = auth.current_principal.get()
        auth.check_priority(principal, request.priority)
        auth.check_live_requests(principal, self.engine.live_count(tenant))
        constraint = OutputConstraint.from_proto(request)
        await self.engine.compile_constraint(constraint)  # off the event loop; INVALID_ARGUMENT if it fails
        return self.engine.submit(
            GenerateInput(
                prompt=request.prompt,
                max_tokens=request.max_tokens,
                sampling=Sampling.from_proto(request.sampling),
                chat=request.chat,
                stop=tuple(request.stop),
                ignore_eos=request.ignore_eos,
                tenant=tenant,
                priority=request.priority,
                conversation_id=request.conversation_id,
                system_prompt=request.system_prompt,
                request_id=request.request_id,
                constraint=constraint,
                messages=[{"role": m.role, "content": m.content} for m in request.messages],
            )
        )

    async def Generate(
        self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.GenerateResponse]:
        tenant = auth.tenant_for(auth.current_principal.get(), request.tenant)
        try:
            seq = await self._submit(request, tenant)
        except Exception:
            self.engine.metrics.on_rejected(tenant)  # counted by outcome; the interceptor maps it
            raise
        structlog.contextvars.bind_contextvars(request_id=seq.request_id, tenant=seq.tenant)
        # Admitted: headers now, so a client's retry policy never re-sends a request the server took
        # (retries are for refusals such as draining, before any header).
        await context.send_initial_metadata(())
        first = True
        async for chunk in self.engine.stream(seq):
            response = api_pb2.GenerateResponse(
                request_id=seq.request_id,
                token_ids=chunk.token_ids,
                text=chunk.text,
                produced_unix_ns=chunk.produced_unix_ns,
            )
            if chunk.finish is not None:
                response.finish_reason = FINISH_TO_PROTO[chunk.finish]
                response.phases.CopyFrom(api_pb2.RequestPhases(**chunk.phases))
            if first:
                response.prompt_tokens = seq.num_prompt
                response.reused_prefix_tokens = seq.reused_tokens
                first = False
            yield response

    def _check_owner(self, request_id: str) -> None:
        auth.check_owner(
            auth.current_principal.get(),
            self.engine.owner_of(request_id),
            f"no live request with id {request_id!r} (finished, cancelled or never sent)",
        )

    async def Cancel(self, request: api_pb2.CancelRequest, context: grpc.aio.ServicerContext) -> api_pb2.CancelResponse:
        self._check_owner(request.request_id)
        self.engine.cancel(request.request_id)
        return api_pb2.CancelResponse()

    async def SetPriority(
        self, request: api_pb2.SetPriorityRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.SetPriorityResponse:
        self._check_owner(request.request_id)
        auth.check_priority(auth.current_principal.get(), request.priority)
        self.engine.set_priority(request.request_id, request.priority)
        return api_pb2.SetPriorityResponse()

    async def EndConversation(
        self, request: api_pb2.EndConversationRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.EndConversationResponse:
        # Conversations are keyed by tenant: another tenant's id is simply not there (NOT_FOUND).
        tenant = auth.tenant_for(auth.current_principal.get(), request.tenant)
        self.engine.end_conversation(tenant, request.conversation_id)
        return api_pb2.EndConversationResponse()

    async def GetStats(
        self, request: api_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.GetStatsResponse:
        principal = auth.current_principal.get()
        all_tenants = self.engine.tenant_stats()
        tenants = {
            name: api_pb2.TenantStats(service=service, prompt_tokens=prompt, generated_tokens=generated)
            for name in auth.visible_tenants(principal, all_tenants)
            for service, prompt, generated in [all_tenants[name]]
        }
        if principal is None or principal.admin:
            counters = self.engine.stats()
        else:
            counters = self.engine.tenant_counters(principal.tenant)
        executors = [  # the fleet is the operator's business: admins (or no keys) see it
            api_pb2.ExecutorStats(**view)  # type: ignore[arg-type]
            for view in (self.engine.executors() if principal is None or principal.admin else [])
        ]
        return api_pb2.GetStatsResponse(counters=counters, tenants=tenants, executors=executors)

    async def DescribeModel(
        self, request: api_pb2.DescribeModelRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.DescribeModelResponse:
        info = self.engine.info
        if info is None:
            raise Unavailable("scheduler is not attached to an executor yet; retry shortly")
        return api_pb2.DescribeModelResponse(
            model=model_name(self.engine.config.model),
            max_model_len=info.max_model_len,
            kv_capacity_tokens=self.engine.fleet.kv_capacity_tokens(),
            policy=self.engine.config.policy,
        )

    async def RegisterNode(
        self, request: api_pb2.RegisterNodeRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.RegisterNodeResponse:
        _require_admin("a node joins the fleet with an admin key (executor --register-api-key)")
        text = f"{request.executor_addr},{request.swapd_addr}" if request.swapd_addr else request.executor_addr
        try:
            address = NodeAddress.parse(text)
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
        index, added = self.engine.register_node(address)
        if added:
            log.info("node_registered", node=index, executor=address.executor, swapd=address.swapd)
        return api_pb2.RegisterNodeResponse(index=index, added=added)

    async def GetMetrics(
        self, request: api_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.GetMetricsResponse:
        _require_admin("the metrics cover every tenant: they need an admin key")
        return api_pb2.GetMetricsResponse(text=self.engine.metrics.exposition().decode())


def _require_admin(why: str) -> None:
    """PERMISSION_DENIED (saying `why`) unless the caller has an admin key or the stack is open."""
    principal = auth.current_principal.get()
    if principal is not None and not principal.admin:
        raise PermissionDeniedError(why)
