"""Thin gRPC adapter: FastSwitch API requests in, Engine calls, responses out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import structlog

from fastswitch.v1 import api_pb2, api_pb2_grpc, common_pb2
from scheduler_svc.engine import Engine, GenerateInput
from scheduler_svc.grammar import OutputConstraint
from scheduler_svc.sequence import Finish, Sequence
from svc_common.errors import Unavailable
from svc_common.model_source import model_name
from svc_common.plan import Sampling

log = structlog.get_logger(__name__)

FINISH_TO_PROTO = {
    Finish.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    Finish.EOS: common_pb2.FINISH_REASON_EOS,
    Finish.STOP: common_pb2.FINISH_REASON_STOP,
    Finish.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    Finish.ERROR: common_pb2.FINISH_REASON_ERROR,
}


class FastSwitchServicer(api_pb2_grpc.FastSwitchServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def _submit(self, request: api_pb2.GenerateRequest) -> Sequence:
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
                tenant=request.tenant,
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
        try:
            seq = await self._submit(request)
        except Exception:
            self.engine.metrics.on_rejected(request.tenant)  # counted by outcome; the interceptor maps it
            raise
        structlog.contextvars.bind_contextvars(request_id=seq.request_id, tenant=seq.tenant)
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

    async def Cancel(self, request: api_pb2.CancelRequest, context: grpc.aio.ServicerContext) -> api_pb2.CancelResponse:
        self.engine.cancel(request.request_id)
        return api_pb2.CancelResponse()

    async def SetPriority(
        self, request: api_pb2.SetPriorityRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.SetPriorityResponse:
        self.engine.set_priority(request.request_id, request.priority)
        return api_pb2.SetPriorityResponse()

    async def EndConversation(
        self, request: api_pb2.EndConversationRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.EndConversationResponse:
        self.engine.end_conversation(request.tenant, request.conversation_id)
        return api_pb2.EndConversationResponse()

    async def GetStats(
        self, request: api_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.GetStatsResponse:
        tenants = {
            name: api_pb2.TenantStats(service=service, prompt_tokens=prompt, generated_tokens=generated)
            for name, (service, prompt, generated) in self.engine.tenant_stats().items()
        }
        executors = [api_pb2.ExecutorStats(**view) for view in self.engine.executors()]  # type: ignore[arg-type]
        return api_pb2.GetStatsResponse(counters=self.engine.stats(), tenants=tenants, executors=executors)

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

    async def GetMetrics(
        self, request: api_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.GetMetricsResponse:
        return api_pb2.GetMetricsResponse(text=self.engine.metrics.exposition().decode())
