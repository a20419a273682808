"""`python -m scheduler_svc` (or `fastswitch scheduler`): the client-facing API and the scheduler."""

from __future__ import annotations

import asyncio

from fastswitch.v1 import api_pb2, api_pb2_grpc
from scheduler_svc.config import SchedulerConfig
from svc_common.auth import KeyRing
from svc_common.logs import configure_logging, get_logger
from svc_common.server import ServiceHost, bind_address
from svc_common.settings import run_parser


def load_tokenizer(model: str):  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    from svc_common.model_source import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


async def serve(config: SchedulerConfig) -> None:
    from scheduler_svc.engine import Engine
    from scheduler_svc.server import FastSwitchServicer

    log = get_logger(__name__)
    keys = KeyRing.load(config.api_keys) if config.api_keys else None
    if keys is None:
        log.warning(
            "open_stack",
            message="no --api-keys: any caller may claim any tenant and priority, and act on any request; "
            "start with --api-keys FILE before serving untrusted clients",
        )
    else:
        log.info("api_keys_loaded", keys=len(keys))
    host = ServiceHost(
        bind_address(config.host, config.port),
        [api_pb2.DESCRIPTOR.services_by_name["FastSwitch"].full_name],
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
        keys=keys,
        max_message_bytes=config.max_message_bytes,
    )
    engine = Engine(config, on_attached=host.set_serving)
    api_pb2_grpc.add_FastSwitchServicer_to_server(FastSwitchServicer(engine, host), host.server)

    metrics_server = None

    async def ready() -> None:
        nonlocal metrics_server
        await engine.start(await asyncio.to_thread(load_tokenizer, config.model))
        if config.metrics_port:
            from prometheus_client import start_http_server

            metrics_server, _ = start_http_server(
                config.metrics_port, addr=config.host, registry=engine.metrics.registry
            )
            log.info("metrics_serving", port=config.metrics_port, path="/metrics")

    async def stop() -> None:
        if metrics_server is not None:
            await asyncio.to_thread(metrics_server.shutdown)
        await engine.stop()

    await host.run(
        ready=ready,
        on_stop=stop,
        busy=lambda: bool(engine.live),
        drain_timeout_s=config.drain_timeout_s,
        serving_after_ready=False,  # the engine says SERVING while an executor is attached
    )


def main(argv: list[str] | None = None) -> None:
    config = run_parser("fastswitch scheduler", __doc__, SchedulerConfig, argv)
    if config.api_keys:
        try:
            KeyRing.load(config.api_keys)
        except ValueError as err:
            raise SystemExit(f"fastswitch scheduler: error: {err}") from None
    configure_logging("scheduler")
    get_logger(__name__).info("starting", port=config.port, nodes=[str(n) for n in config.nodes], policy=config.policy)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
