"""Starts the three services as local processes and waits until they are healthy.

`fastswitch up`, the end-to-end tests and the benchmark all start the stack through `Stack`, so they
exercise the same code path.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass(slots=True)
class StackConfig:
    port: int = 50051
    model: str = ""
    block_size: int = 16
    device_blocks: int = 1024
    host_blocks: int = 4096
    policy: str = "fcfs"
    preemption: str = "swap"
    priority_updates: str = "none"
    priority_update_prob: float = 0.0
    executors: int = 1
    max_running: int = 64
    max_step_tokens: int = 256
    threads: int = 0
    conversation_host_blocks: int = 0
    conversation_ttl_s: float = 600.0
    block_groups: bool = True
    async_swaps: bool = True
    kv_reuse: bool = True
    host: str = "127.0.0.1"
    extra_env: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.executors != 1:
            raise ValueError("this version drives exactly one executor (--executors 1)")
        if self.host_blocks < 0:
            raise ValueError(f"host blocks must be >= 0, got {self.host_blocks}")


def free_port_base() -> int:
    """A port p such that p, p+1 and p+2 (scheduler, executor, swap daemon) are free right now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 2 < 65536 and all(_port_free(port + i) for i in (1, 2)):
            return port
    raise RuntimeError("found no three consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_healthy(
    addr: str,
    timeout_s: float,
    procs: list[subprocess.Popen[bytes]] | None = None,
    log_dir: str | None = None,
) -> None:
    """Block until the gRPC health service at addr says SERVING; raise if a process dies first."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            for p in procs or []:
                if p.poll() is not None:
                    where = f"; its log is in {log_dir}" if log_dir else ""
                    raise RuntimeError(f"{' '.join(map(str, p.args))} exited with code {p.returncode}{where}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{addr} not healthy after {timeout_s:.0f}s")
            time.sleep(0.2)


class Stack:
    """The scheduler, one executor and one swap daemon as child processes."""

    def __init__(self, config: StackConfig, log_dir: str | None = None) -> None:
        config.validate()
        self.config = config
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[object] = []

    @property
    def addr(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def commands(self) -> dict[str, list[str]]:
        c = self.config
        py = sys.executable
        executor_port, swapd_port = c.port + 1, c.port + 2
        cmds = {
            "executor": [
                py, "-m", "executor_svc", "--port", str(executor_port), "--model", c.model,
                "--block-size", str(c.block_size), "--device-blocks", str(c.device_blocks),
                "--threads", str(c.threads),
            ],
            "scheduler": [
                py, "-m", "scheduler_svc", "--port", str(c.port), "--executor", f"{c.host}:{executor_port}",
                "--model", c.model, "--policy", c.policy, "--preemption", c.preemption,
                "--max-running", str(c.max_running), "--max-step-tokens", str(c.max_step_tokens),
                "--priority-updates", c.priority_updates, "--priority-update-prob", str(c.priority_update_prob),
                "--conversation-host-blocks", str(c.conversation_host_blocks),
                "--conversation-ttl", str(c.conversation_ttl_s),
            ],
        }  # fmt: skip
        ablations = {"--no-block-groups": c.block_groups, "--sync-swaps": c.async_swaps, "--no-kv-reuse": c.kv_reuse}
        cmds["scheduler"] += [flag for flag, on in ablations.items() if not on]
        if c.host_blocks > 0 and c.preemption != "recompute":
            cmds["swapd"] = [
                py,
                "-m",
                "swap_daemon",
                "--port",
                str(swapd_port),
                "--host-blocks",
                str(c.host_blocks),
            ]
            cmds["scheduler"] += ["--swapd", f"{c.host}:{swapd_port}"]
        return cmds

    def start(self, timeout_s: float = 300.0) -> str:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.config.extra_env}
        try:
            for name, cmd in self.commands().items():
                out: int | object = subprocess.DEVNULL
                if self.log_dir:
                    os.makedirs(self.log_dir, exist_ok=True)
                    out = open(os.path.join(self.log_dir, f"{name}.log"), "wb")  # noqa: SIM115
                    self._logs.append(out)
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=out))  # type: ignore[arg-type]
            wait_healthy(self.addr, timeout_s, self.procs, self.log_dir)
        except BaseException:
            self.stop()
            raise
        return self.addr

    def stop(self, timeout_s: float = 15.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        for f in self._logs:
            f.close()  # type: ignore[attr-defined]
        self._logs = []

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
