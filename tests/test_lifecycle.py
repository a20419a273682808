"""Lifecycle: SIGTERM drains, `fastswitch up` restarts what dies, and a cut stream is never a success.

The cut-stream tests run against a fake FastSwitch server (no model); the others start real stacks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from conftest import serve_in_thread
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastswitch import AsyncClient, Client, IncompleteStream, ServiceUnavailable
from fastswitch.v1 import api_pb2, api_pb2_grpc
from svc_common.stack import free_port_base
from tests.conftest import PROMPTS, running_stack

CUT_TEXT = "half a sent"


class _CuttingServicer(api_pb2_grpc.FastSwitchServicer):
    """Streams one piece of text, then ends the stream OK without a finish reason."""

    async def Generate(
        self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.GenerateResponse]:
        yield api_pb2.GenerateResponse(request_id="cut-1", text=CUT_TEXT, token_ids=[1, 2])


@pytest.fixture(scope="module")
def cutting_server() -> Iterator[str]:
    """A server that cuts its streams, on its own thread (the test talks to it from blocking code)."""
    with serve_in_thread(
        lambda server: api_pb2_grpc.add_FastSwitchServicer_to_server(_CuttingServicer(), server)
    ) as addr:
        yield addr


def test_the_sdk_raises_when_a_stream_ends_without_a_finish_reason(cutting_server) -> None:
    with Client(cutting_server) as client:
        chunks = []
        with pytest.raises(IncompleteStream, match="cut-1 ended without a finish reason"):
            for chunk in client.generate("hello"):
                chunks.append(chunk)
        assert [c.text for c in chunks] == [CUT_TEXT]

    async def run() -> None:
        async with AsyncClient(cutting_server) as client:
            with pytest.raises(IncompleteStream):
                await client.complete("hello")

    asyncio.run(run())


def test_the_cli_exits_non_zero_with_a_message_when_a_stream_is_cut(cutting_server) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastswitch.cli", "generate", "--addr", cutting_server, "hello"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "ended without a finish reason" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--max-tokens", "many", "hi"],
        ["generate", "--no-such-flag", "hi"],
        ["generate", "--tls-ca", "/no/such/ca.pem", "hi"],
        ["up", "--device-blocks", "-1"],
        ["up", "--api-keys", "/no/such/keys"],
        ["up", "--tls-cert", "/etc/hostname"],
        ["scheduler", "--max-waiting", "-1"],
    ],
)
def test_every_bad_flag_or_value_is_one_line_and_exit_2(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "fastswitch.cli", *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert len(out.stderr.strip().splitlines()) == 1 and "error:" in out.stderr, out.stderr


def test_help_shows_defaults_and_environment_variables() -> None:
    for command, wants in (("generate", ["default: 128", "FASTSWITCH_API_KEY"]), ("up", ["FASTSWITCH_MAX_WAITING"])):
        out = subprocess.run(
            [sys.executable, "-m", "fastswitch.cli", command, "--help"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0
        text = " ".join(out.stdout.split())
        assert all(w in text for w in wants), (command, wants)


# -- real stacks ------------------------------------------------------------------------------------


def _service_pid(stack: object, name: str) -> subprocess.Popen[bytes]:
    return stack.procs[stack.names.index(name)]  # type: ignore[attr-defined]


@pytest.mark.model
@pytest.mark.slow
def test_sigterm_drains_live_requests_and_refuses_new_ones(model_dir) -> None:
    with running_stack(device_blocks=64, host_blocks=0, drain_timeout_s=60) as stack:
        scheduler = _service_pid(stack, "scheduler")

        async def run() -> tuple[list[object], object]:
            async with AsyncClient(stack.addr) as client:
                live = [asyncio.create_task(client.complete(p, max_tokens=48, ignore_eos=True)) for p in PROMPTS[:3]]
                while (await client.stats()).get("generated_tokens", 0) < 3:
                    await asyncio.sleep(0.05)
                scheduler.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                try:
                    async with AsyncClient(stack.addr) as newcomer:
                        late: object = await newcomer.complete("too late", max_tokens=2)
                except ServiceUnavailable as err:
                    late = err
                return await asyncio.gather(*live, return_exceptions=True), late

        done, late = asyncio.run(run())
        assert isinstance(late, ServiceUnavailable) and "shutting down" in str(late), late
        assert [getattr(d, "finish_reason", d) for d in done] == ["length"] * 3
        assert all(len(d.token_ids) == 48 for d in done)  # type: ignore[attr-defined]
        assert scheduler.wait(30) == 0


def _children(pid: int) -> dict[str, int]:
    """Service name -> pid of the processes `fastswitch up` (pid) started."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == pid:
            for name in ("scheduler_svc", "executor_svc", "swap_daemon"):
                if name in cmdline:
                    found[name] = int(entry)
    return found


