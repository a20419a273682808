"""The executor link's fault handling (`ExecutorLink.on_fault`), against a scripted fake executor, no model:
a failing step is replayed once and a repeat fails only the requests in it (INTERNAL); a lost executor
is reconnected (health off, then on) and its requests recompute to the same output; a hung step counts
as lost (--step-timeout); requests fail UNAVAILABLE once no step has succeeded for --executor-timeout."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import grpc
from test_scheduler import BLOCK, FakeExecutor, expected_output, seq

from fastswitch.v1 import executor_pb2
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.executor_link import ExecutorLink, StepFailed
from scheduler_svc.fleet import Fleet
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import Finish, Sequence
from svc_common.errors import ServingError, Unavailable
from svc_common.plan import StepPlan

INFO = executor_pb2.ExecutorInfo(num_blocks=32, block_size=BLOCK, max_model_len=1024)


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _Stub:
    """Execute streams on a FakeExecutor; `fault(plan, stream_number)` may answer a step with an error
    (or `"hang"`). Every new stream starts from a clean slate, as the real executor's does."""

    def __init__(self, fault: Callable[[StepPlan, int], grpc.aio.AioRpcError | str | None]) -> None:
        self.executor = FakeExecutor()
        self.fault = fault
        self.streams = 0
        self.describe_failures = 0  # Describe calls to fail before the executor is back

    def Execute(self) -> _Call:  # noqa: N802 - the gRPC stub's name
        self.streams += 1
        self.executor.forget_all()
        return _Call(self, self.streams)

    async def Describe(self, request: object, timeout: float) -> executor_pb2.ExecutorInfo:  # noqa: N802
        if self.describe_failures > 0:
            self.describe_failures -= 1
            raise _error(grpc.StatusCode.UNAVAILABLE, "connection refused")
        return INFO


class _Call:
    def __init__(self, stub: _Stub, number: int) -> None:
        self.stub, self.number = stub, number
        self.outcomes: collections.deque[Any] = collections.deque()  # one per plan written, in order

    async def write(self, plan: object) -> None:
        step = StepPlan.from_proto(plan)  # type: ignore[arg-type]
        fault = self.stub.fault(step, self.number)
        self.outcomes.append(fault if fault is not None else self.stub.executor.run(step).to_proto())

    async def read(self) -> object:
        await asyncio.sleep(0)
        outcome = self.outcomes.popleft()
        if outcome == "hang":
            await asyncio.sleep(3600)
        if isinstance(outcome, grpc.aio.AioRpcError):
            raise outcome
        return outcome

    def cancel(self) -> None:
        pass

    def done(self) -> bool:
        return False

    def add_done_callback(self, callback: Callable[[object], None]) -> None:
        pass


