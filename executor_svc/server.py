"""Thin gRPC adapter over ModelRunner: Describe, and the Execute plan/result stream."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from executor_svc.model_runner import ModelRunner
from fastswitch.v1 import executor_pb2, executor_pb2_grpc
from svc_common.errors import FailedPrecondition
from svc_common.plan import StepPlan

log = structlog.get_logger(__name__)


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    def __init__(self) -> None:
        self.runner: ModelRunner | None = None
        self._stream_lock = asyncio.Lock()
        # One step at a time on the model and its KV pool, even when a scheduler gave up on a slow step
        # (--step-timeout) and attached again while that step's thread still runs.
        self._step_lock = threading.Lock()

    def attached(self) -> bool:
        """Whether a scheduler is driving this executor now."""
        return self._stream_lock.locked()

    def _ready_runner(self) -> ModelRunner:
        if self.runner is None:
            raise FailedPrecondition("executor is still loading the model; retry when health is SERVING")
        return self.runner

    async def Describe(
        self, request: executor_pb2.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> executor_pb2.ExecutorInfo:
        r = self._ready_runner()
        return executor_pb2.ExecutorInfo(
            model=str(r.model_dir),
            device=str(r.device),
            dtype=str(r.dtype).removeprefix("torch."),
            num_layers=r.num_layers,
            num_kv_heads=r.num_kv_heads,
            head_dim=r.head_dim,
            block_size=r.block_size,
            num_blocks=r.pool.num_blocks,
            block_bytes=r.pool.block_bytes,
            pool_handle=r.pool.handle,
            max_model_len=r.max_model_len,
            vocab_size=r.vocab_size,
            pid=os.getpid(),
        )

    async def Execute(
        self, request_iterator: AsyncIterator[executor_pb2.StepPlan], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[executor_pb2.StepResult]:
        runner = self._ready_runner()
        if self._stream_lock.locked():
            raise FailedPrecondition("another scheduler is already driving this executor")
        async with self._stream_lock:
            log.info("scheduler_attached", peer=context.peer())
            # A new scheduler stream starts from a clean slate: it owns every block table.
            await asyncio.to_thread(self._locked, runner.forget_all)
            try:
                async for msg in request_iterator:
                    plan = StepPlan.from_proto(msg)
                    result = await asyncio.to_thread(self._locked, runner.step, plan)
                    yield result.to_proto()
            finally:
                runner.forget_all()
                log.info("scheduler_detached")

    def _locked(self, fn: Any, *args: Any) -> Any:
        with self._step_lock:
            return fn(*args)
