"""`python -m executor_svc` (or `fastswitch executor`): serve one model on one device."""

from __future__ import annotations

import asyncio

from executor_svc.config import ExecutorConfig
from fastswitch.v1 import executor_pb2, executor_pb2_grpc
from svc_common.logs import configure_logging, get_logger
from svc_common.server import ServiceHost, bind_address
from svc_common.settings import run_parser


async def serve(config: ExecutorConfig) -> None:
    from executor_svc.server import ExecutorServicer

    servicer = ExecutorServicer()
    host = ServiceHost(
        bind_address(config.host, config.port),
        [executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name],
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
    )
    executor_pb2_grpc.add_ExecutorServicer_to_server(servicer, host.server)

    registering: list[asyncio.Task[None]] = []

    async def load() -> None:
        from executor_svc.model_runner import ModelRunner

        servicer.runner = await asyncio.to_thread(ModelRunner, config)
        if config.register_with:  # join the scheduler by itself
            from executor_svc.register import keep_registered

            registering.append(asyncio.create_task(keep_registered(config), name="register"))

    async def unload() -> None:
        for task in registering:
            task.cancel()
        if servicer.runner is not None:
            servicer.runner.close()

    try:
        # Draining: the scheduler drains first and detaches; until then its live requests need this executor.
        await host.run(ready=load, on_stop=unload, busy=servicer.attached, drain_timeout_s=config.drain_timeout_s)
    finally:
        await unload()


def main(argv: list[str] | None = None) -> None:
    config = run_parser("fastswitch executor", __doc__, ExecutorConfig, argv)
    configure_logging("executor")
    get_logger(__name__).info("starting", port=config.port)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
