"""`python -m executor_svc` (or `fastswitch executor`): serve one model on one device."""

from __future__ import annotations

import argparse
import asyncio
import os

from fastswitch.common.logs import configure_logging, get_logger
from fastswitch.common.server import ServiceHost
from fastswitch.v1 import executor_pb2, executor_pb2_grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--port", type=int, default=int(env("FASTSWITCH_EXECUTOR_PORT", "50052")))
    parser.add_argument("--model", default=env("FASTSWITCH_MODEL", ""), help="HF directory or GGUF file")
    parser.add_argument("--block-size", type=int, default=int(env("FASTSWITCH_BLOCK_SIZE", "16")))
    parser.add_argument("--device-blocks", type=int, default=int(env("FASTSWITCH_DEVICE_BLOCKS", "1024")))
    parser.add_argument("--device", default=env("FASTSWITCH_DEVICE", "auto"), help="auto|cpu|cuda|cuda:N")
    parser.add_argument("--threads", type=int, default=int(env("FASTSWITCH_THREADS", "0")))


async def serve(args: argparse.Namespace) -> None:
    from executor_svc.config import ExecutorConfig
    from executor_svc.server import ExecutorServicer

    config = ExecutorConfig(
        model=args.model,
        port=args.port,
        block_size=args.block_size,
        num_blocks=args.device_blocks,
        device=args.device,
        threads=args.threads,
    )
    config.validate()
    servicer = ExecutorServicer()
    host = ServiceHost(f"[::]:{config.port}", [executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name])
    executor_pb2_grpc.add_ExecutorServicer_to_server(servicer, host.server)

    async def load() -> None:
        from executor_svc.model_runner import ModelRunner

        servicer.runner = await asyncio.to_thread(ModelRunner, config)

    async def unload() -> None:
        if servicer.runner is not None:
            servicer.runner.close()

    try:
        await host.run(ready=load, on_stop=unload)
    finally:
        await unload()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fastswitch executor", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging("executor")
    get_logger(__name__).info("starting", port=args.port)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