def _health(addr: str) -> int:
    with grpc.insecure_channel(addr) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return -1


@pytest.mark.model
@pytest.mark.slow
def test_up_restarts_a_killed_executor_and_every_generate_completes_with_the_right_text(model_dir, tmp_path) -> None:
    port = free_port_base()
    addr = f"127.0.0.1:{port}"
    up = subprocess.Popen(
        [sys.executable, "-m", "fastswitch.cli", "up", "--port", str(port), "--device-blocks", "128",
         "--host-blocks", "64", "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert "ready" in (up.stdout.readline() if up.stdout else "")
        prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(12)]
        with Client(addr) as client:
            expected = [client.complete(p, max_tokens=24).text for p in prompts]
            tokens_before = client.stats()["generated_tokens"]
        gens = [
            subprocess.Popen(
                [sys.executable, "-m", "fastswitch.cli", "generate", "--addr", addr, "--max-tokens", "24", p],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for p in prompts
        ]
        with Client(addr) as client:
            deadline = time.monotonic() + 120
            while client.stats()["generated_tokens"] < tokens_before + 12:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        os.kill(_children(up.pid)["executor_svc"], signal.SIGKILL)
        seen_not_serving = False
        deadline = time.monotonic() + 300
        while (status := _health(addr)) != health_pb2.HealthCheckResponse.SERVING or not seen_not_serving:
            seen_not_serving |= status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert time.monotonic() < deadline, "the stack did not come back within 300 s"
            time.sleep(0.05)
        outs = [g.communicate(timeout=300) for g in gens]
        for gen, (stdout, stderr), want in zip(gens, outs, expected, strict=True):
            assert gen.returncode == 0, stderr
            assert stdout == want + "\n"
        assert up.poll() is None, "up stopped the stack instead of restarting the executor"
        with Client(addr) as client:
            stats = client.stats()
            assert stats["executor_reconnects"] >= 1
            assert client.complete("The capital of France is", max_tokens=4).finish_reason == "length"
    finally:
        up.send_signal(signal.SIGTERM)
        _, stderr = up.communicate(timeout=60)
    assert "the executor exited (code -9); restarted it" in stderr


def test_supervise_restarts_a_dead_service_after_a_growing_backoff(monkeypatch) -> None:
    from svc_common.stack import Stack, StackConfig

    stack = Stack(StackConfig.build(port=free_port_base(), host_blocks=0))
    dies = [sys.executable, "-c", "import sys; sys.exit(3)"]
    monkeypatch.setattr(stack, "commands", lambda: {"executor": dies})
    stack.names, stack.procs = ["executor"], [stack._spawn("executor", dies)]
    stack.procs[0].wait()
    t = 1000.0
    assert stack.supervise(t) == []  # noticed: restart due after the first backoff
    assert stack.supervise(t + Stack.BACKOFF_S[0] / 2) == []
    first = stack.supervise(t + Stack.BACKOFF_S[0])
    assert [(r.name, r.exit_code) for r in first] == [("executor", 3)]
    stack.procs[0].wait()
    t2 = t + 10
    assert stack.supervise(t2) == []
    assert stack.supervise(t2 + Stack.BACKOFF_S[0]) == []  # the second death waits longer
    assert len(stack.supervise(t2 + Stack.BACKOFF_S[1])) == 1
    stack.procs[0].wait()
