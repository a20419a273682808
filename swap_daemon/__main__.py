"""`python -m swap_daemon` (or `fastswitch swapd`): serve the host KV pool beside one executor."""

from __future__ import annotations

import asyncio

from fastswitch.v1 import swap_pb2, swap_pb2_grpc
from svc_common.logs import configure_logging, get_logger
from svc_common.server import ServiceHost, bind_address
from svc_common.settings import run_parser
from swap_daemon.config import SwapDaemonConfig


async def serve(config: SwapDaemonConfig) -> None:
    from swap_daemon.copier import make_engine
    from swap_daemon.server import SwapDaemonServicer

    log = get_logger("swap_daemon")
    service = swap_pb2.DESCRIPTOR.services_by_name["SwapDaemon"].full_name
    host = ServiceHost(
        bind_address(config.host, config.port), [service], tls_cert=config.tls_cert, tls_key=config.tls_key
    )
    # Registered before start; the engine arrives in ready().
    servicer = SwapDaemonServicer(link_tls_ca=config.link_tls_ca)
    swap_pb2_grpc.add_SwapDaemonServicer_to_server(servicer, host.server)

    async def ready() -> None:
        servicer.engine = await asyncio.to_thread(make_engine, config.backend, config.host_blocks, config.workers)
        log.info(
            "swap_daemon_ready",
            backend=servicer.engine.backend,
            host_blocks=config.host_blocks,
            workers=config.workers,
        )

    try:
        await host.run(
            ready=ready,
            busy=lambda: servicer.engine is not None and servicer.engine.attached,
            drain_timeout_s=config.drain_timeout_s,
        )
    finally:
        await asyncio.to_thread(servicer.close)


def main(argv: list[str] | None = None) -> None:
    config = run_parser("fastswitch swapd", __doc__, SwapDaemonConfig, argv)
    configure_logging("swap_daemon")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
