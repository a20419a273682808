"""`python -m scheduler_svc` (or `fastswitch scheduler`): the client-facing API and the scheduler."""

from __future__ import annotations

import argparse
import asyncio
import os

from fastswitch.common.logs import configure_logging, get_logger
from fastswitch.common.server import ServiceHost
from fastswitch.v1 import api_pb2, api_pb2_grpc
from scheduler_svc.config import POLICIES, PREEMPTION_MODES, PRIORITY_UPDATES, SchedulerConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument("--port", type=int, default=int(env("FASTSWITCH_PORT", "50051")))
    parser.add_argument("--executor", default=env("FASTSWITCH_EXECUTOR_ADDR", "localhost:50052"), help="HOST:PORT")
    parser.add_argument("--swapd", default=env("FASTSWITCH_SWAPD_ADDR", ""), help="HOST:PORT of the swap daemon")
    parser.add_argument("--model", default=env("FASTSWITCH_MODEL", ""), help="same as the executor's --model")
    parser.add_argument("--policy", choices=POLICIES, default=env("FASTSWITCH_POLICY", "fcfs"))
    parser.add_argument("--preemption", choices=PREEMPTION_MODES, default=env("FASTSWITCH_PREEMPTION", "swap"))
    parser.add_argument("--max-running", type=int, default=int(env("FASTSWITCH_MAX_RUNNING", "64")))
    parser.add_argument("--max-step-tokens", type=int, default=int(env("FASTSWITCH_MAX_STEP_TOKENS", "256")))
    parser.add_argument(
        "--priority-updates", choices=PRIORITY_UPDATES, default=env("FASTSWITCH_PRIORITY_UPDATES", "none")
    )
    parser.add_argument(
        "--priority-update-prob", type=float, default=float(env("FASTSWITCH_PRIORITY_UPDATE_PROB", "0"))
    )
    parser.add_argument(
        "--conversation-host-blocks",
        type=int,
        default=int(env("FASTSWITCH_CONVERSATION_HOST_BLOCKS", "0")),
        help="host blocks that idle conversations' KV may hold (0: the whole host pool)",
    )
    parser.add_argument("--conversation-ttl", type=float, default=float(env("FASTSWITCH_CONVERSATION_TTL_S", "600")))
    # Ablations: switch off one of FastSwitch's mechanisms (vllm-like preemption switches off all three).
    parser.add_argument("--no-block-groups", action="store_true", help="copy per block per layer, as vLLM does")
    parser.add_argument("--sync-swaps", action="store_true", help="the step loop waits for every copy to land")
    parser.add_argument("--no-kv-reuse", action="store_true", help="no conversation KV across turns or swaps")
    parser.add_argument("--seed", type=int, default=int(env("FASTSWITCH_SEED", "0")))
    parser.add_argument("--vtc-prompt-price", type=float, default=float(env("FASTSWITCH_VTC_PROMPT_PRICE", "1")))
    parser.add_argument("--vtc-gen-price", type=float, default=float(env("FASTSWITCH_VTC_GEN_PRICE", "2")))
    parser.add_argument(
        "--tenant-weight",
        action="append",
        default=[w for w in env("FASTSWITCH_TENANT_WEIGHTS", "").split(",") if w],
        metavar="TENANT=WEIGHT",
        help="VTC weight of a tenant (repeatable; default 1)",
    )


def _parse_weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"tenant weight {item!r} must look like TENANT=WEIGHT")
        weights[name] = float(value)
    return weights


def config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    config = SchedulerConfig(
        port=args.port,
        executor_addr=args.executor,
        swapd_addr=args.swapd,
        model=args.model,
        policy=args.policy,
        preemption=args.preemption,
        max_running=args.max_running,
        max_step_tokens=args.max_step_tokens,
        priority_updates=args.priority_updates,
        priority_update_prob=args.priority_update_prob,
        seed=args.seed,
        conversation_ttl_s=args.conversation_ttl,
        conversation_host_blocks=args.conversation_host_blocks,
        block_groups=not args.no_block_groups,
        async_swaps=not args.sync_swaps,
        kv_reuse=not args.no_kv_reuse,
        vtc_prompt_price=args.vtc_prompt_price,
        vtc_gen_price=args.vtc_gen_price,
        tenant_weights=_parse_weights(args.tenant_weight),
    )
    config.validate()
    return config


def load_tokenizer(model: str):  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    from fastswitch.common.model_source import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


async def serve(config: SchedulerConfig) -> None:
    from scheduler_svc.engine import Engine
    from scheduler_svc.server import FastSwitchServicer

    host = ServiceHost(f"[::]:{config.port}", [api_pb2.DESCRIPTOR.services_by_name["FastSwitch"].full_name])
    engine = Engine(config)
    api_pb2_grpc.add_FastSwitchServicer_to_server(FastSwitchServicer(engine), host.server)

    async def ready() -> None:
        await engine.start(await asyncio.to_thread(load_tokenizer, config.model))

    await host.run(ready=ready, on_stop=engine.stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fastswitch scheduler", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging("scheduler")
    config = config_from_args(args)
    get_logger(__name__).info("starting", port=config.port, executor=config.executor_addr, policy=config.policy)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
