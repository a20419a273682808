"""docker-compose.yml stays true: each service's command and environment, run as a local process
(there is no Docker engine here), serves an answer."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import urllib.request

import openai
import pytest
import yaml

from fastswitch import Client
from svc_common.stack import wait_healthy, wait_http_healthy
from tests.conftest import free_port, free_port_base

pytestmark = pytest.mark.model

COMPOSE = pathlib.Path(__file__).resolve().parent.parent / "docker-compose.yml"


def _local_env(services: dict[str, dict], ports: dict[str, int]) -> dict[str, dict[str, str]]:
    """Each service's environment with compose hostnames and ports mapped onto loopback ports."""
    envs: dict[str, dict[str, str]] = {}
    for name, spec in services.items():
        env = {k: str(v) for k, v in (spec.get("environment") or {}).items()}
        for key, value in env.items():
            for other, port in ports.items():
                compose_port = _service_port(services[other])
                if value == f"{other}:{compose_port}":
                    env[key] = f"127.0.0.1:{port}"
            if value == str(_service_port(spec)) and key.endswith("PORT"):
                env[key] = str(ports[name])
        envs[name] = env
    return envs


def _service_port(spec: dict) -> int:
    env = spec.get("environment") or {}
    return next(int(v) for k, v in env.items() if k.endswith("PORT"))


def test_every_compose_service_command_runs_locally_and_answers(model_dir) -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(services) == {"scheduler", "executor", "swapd", "http"}
    base = free_port_base()
    ports = {"scheduler": base, "executor": base + 1, "swapd": base + 2, "http": free_port()}
    envs = _local_env(services, ports)
    assert envs["scheduler"]["FASTSWITCH_EXECUTOR_ADDR"] == f"127.0.0.1:{ports['executor']}"
    assert envs["scheduler"]["FASTSWITCH_SWAPD_ADDR"] == f"127.0.0.1:{ports['swapd']}"
    assert envs["http"]["FASTSWITCH_SCHEDULER_ADDR"] == f"127.0.0.1:{ports['scheduler']}"
    log_dir = tempfile.mkdtemp(prefix="fastswitch-compose-")
    procs = []
    try:
        for name in ("executor", "swapd", "scheduler", "http"):
            command = services[name]["command"]
            assert command[0] == "python"
            log = open(os.path.join(log_dir, f"{name}.log"), "wb")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [sys.executable, *command[1:]],
                    env={**os.environ, **envs[name]},
                    stdout=log,
                    stderr=log,
                )
            )
        for name in ("executor", "swapd", "scheduler"):
            wait_healthy(f"127.0.0.1:{ports[name]}", 300, procs, log_dir)
        with Client(f"127.0.0.1:{ports['scheduler']}") as client:
            answer = client.complete("What is the capital of France?", chat=True, max_tokens=20)
        assert "Paris" in answer.text
        http = f"http://127.0.0.1:{ports['http']}"
        wait_http_healthy(f"{http}/health", 120, procs, log_dir)
        api = openai.OpenAI(base_url=f"{http}/v1", api_key="unused", max_retries=0)
        model = api.models.list().data[0].id
        reply = api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=20,
            temperature=0,
        )  # fmt: skip
        assert reply.choices[0].message.content == answer.text
        with urllib.request.urlopen(f"{http}/metrics", timeout=10) as resp:
            assert b"fastswitch_time_to_first_token_seconds_bucket" in resp.read()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def test_compose_sets_only_variables_its_services_read() -> None:
    from executor_svc.config import ExecutorConfig
    from openai_svc.config import HttpConfig
    from scheduler_svc.config import SchedulerConfig
    from svc_common.settings import env_names
    from swap_daemon.config import SwapDaemonConfig

    reads = {"scheduler": SchedulerConfig, "executor": ExecutorConfig, "swapd": SwapDaemonConfig, "http": HttpConfig}
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, spec in services.items():
        unknown = set(spec.get("environment") or {}) - env_names(reads[name])
        assert not unknown, f"compose sets {sorted(unknown)} on {name}, which reads none of them"
