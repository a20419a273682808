"""Every public RPC with random field values (hypothesis), on an open stack: only documented statuses
come back, no process dies, and `stats` after equals `stats` before except for the counters of
refused requests and of the work that accepted requests did. Also: an open stack says so at start."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastswitch.v1 import api_pb2, api_pb2_grpc, common_pb2
from tests.conftest import running_stack

pytestmark = [pytest.mark.model, pytest.mark.slow]

DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
}
# Counters that accepted requests legitimately move (work done, time passing); every other figure
# (free blocks, live, queued, kept conversations and their KV, swaps in flight, ...) must come back.
WORK = {
    "prompt_tokens", "generated_tokens", "forward_s", "sample_s", "steps", "steps_without_compute", "steps_decode_only",
    "uptime_s", "swap_stall_s",
}  # fmt: skip
WORK_PREFIXES = ("refused_", "finished_", "reused_", "recomputed_")
FUZZ = settings(
    deadline=None, max_examples=int(os.environ.get("FASTSWITCH_FUZZ_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip

INT32 = st.integers(-(2**31), 2**31 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
TEXT = st.text(max_size=40)


@pytest.fixture(scope="module")
def open_stack(model_dir: str) -> Iterator[object]:
    with running_stack(device_blocks=64, host_blocks=32, max_waiting=16) as stack:
        yield stack


@pytest.fixture(scope="module")
def stub(open_stack) -> Iterator[api_pb2_grpc.FastSwitchStub]:
    with grpc.insecure_channel(open_stack.addr) as channel:
        yield api_pb2_grpc.FastSwitchStub(channel)


def _state(stub: api_pb2_grpc.FastSwitchStub) -> dict[str, float]:
    counters = dict(stub.GetStats(api_pb2.GetStatsRequest(), timeout=10).counters)
    return {k: v for k, v in counters.items() if k not in WORK and not k.startswith(WORK_PREFIXES)}


def _call(fn, *args) -> grpc.StatusCode:  # noqa: ANN001
    try:
        result = fn(*args)
        for _ in result if not hasattr(result, "SerializeToString") else ():
            pass
    except grpc.RpcError as err:
        assert err.code() in DOCUMENTED, f"undocumented status {err.code().name}: {err.details()}"
        return err.code()
    return grpc.StatusCode.OK


generate_requests = st.builds(
    api_pb2.GenerateRequest,
    request_id=TEXT,
    prompt=st.text(max_size=200),
    chat=st.booleans(),
    sampling=st.builds(
        common_pb2.SamplingParams, temperature=FLOATS, top_k=INT32, top_p=FLOATS, seed=st.integers(0, 2**63 - 1)
    ),
    max_tokens=st.one_of(st.integers(-3, 4), st.just(2**31 - 1), INT32),
    stop=st.lists(TEXT, max_size=3),
    ignore_eos=st.booleans(),
    tenant=TEXT,
    priority=INT32,
    conversation_id=TEXT,
    system_prompt=TEXT,
)


def test_an_open_stack_warns_at_start(open_stack) -> None:
    lines = [json.loads(line) for line in open(os.path.join(open_stack.log_dir, "scheduler.log")) if line[:1] == "{"]
    warning = next(line for line in lines if line.get("event") == "open_stack")
    assert warning["level"] == "warning" and "--api-keys" in warning["message"]


def test_random_generate_requests_get_documented_statuses_and_leave_no_state(open_stack, stub) -> None:
    before = _state(stub)
    conversations: set[tuple[str, str]] = set()

    @FUZZ
    @given(request=generate_requests)
    def one(request: api_pb2.GenerateRequest) -> None:
        code = _call(lambda: stub.Generate(request, timeout=120))
        if code == grpc.StatusCode.OK and request.conversation_id:
            conversations.add((request.tenant, request.conversation_id))

    one()
    for tenant, conversation_id in conversations:
        stub.EndConversation(api_pb2.EndConversationRequest(tenant=tenant, conversation_id=conversation_id))
    assert _state(stub) == before
    assert all(p.poll() is None for p in open_stack.procs)


def test_random_control_calls_get_documented_statuses_and_change_nothing(open_stack, stub) -> None:
    before = _state(stub)

    @FUZZ
    @given(
        call=st.one_of(
            st.builds(api_pb2.CancelRequest, request_id=TEXT),
            st.builds(api_pb2.SetPriorityRequest, request_id=TEXT, priority=INT32),
            st.builds(api_pb2.EndConversationRequest, tenant=TEXT, conversation_id=TEXT),
            st.just(api_pb2.GetStatsRequest()),
        )
    )
    def one(call: object) -> None:
        method = {
            api_pb2.CancelRequest: stub.Cancel,
            api_pb2.SetPriorityRequest: stub.SetPriority,
            api_pb2.EndConversationRequest: stub.EndConversation,
            api_pb2.GetStatsRequest: stub.GetStats,
        }[type(call)]
        code = _call(method, call, 10)
        if not isinstance(call, api_pb2.GetStatsRequest):
            assert code == grpc.StatusCode.NOT_FOUND  # nothing is live or kept: every target is unknown

    one()
    assert _state(stub) == before
    assert all(p.poll() is None for p in open_stack.procs)
