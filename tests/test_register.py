"""Nodes that join the scheduler by themselves: `RegisterNode` (scheduler --accept-nodes) and the
executor's registration loop (--register-with), without a model; the whole path with one is in
test_nodes.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from executor_svc.config import ExecutorConfig
from executor_svc.register import keep_registered
from fastswitch.v1 import api_pb2, api_pb2_grpc
from scheduler_svc.config import NodeAddress, SchedulerConfig
from scheduler_svc.engine import Engine
from scheduler_svc.server import FastSwitchServicer
from svc_common import auth
from svc_common.auth import Principal
from svc_common.errors import FailedPrecondition, InvalidArgument, PermissionDeniedError
from tests.conftest import serve_in_thread


def test_a_scheduler_given_no_node_drives_localhost_unless_it_accepts_nodes() -> None:
    assert SchedulerConfig().nodes == [NodeAddress("localhost:50052")]
    assert SchedulerConfig(accept_nodes=True).nodes == []
    assert SchedulerConfig(accept_nodes=True, executor_addr=["a:1"]).nodes == [NodeAddress("a:1")]


def test_a_node_registers_once_and_keeps_its_place() -> None:
    engine = Engine(SchedulerConfig(accept_nodes=True, executor_addr=["listed:1"]))
    assert engine.register_node(NodeAddress("n1:2", "n1:3")) == (1, True)
    assert engine.register_node(NodeAddress("n1:2", "n1:3")) == (1, False)  # again (every 10 s): same place
    assert engine.register_node(NodeAddress("listed:1")) == (0, False)
    assert [str(n.address) for n in engine.fleet.nodes] == ["listed:1", "n1:2,n1:3"]
    assert len(engine.links) == 2 and engine.links[1].node is engine.fleet.nodes[1]
    with pytest.raises(FailedPrecondition, match="restart the scheduler"):
        engine.register_node(NodeAddress("n1:2", "elsewhere:3"))


def test_registration_is_refused_unless_the_scheduler_accepts_nodes() -> None:
    engine = Engine(SchedulerConfig(executor_addr=["listed:1"]))
    with pytest.raises(FailedPrecondition, match="--accept-nodes"):
        engine.register_node(NodeAddress("n1:2"))
    assert len(engine.fleet.nodes) == 1


def test_registering_needs_an_admin_key_and_a_well_formed_address() -> None:
    servicer = FastSwitchServicer(Engine(SchedulerConfig(accept_nodes=True)))

    async def register(principal: Principal | None, executor: str, swapd: str = "") -> api_pb2.RegisterNodeResponse:
        auth.current_principal.set(principal)
        return await servicer.RegisterNode(api_pb2.RegisterNodeRequest(executor_addr=executor, swapd_addr=swapd), None)  # type: ignore[arg-type]

    with pytest.raises(PermissionDeniedError, match="admin key"):
        asyncio.run(register(Principal("alice"), "n:1"))
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        asyncio.run(register(None, "no-port"))
    reply = asyncio.run(register(Principal("ops", admin=True), "n:1", "n:2"))
    assert (reply.index, reply.added) == (0, True)
    assert servicer.engine.fleet.nodes[0].address == NodeAddress("n:1", "n:2")


class Registrar(api_pb2_grpc.FastSwitchServicer):
    """A scheduler that only takes registrations: the first is refused, the others are counted."""

    def __init__(self) -> None:
        self.calls: list[tuple[api_pb2.RegisterNodeRequest, str]] = []

    async def RegisterNode(self, request, context):  # type: ignore[no-untyped-def]
        key = dict(context.invocation_metadata()).get("authorization", "")
        self.calls.append((request, key))
        if len(self.calls) == 1:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not yet")
        return api_pb2.RegisterNodeResponse(index=3, added=len(self.calls) == 2)


def test_an_executor_registers_again_and_again_after_a_refusal_with_its_advertised_addresses() -> None:
    registrar = Registrar()
    with serve_in_thread(lambda server: api_pb2_grpc.add_FastSwitchServicer_to_server(registrar, server)) as addr:
        config = ExecutorConfig(register_with=addr, advertise="node-7:50052,node-7:50053", register_api_key="k-root")

        async def run() -> None:
            task = asyncio.create_task(keep_registered(config, every_s=0.05))
            for _ in range(200):
                if len(registrar.calls) >= 3:
                    break
                await asyncio.sleep(0.05)
            task.cancel()

        asyncio.run(run())
    assert len(registrar.calls) >= 3, "it goes on registering after a refusal"
    request, key = registrar.calls[-1]
    assert (request.executor_addr, request.swapd_addr, key) == ("node-7:50052", "node-7:50053", "Bearer k-root")


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"register_with": "nohost"}, "--register-with must be HOST:PORT"),
        ({"advertise": "a:1,b"}, "--advertise must be"),
    ],
)
def test_bad_registration_settings_are_refused_at_start(settings: dict[str, str], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        ExecutorConfig(**settings).validate()
