"""`python -m swap_daemon` (or `fastswitch swapd`): serve the host KV pool beside one executor."""

from __future__ import annotations

import argparse
import asyncio
import os

from fastswitch.common.logs import configure_logging, get_logger
from fastswitch.common.server import ServiceHost
from fastswitch.v1 import swap_pb2, swap_pb2_grpc
from swap_daemon.config import BACKENDS, SwapDaemonConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--port", type=int, default=int(env("FASTSWITCH_SWAPD_PORT", "50053")))
    parser.add_argument(
        "--host-blocks",
        type=int,
        default=int(env("FASTSWITCH_HOST_BLOCKS", "4096")),
        help="blocks in the host swap pool (its bytes follow the executor's block size)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(env("FASTSWITCH_SWAPD_WORKERS", "2")),
        help="memcpy threads (cpu) or copy streams (cuda)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default=env("FASTSWITCH_SWAPD_BACKEND", "auto"))


async def serve(config: SwapDaemonConfig) -> None:
    from swap_daemon.copier import make_engine
    from swap_daemon.server import SwapDaemonServicer

    log = get_logger("swap_daemon")
    service = swap_pb2.DESCRIPTOR.services_by_name["SwapDaemon"].full_name
    host = ServiceHost(f"[::]:{config.port}", [service])
    servicer = SwapDaemonServicer()  # registered before start; the engine arrives in ready()
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
        await host.run(ready=ready)
    finally:
        await asyncio.to_thread(servicer.close)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fastswitch swapd", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging("swap_daemon")
    try:
        config = SwapDaemonConfig(
            port=args.port, host_blocks=args.host_blocks, workers=args.workers, backend=args.backend
        )
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
