"""Starts the services as local processes and waits until they are healthy.

`fastswitch up`, the end-to-end tests and the benchmark all start the stack through `Stack`, so they
exercise the same code path.

Ports, from the scheduler's port P: node i (i = 0 .. executors-1) has its executor on P + 1 + 2i and
its swap daemon on P + 2 + 2i. One node is the familiar P+1 / P+2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from executor_svc.config import ExecutorConfig
from openai_svc.config import HttpConfig
from scheduler_svc.config import SchedulerConfig
from svc_common.settings import add_arguments, field_names, parse_value, setting, to_argv
from swap_daemon.config import SwapDaemonConfig


@dataclass(slots=True)
class StackConfig:
    """What `fastswitch up` starts: each service's own config, plus what only the stack decides.

    The services' settings are their config dataclasses (one definition each, see
    `svc_common.settings`); the stack only wires ports and addresses between them.
    """

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    swapd: SwapDaemonConfig | None = field(default_factory=SwapDaemonConfig)  # None: no swap daemon
    http: HttpConfig = field(default_factory=HttpConfig)  # started when http_port is set
    host: str = setting("127.0.0.1", env="FASTSWITCH_HOST", help="address the services bind and reach each other on")
    executors: int = setting(1, env="FASTSWITCH_EXECUTORS", help="executor nodes (executor + swap daemon) to start")
    http_port: int = setting(
        0, env="FASTSWITCH_HTTP_PORT", help="also serve the OpenAI-compatible HTTP API and /metrics here (0: off)"
    )
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.scheduler.port

    @classmethod
    def build(cls, **values: Any) -> StackConfig:
        """From flat settings, named as `fastswitch up` names them: `StackConfig.build(device_blocks=12)`.

        `model` goes to the scheduler (tokenizer) and the executor; `host_blocks=0` (or recompute
        preemption) starts no swap daemon."""
        own = field_names(cls) | {"extra_env"}
        parts: dict[type, dict[str, Any]] = {SchedulerConfig: {}, ExecutorConfig: {}, SwapDaemonConfig: {}}
        parts[HttpConfig] = {}
        unknown = []
        for name, value in values.items():
            targets = [t for t in parts if name in field_names(t) and (name != "port" or t is SchedulerConfig)]
            for t in targets:
                parts[t][name] = value
            if not targets and name not in own:
                unknown.append(name)
        if unknown:
            raise TypeError(f"unknown stack settings: {', '.join(sorted(unknown))}")
        scheduler = SchedulerConfig(**parts[SchedulerConfig])
        swapd = None
        if parts[SwapDaemonConfig].get("host_blocks", 1) > 0 and scheduler.preemption != "recompute":
            swapd = SwapDaemonConfig(**parts[SwapDaemonConfig])
        config = cls(
            scheduler,
            ExecutorConfig(**parts[ExecutorConfig]),
            swapd,
            HttpConfig(**parts[HttpConfig]),
            **{k: v for k, v in values.items() if k in own},
        )
        config.validate()
        return config

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """`fastswitch up`'s flags: every service's settings (the stack wires ports and addresses)."""
        add_arguments(parser, SchedulerConfig, exclude={"executor_addr", "swapd_addr"})
        add_arguments(parser, ExecutorConfig, exclude={"port"})
        add_arguments(parser, SwapDaemonConfig, exclude={"port"})
        add_arguments(parser, HttpConfig, exclude={"port", "bind", "scheduler_addr"})
        add_arguments(parser, cls)

    @classmethod
    def parse_setting(cls, item: str) -> tuple[str, Any]:
        """`NAME=VALUE` (a `fastswitch up` flag's name, with `_` or `-`) as (name, typed value), so that any
        setting can be passed through to `build`: `parse_setting("cuda-graphs=on")` is ("cuda_graphs", True)."""
        name, sep, text = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep or not name:
            raise ValueError(f"{item!r}: expected NAME=VALUE, e.g. attention=triton")
        for config_type in (SchedulerConfig, ExecutorConfig, SwapDaemonConfig, HttpConfig, cls):
            try:
                return name, parse_value(config_type, name, text.strip())
            except KeyError:
                continue
        raise ValueError(f"{name}: no such setting (`fastswitch up --help` lists them)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StackConfig:
        names = field_names(SchedulerConfig) | field_names(ExecutorConfig) | field_names(SwapDaemonConfig)
        names |= (field_names(HttpConfig) - {"port"}) | field_names(cls)
        return cls.build(**{n: getattr(args, n) for n in names if hasattr(args, n)})

    def validate(self) -> None:
        self.scheduler.validate()
        self.executor.validate()
        self.http.validate()
        if not 0 <= self.http_port < 65536:
            raise ValueError(f"HTTP port out of range: {self.http_port}")
        if not 1 <= self.executors <= 64:
            raise ValueError(f"executors must be in 1..64, got {self.executors}")
        if self.port + 2 * self.executors >= 65536:
            raise ValueError(f"port {self.port} leaves no room for {self.executors} nodes (2 ports each above it)")
        if self.http_port and self.port <= self.http_port <= self.port + 2 * self.executors:
            raise ValueError(
                f"http_port {self.http_port} collides with the nodes' ports "
                f"{self.port + 1}..{self.port + 2 * self.executors}: pick one outside that range"
            )

    def node_ports(self, index: int) -> tuple[int, int]:
        """Node `index`'s executor and swap daemon ports (the scheme in the module docstring)."""
        return self.port + 1 + 2 * index, self.port + 2 + 2 * index


def free_port_base(executors: int = 1) -> int:
    """A port p such that p .. p + 2 * executors (scheduler, then each node's executor and swap daemon)
    are free right now."""
    span = 2 * executors
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span < 65536 and all(_port_free(port + i) for i in range(1, span + 1)):
            return port
    raise RuntimeError(f"found no {span + 1} consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_http_healthy(
    url: str, timeout_s: float, procs: list[subprocess.Popen[bytes]] | None = None, log_dir: str | None = None
) -> None:
    """Block until GET url answers 200; raise if a process dies first."""
    deadline = time.monotonic() + timeout_s
    while True:
        _check_alive(procs, log_dir)
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not healthy after {timeout_s:.0f}s")
        time.sleep(0.2)


def _check_alive(procs: list[subprocess.Popen[bytes]] | None, log_dir: str | None) -> None:
    for p in procs or []:
        if p.poll() is not None:
            where = f"; its log is in {log_dir}" if log_dir else ""
            raise RuntimeError(f"{' '.join(map(str, p.args))} exited with code {p.returncode}{where}")


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
            _check_alive(procs, log_dir)
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
    """The scheduler and each node's executor and swap daemon as child processes (and the HTTP front, with
    http_port)."""

    def __init__(self, config: StackConfig, log_dir: str | None = None) -> None:
        config.validate()
        self.config = config
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.named: dict[str, subprocess.Popen[bytes]] = {}  # by `commands()` name
        self._logs: list[object] = []

    @property
    def addr(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    @staticmethod
    def node_names(index: int) -> tuple[str, str]:
        """The names of node `index`'s executor and swap daemon in `commands()` (and their log files)."""
        return ("executor", "swapd") if index == 0 else (f"executor-{index}", f"swapd-{index}")

    @property
    def http_url(self) -> str | None:
        """The HTTP front's base URL (`.../v1` is the OpenAI API), or None when it is off."""
        return f"http://{self.config.host}:{self.config.http_port}" if self.config.http_port else None

    def commands(self) -> dict[str, list[str]]:
        """Each service's command line, derived from its config: every node's executor and swap daemon,
        then the scheduler that drives them."""
        c = self.config
        py = sys.executable
        cmds: dict[str, list[str]] = {}
        nodes = []
        for i in range(c.executors):
            executor_port, swapd_port = c.node_ports(i)
            executor_name, swapd_name = self.node_names(i)
            cmds[executor_name] = [
                py,
                "-m",
                "executor_svc",
                *to_argv(dataclasses.replace(c.executor, port=executor_port)),
            ]
            node = f"{c.host}:{executor_port}"
            if c.swapd is not None:
                cmds[swapd_name] = [py, "-m", "swap_daemon", *to_argv(dataclasses.replace(c.swapd, port=swapd_port))]
                node += f",{c.host}:{swapd_port}"
            nodes.append(node)
        scheduler = dataclasses.replace(c.scheduler, executor_addr=nodes, swapd_addr="")
        cmds["scheduler"] = [py, "-m", "scheduler_svc", *to_argv(scheduler)]
        if c.http_port:
            http = dataclasses.replace(c.http, port=c.http_port, bind=c.host, scheduler_addr=f"{c.host}:{c.port}")
            cmds["http"] = [py, "-m", "openai_svc", *to_argv(http)]
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
                proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)  # type: ignore[arg-type]
                self.procs.append(proc)
                self.named[name] = proc
            wait_healthy(self.addr, timeout_s, self.procs, self.log_dir)
            if self.http_url:
                wait_http_healthy(f"{self.http_url}/health", timeout_s, self.procs, self.log_dir)
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
        self.named = {}
        for f in self._logs:
            f.close()  # type: ignore[attr-defined]
        self._logs = []

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
