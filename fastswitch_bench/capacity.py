"""Scheduler capacity: how much scheduler time one node-step costs when one scheduler drives many nodes.

Fake nodes answer a step at once (no model, no gRPC): each node's real `ExecutorLink.drive` loop runs
on one event loop, as in the scheduler process, against an in-process stream that returns one token per
sampled chunk. So what is timed is the scheduler's own per-step path: `schedule()`, the plan's proto,
the output's parsing, `on_step_output()`, the fleet's balance pass and the event loop's switches. The
fake node's own work (building its answer) is timed apart and subtracted.

    python -m fastswitch_bench.capacity --nodes 16 --running 256 --steps 50 --out docs/results/capacity/NAME
    python -m fastswitch_bench.capacity --profile   # cProfile's top functions of the same run
    python -m fastswitch_bench.capacity --policy vtc --tenants 4   # fair share over 4 tenants' requests
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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

    def __init__(self) -> None:
        self.answers: collections.deque[executor_pb2.StepResult] = collections.deque()  # in plan order
        self.start(0)

    def start(self, steps: int) -> None:
        """Answer `steps` more steps (plans still unanswered from the last run come first)."""
        self.steps_left = steps
        self.own_s = 0.0  # time spent building answers (the node's work, not the scheduler's)
        self.finished = asyncio.Event()

    async def write(self, plan: executor_pb2.StepPlan) -> None:
        start = time.perf_counter()
        result = executor_pb2.StepResult(step_id=plan.step_id, decode_token_ids=[TOKEN] * len(plan.decodes.slots))
        for chunk in plan.chunks:
            if chunk.sample:
                result.tokens.add(request_id=chunk.request_id, token_id=TOKEN)
        self.answers.append(result)
        self.own_s += time.perf_counter() - start

    async def read(self) -> executor_pb2.StepResult:
        if self.steps_left == 0:
            await asyncio.Event().wait()  # done: the loop parks here until it is cancelled
        await asyncio.sleep(0)  # a real stream yields to the event loop here: the other nodes run
        self.steps_left -= 1
        if self.steps_left == 0:
            self.finished.set()
        return self.answers.popleft()

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
    policy: str = "fcfs"
    tenants: int = 1
    planned_steps: int = 0  # plans made in the timed window (one more per node than its timed steps: the last
    # plan, written as the fake node parks)
    decode_only_steps: int = 0  # of those, the plans made without the walk (the steady state's fast path)
    running_min: int = 0  # running requests on the least full node when the timed steps began
    waiting: int = 0  # requests waiting on any node then


def _config(running: int, policy: str) -> SchedulerConfig:
    return SchedulerConfig(max_running=running, max_step_tokens=max(2048, running), kv_reuse=False, policy=policy)


def _fill(fleet: Fleet, nodes: int, running: int, prompt_len: int, max_tokens: int, tenants: int) -> None:
    for i in range(nodes * running):
        prompt = [10 + (i + j) % 1000 for j in range(prompt_len)]
        fleet.add(Sequence(f"r{i}", prompt, Sampling(), max_tokens, True, tenant=f"t{i % tenants}"))


async def _drive(
    nodes: int,
    running: int,
    warmup: int,
    steps: int,
    prompt_len: int,
    policy: str = "fcfs",
    tenants: int = 1,
    profiler: cProfile.Profile | None = None,
) -> Result:
    config = _config(running, policy)
    fleet = Fleet(config, [NodeAddress(f"node{i}:1") for i in range(nodes)])
    blocks = running * ((prompt_len + warmup + steps + 2 * 16) // BLOCK_SIZE + 2)
    links = []
    for node in fleet.nodes:
        fleet.attach(node, blocks, BLOCK_SIZE)
        fleet.node_up(node)
        links.append(ExecutorLink(config, fleet, node, on_tokens=_drop, on_fail=_fail))
    start = time.perf_counter()
    _fill(fleet, nodes, running, prompt_len, max_tokens=warmup + steps + 16, tenants=tenants)
    submit_s = time.perf_counter() - start
    # Warm-up: the prompts are computed and every node decodes a full batch; not timed.
    fakes = [FakeNode() for _ in links]
    await _run(links, fakes, warmup)
    # Every node full, nothing waiting (with fcfs; under fleet-wide VTC the fleet's balancing may leave a few
    # requests waiting on full nodes while others run a few short: reported, not hidden).
    scheds = [n.scheduler for n in fleet.nodes if n.scheduler is not None]
    running_min, waiting = min(len(s.running) for s in scheds), sum(len(s.waiting) for s in scheds)
    if profiler is not None:
        profiler.enable()
    before = sum(n.scheduler.generated_tokens for n in fleet.nodes if n.scheduler)
    decode_only_before = fleet.stats.counter("steps_decode_only")
    planned_before = fleet.stats.counter("steps")
    start = time.perf_counter()
    await _run(links, fakes, steps)
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
        policy=policy,
        tenants=tenants,
        planned_steps=int(fleet.stats.counter("steps") - planned_before),
        decode_only_steps=int(fleet.stats.counter("steps_decode_only") - decode_only_before),
        running_min=running_min,
        waiting=waiting,
    )


async def _run(links: list[ExecutorLink], fakes: list[FakeNode], steps: int) -> None:
    for fake in fakes:
        fake.start(steps)
    tasks = [asyncio.create_task(link.drive(fake)) for link, fake in zip(links, fakes, strict=True)]
    await asyncio.gather(*(f.finished.wait() for f in fakes))
    for task in tasks:
        while not task.done():  # again until it ends: 3.11's wait_for can swallow a cancellation
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)


def _drop(node: Node, events: list[Any], produced_ns: int) -> None:
    pass


def _fail(request_ids: list[str], error: Exception) -> None:
    raise AssertionError(f"{len(request_ids)} requests failed on a fake node: {error}")


def run(
    nodes: int,
    running: int,
    warmup: int,
    steps: int,
    prompt_len: int,
    profile: bool = False,
    policy: str = "fcfs",
    tenants: int = 1,
) -> Result:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # no debug logs per step
    if not profile:
        return asyncio.run(_drive(nodes, running, warmup, steps, prompt_len, policy, tenants))
    profiler = cProfile.Profile()
    result = asyncio.run(_drive(nodes, running, warmup, steps, prompt_len, policy, tenants, profiler))  # timed only
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
    parser.add_argument("--policy", default="fcfs", choices=("fcfs", "priority", "vtc"))
    parser.add_argument("--tenants", type=int, default=1, help="requests spread round-robin over this many tenants")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions (slower run)")
    parser.add_argument("--out", help="write results.json there")
    args = parser.parse_args(argv)
    result = run(
        args.nodes, args.running, args.warmup, args.steps, args.prompt_len, args.profile, args.policy, args.tenants
    )
    print(json.dumps(asdict(result), indent=2))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(asdict(result), f, indent=2)


if __name__ == "__main__":
    main()
