"""Scheduler capacity: how much scheduler time one node-step costs when one scheduler drives many nodes.

Fake nodes answer a step at once (no model, no gRPC): each node's real `ExecutorLink.drive` loop runs
on one event loop, as in the scheduler process, against an in-process stream that returns one token per
sampled chunk. So what is timed is the scheduler's own per-step path: `schedule()`, the plan's proto,
the output's parsing, `on_step_output()`, the fleet's balance pass and the event loop's switches. The
fake node's own work (building its answer) is timed apart and subtracted.

    python -m fastswitch_bench.capacity --nodes 16 --running 256 --steps 100 --out docs/results/capacity
    python -m fastswitch_bench.capacity --profile   # cProfile's top functions of the same run
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import time
from dataclasses import asdict, dataclass
from typing import Any

from fastswitch.v1 import executor_pb2
from scheduler_svc.config import NodeAddress, SchedulerConfig
from scheduler_svc.executor_link import ExecutorLink
from scheduler_svc.fleet import Fleet, Node
from scheduler_svc.sequence import Sequence
from svc_common.plan import Sampling

BLOCK_SIZE = 16
TOKEN = 7  # what every fake node "samples" (never EOS)


class FakeNode:
    """An Execute stream answered at once: one token for every chunk that samples and every decode."""

    def __init__(self, steps: int) -> None:
        self.steps_left = steps
        self.answer: executor_pb2.StepResult | None = None
        self.own_s = 0.0  # time spent building answers (the node's work, not the scheduler's)
        self.finished = asyncio.Event()

    async def write(self, plan: executor_pb2.StepPlan) -> None:
        start = time.perf_counter()
        result = executor_pb2.StepResult(step_id=plan.step_id, decode_token_ids=[TOKEN] * len(plan.decodes.slots))
        for chunk in plan.chunks:
            if chunk.sample:
                result.tokens.add(request_id=chunk.request_id, token_id=TOKEN)
        self.answer = result
        self.own_s += time.perf_counter() - start

    async def read(self) -> executor_pb2.StepResult:
        if self.steps_left == 0:
            await asyncio.Event().wait()  # done: the loop parks here until it is cancelled
        await asyncio.sleep(0)  # a real stream yields to the event loop here: the other nodes run
        self.steps_left -= 1
        if self.steps_left == 0:
            self.finished.set()
        assert self.answer is not None
        return self.answer

    def done(self) -> bool:
        return False


@dataclass
class Result:
    nodes: int
    running_per_node: int
    steps_per_node: int
    node_steps: int
    wall_s: float
    fake_node_s: float
    scheduler_s: float
    per_node_step_ms: float
    node_steps_per_s: float
    tokens: int  # generated in the timed steps
    tokens_per_s: float
    submit_us: float  # placing one new request (mean over filling the fleet)


def _config(running: int) -> SchedulerConfig:
    return SchedulerConfig(max_running=running, max_step_tokens=max(2048, running), kv_reuse=False)


def _fill(fleet: Fleet, nodes: int, running: int, prompt_len: int, max_tokens: int) -> None:
    for i in range(nodes * running):
        seq = Sequence(f"r{i}", [10 + (i + j) % 1000 for j in range(prompt_len)], Sampling(), max_tokens, True)
        fleet.add(seq)


async def _drive(
    nodes: int, running: int, warmup: int, steps: int, prompt_len: int, profiler: cProfile.Profile | None = None
) -> Result:
    config = _config(running)
    fleet = Fleet(config, [NodeAddress(f"node{i}:1") for i in range(nodes)])
    blocks = running * ((prompt_len + warmup + steps + 2 * 16) // BLOCK_SIZE + 2)
    links = []
    for node in fleet.nodes:
        fleet.attach(node, blocks, BLOCK_SIZE)
        fleet.node_up(node)
        links.append(ExecutorLink(config, fleet, node, on_tokens=_drop, on_fail=_fail))
    start = time.perf_counter()
    _fill(fleet, nodes, running, prompt_len, max_tokens=warmup + steps + 16)
    submit_s = time.perf_counter() - start
    # Warm-up: the prompts are computed and every node decodes a full batch; not timed.
    await _run(links, warmup)
    assert all(len(n.scheduler.running) == running for n in fleet.nodes if n.scheduler), "a node is not full"
    if profiler is not None:
        profiler.enable()
    before = sum(n.scheduler.generated_tokens for n in fleet.nodes if n.scheduler)
    start = time.perf_counter()
    fakes = await _run(links, steps)
    wall = time.perf_counter() - start
    tokens = sum(n.scheduler.generated_tokens for n in fleet.nodes if n.scheduler) - before
    if profiler is not None:
        profiler.disable()
    own = sum(f.own_s for f in fakes)
    node_steps = nodes * steps
    sched_s = wall - own
    for link in links:
        await link.stop()
    return Result(
        nodes=nodes,
        running_per_node=running,
        steps_per_node=steps,
        node_steps=node_steps,
        wall_s=round(wall, 4),
        fake_node_s=round(own, 4),
        scheduler_s=round(sched_s, 4),
        per_node_step_ms=round(1000 * sched_s / node_steps, 4),
        node_steps_per_s=round(node_steps / sched_s, 1),
        tokens=tokens,
        tokens_per_s=round(tokens / sched_s, 1),
        submit_us=round(1e6 * submit_s / (nodes * running), 1),
    )


async def _run(links: list[ExecutorLink], steps: int) -> list[FakeNode]:
    fakes = [FakeNode(steps) for _ in links]
    tasks = [asyncio.create_task(link.drive(fake)) for link, fake in zip(links, fakes, strict=True)]
    await asyncio.gather(*(f.finished.wait() for f in fakes))
    for task in tasks:
        while not task.done():  # again until it ends: 3.11's wait_for can swallow a cancellation
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
    return fakes


def _drop(node: Node, events: list[Any], produced_ns: int) -> None:
    pass


def _fail(request_ids: list[str], error: Exception) -> None:
    raise AssertionError(f"{len(request_ids)} requests failed on a fake node: {error}")


def run(nodes: int, running: int, warmup: int, steps: int, prompt_len: int, profile: bool = False) -> Result:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # no debug logs per step
    if not profile:
        return asyncio.run(_drive(nodes, running, warmup, steps, prompt_len))
    profiler = cProfile.Profile()
    result = asyncio.run(_drive(nodes, running, warmup, steps, prompt_len, profiler))  # the timed steps only
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--running", type=int, default=256, help="running requests per node")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per node (prefill, full batches)")
    parser.add_argument("--steps", type=int, default=100, help="timed decode steps per node")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions (slower run)")
    parser.add_argument("--out", help="write results.json there")
    args = parser.parse_args(argv)
    result = run(args.nodes, args.running, args.warmup, args.steps, args.prompt_len, args.profile)
    print(json.dumps(asdict(result), indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(asdict(result), f, indent=2)


if __name__ == "__main__":
    main()
