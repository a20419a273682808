"""A node that joins its scheduler by itself (scheduler `--accept-nodes`, executor `--register-with`).

Once the model is loaded, the executor calls the scheduler's `RegisterNode` with the addresses the
scheduler (and the other nodes' swap daemons) reach it at (`--advertise`), and calls it again every
`REGISTER_EVERY_S` seconds: registering is idempotent, and so a scheduler that restarted learns its nodes
back. A refusal (no --accept-nodes, a key that is not an admin's) is logged and retried at the same pace,
so fixing the scheduler's settings is enough.
"""

from __future__ import annotations

import asyncio

import grpc
import structlog

from executor_svc.config import ExecutorConfig
from fastswitch.v1 import api_pb2, api_pb2_grpc
from svc_common.server import link_channel

log = structlog.get_logger(__name__)

REGISTER_EVERY_S = 10.0
REGISTER_DEADLINE_S = 10.0


async def keep_registered(config: ExecutorConfig, every_s: float = REGISTER_EVERY_S) -> None:
    """Register with `config.register_with` now and every `every_s` seconds until cancelled."""
    executor, swapd = config.advertised
    request = api_pb2.RegisterNodeRequest(executor_addr=executor, swapd_addr=swapd)
    metadata = (("authorization", f"Bearer {config.register_api_key}"),) if config.register_api_key else None
    channel = link_channel(config.register_with, config.register_tls_ca)
    stub = api_pb2_grpc.FastSwitchStub(channel)
    joined: int | None = None
    try:
        while True:
            try:
                reply = await stub.RegisterNode(request, timeout=REGISTER_DEADLINE_S, metadata=metadata)
                if reply.added or joined != reply.index:
                    log.info("registered", scheduler=config.register_with, node=reply.index, added=reply.added,
                             executor=executor, swapd=swapd)  # fmt: skip
                joined = reply.index
            except grpc.aio.AioRpcError as err:
                joined = None
                refused = err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
                                         grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED)  # fmt: skip
                (log.error if refused else log.warning)(
                    "register_failed", scheduler=config.register_with, code=err.code().name, details=err.details()
                )
            await asyncio.sleep(every_s)
    finally:
        await channel.close()
