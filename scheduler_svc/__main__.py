"""`python -m scheduler_svc` (or `fastswitch scheduler`): the client-facing API and the scheduler."""

from __future__ import annotations

import asyncio

from fastswitch.v1 import api_pb2, api_pb2_grpc
from scheduler_svc.config import SchedulerConfig
from svc_common.logs import configure_logging, get_logger
from svc_common.server import ServiceHost
from svc_common.settings import run_parser


def load_tokenizer(model: str):  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    from svc_common.model_source import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


async def serve(config: SchedulerConfig) -> None:
    from scheduler_svc.engine import Engine
    from scheduler_svc.server import FastSwitchServicer

    host = ServiceHost(f"[::]:{config.port}", [api_pb2.DESCRIPTOR.services_by_name["FastSwitch"].full_name])
    engine = Engine(config)
    api_pb2_grpc.add_FastSwitchServicer_to_server(FastSwitchServicer(engine), host.server)

    metrics_server = None

    async def ready() -> None:
        nonlocal metrics_server
        await engine.start(await asyncio.to_thread(load_tokenizer, config.model))
        if config.metrics_port:
            from prometheus_client import start_http_server

            metrics_server, _ = start_http_server(config.metrics_port, registry=engine.metrics.registry)
            get_logger(__name__).info("metrics_serving", port=config.metrics_port, path="/metrics")

    async def stop() -> None:
        if metrics_server is not None:
            await asyncio.to_thread(metrics_server.shutdown)
        await engine.stop()

    await host.run(ready=ready, on_stop=stop)


def main(argv: list[str] | None = None) -> None:
    config = run_parser("fastswitch scheduler", __doc__, SchedulerConfig, argv)
    configure_logging("scheduler")
    get_logger(__name__).info("starting", port=config.port, nodes=[str(n) for n in config.nodes], policy=config.policy)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