class _Harness:
    """A link on a scheduler, with the request front's part played here: failed requests are aborted."""

    def __init__(self, stub: _Stub, **settings: object) -> None:
        self.config = SchedulerConfig(max_step_tokens=16, **settings)  # type: ignore[arg-type]
        self.fleet = Fleet(self.config)  # one node
        node = self.fleet.nodes[0]
        self.fleet.eos_token_ids.add(0)
        self.scheduler: Scheduler = self.fleet.attach(node, INFO.num_blocks, INFO.block_size)
        self.failed: list[tuple[list[str] | None, ServingError]] = []
        self.attached: list[bool] = []
        self.link = ExecutorLink(self.config, self.fleet, node, on_tokens=lambda n, events, ns: None,
                                 on_fail=self._on_fail, on_attached=self._on_attached)  # fmt: skip
        self.link._stub = stub  # type: ignore[assignment]

    def _on_fail(self, request_ids: list[str] | None, error: ServingError) -> None:
        self.failed.append((request_ids, error))
        for request_id in request_ids if request_ids is not None else list(self.scheduler.requests):
            self.scheduler.abort(request_id, Finish.ERROR)

    async def _on_attached(self, attached: bool) -> None:
        self.attached.append(attached)

    async def run_until(self, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
        self.link._attach(INFO)  # as if its first Describe answered (the node's scheduler stays this one)
        self.link.start()
        try:
            async with asyncio.timeout(timeout_s):
                while not done():
                    await asyncio.sleep(0.001)
        finally:
            await self.link.stop()

    def counter(self, name: str) -> float:
        return self.scheduler.stats.counter(name)


def _bad_and_good(h: _Harness) -> tuple[Sequence, Sequence]:
    """Two requests queued in this order: `bad` (the one a test makes fail) and `good`."""
    bad, good = seq("bad", prompt_len=5, max_tokens=4), seq("good", prompt_len=5, max_tokens=4)
    h.scheduler.add(bad)
    h.scheduler.add(good)
    return bad, good


def test_a_step_that_fails_twice_the_same_way_fails_its_requests_with_internal_and_the_rest_go_on() -> None:
    def fault(plan: StepPlan, n: int) -> grpc.aio.AioRpcError | None:
        return _error(grpc.StatusCode.INTERNAL, "boom") if "bad" in stub.executor.request_ids(plan) else None

    stub = _Stub(fault)
    h = _Harness(stub, max_running=1)
    bad, good = _bad_and_good(h)
    asyncio.run(h.run_until(lambda: bad.finished and good.finished))
    assert [(ids, type(err)) for ids, err in h.failed] == [(["bad"], StepFailed)]
    assert StepFailed("x").code is grpc.StatusCode.INTERNAL and "failed twice" in str(h.failed[0][1])
    assert bad.finish is Finish.ERROR and good.finish is Finish.LENGTH
    assert good.output_ids == expected_output(good.prompt_ids, 4)
    assert h.counter("failed_steps") == 2 and h.counter("executor_reconnects") == 0
    assert h.attached == [True]  # alive, only failing: health stays on


def test_a_step_failing_on_a_packed_decode_names_that_request() -> None:
    def fault(plan: StepPlan, n: int) -> grpc.aio.AioRpcError | None:
        # Its first decode fails, then its recomputation on the next stream: the same failure twice in a
        # row on the same request only if the decode's failure was put down to it.
        decoding = [stub.executor.slots[slot] for slot in plan.decodes.slots]
        again = n == 2 and "bad" in [c.request_id for c in plan.chunks]
        return _error(grpc.StatusCode.INTERNAL, "boom") if "bad" in decoding or again else None

    stub = _Stub(fault)
    h = _Harness(stub, max_running=1)
    bad, good = _bad_and_good(h)
    asyncio.run(h.run_until(lambda: bad.finished and good.finished))
    assert [(ids, type(err)) for ids, err in h.failed] == [(["bad"], StepFailed)]
    assert bad.finish is Finish.ERROR and good.output_ids == expected_output(good.prompt_ids, 4)


def test_a_failure_that_does_not_repeat_is_replayed_and_the_request_completes() -> None:
    stub = _Stub(lambda plan, n: _error(grpc.StatusCode.INTERNAL, "flaky") if n == 1 else None)
    h = _Harness(stub)
    one = seq("one", prompt_len=5, max_tokens=4)
    h.scheduler.add(one)
    asyncio.run(h.run_until(lambda: one.finished))
    assert not h.failed and one.finish is Finish.LENGTH
    assert one.output_ids == expected_output(one.prompt_ids, 4)
    assert h.counter("failed_steps") == 1


def test_a_lost_executor_is_reconnected_with_health_off_meanwhile_and_its_requests_recompute() -> None:
    def fault(plan: StepPlan, n: int) -> grpc.aio.AioRpcError | None:
        # The first stream breaks at its third step, after some tokens: the executor is gone.
        return _error(grpc.StatusCode.UNAVAILABLE, "socket closed") if n == 1 and plan.step_id >= 2 else None

    stub = _Stub(fault)
    stub.describe_failures = 3  # it takes a few tries to come back
    h = _Harness(stub)
    reqs = [seq(f"r{i}", prompt_len=5, max_tokens=6) for i in range(2)]
    for r in reqs:
        h.scheduler.add(r)
    asyncio.run(h.run_until(lambda: all(r.finished for r in reqs)))
    assert not h.failed
    assert all(r.output_ids == expected_output(r.prompt_ids, 6) for r in reqs)
    assert h.counter("executor_reconnects") == 1 and stub.streams == 2
    assert h.attached == [True, False, True]


def test_a_hung_step_counts_as_a_lost_executor() -> None:
    stub = _Stub(lambda plan, n: "hang" if n == 1 else None)
    h = _Harness(stub, step_timeout_s=0.5)
    one = seq("one", prompt_len=5, max_tokens=3)
    h.scheduler.add(one)
    asyncio.run(h.run_until(lambda: one.finished))
    assert one.output_ids == expected_output(one.prompt_ids, 3) and not h.failed
    assert h.counter("step_timeouts") == 1 and h.counter("executor_reconnects") == 1


def test_requests_fail_unavailable_when_no_step_succeeds_for_the_executor_timeout() -> None:
    stub = _Stub(lambda plan, n: _error(grpc.StatusCode.UNAVAILABLE, "socket closed"))
    stub.describe_failures = 10**6  # never back
    h = _Harness(stub, executor_timeout_s=0.3)
    reqs: list[Sequence] = [seq(f"r{i}", prompt_len=5, max_tokens=3) for i in range(2)]
    for r in reqs:
        h.scheduler.add(r)
    asyncio.run(h.run_until(lambda: all(r.finished for r in reqs)))
    assert len(h.failed) == 1 and h.failed[0][0] == ["r0", "r1"] and isinstance(h.failed[0][1], Unavailable)
    assert "--executor-timeout" in str(h.failed[0][1])
    assert all(r.finish is Finish.ERROR for r in reqs)


def test_an_error_in_the_schedulers_own_step_path_is_replayed_once_then_fails_only_its_requests() -> None:
    """A bug on the scheduler's side of a step (here: applying a step's output raises whenever `bad` is in
    it) must not stop the node: the step is replayed, the repeat fails only the requests in it, the others
    complete."""
    stub = _Stub(lambda plan, n: None)
    h = _Harness(stub, max_running=1)
    bad, good = _bad_and_good(h)
    apply = h.scheduler.on_step_output

    def on_step_output(output: Any) -> Any:
        if bad.state.value == "running" and not bad.finished:
            raise KeyError("bad")
        return apply(output)

    h.scheduler.on_step_output = on_step_output  # type: ignore[method-assign]
    asyncio.run(h.run_until(lambda: bad.finished and good.finished))
    assert [(ids, type(err)) for ids, err in h.failed] == [(["bad"], StepFailed)]
    assert "scheduler error: KeyError" in str(h.failed[0][1])
    assert good.output_ids == expected_output(good.prompt_ids, 4)
    assert h.counter("step_loop_errors") == 2 and stub.streams == 3
