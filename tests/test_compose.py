"""docker-compose.yml stays true: each service's command and environment, run as a local process
(there is no Docker engine here), serves an answer, through both nodes; its health checks pass against
those processes; the GPU variant reserves one GPU per node."""

from __future__ import annotations

import os
import pathlib
import re
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

COMPOSE = pathlib.Path(__file__).resolve().parent.parent / "docker-compose.yml"


def _local_env(services: dict[str, dict], ports: dict[str, int]) -> dict[str, dict[str, str]]:
    """Each service's environment with compose hostnames and ports mapped onto loopback ports."""
    envs: dict[str, dict[str, str]] = {}
    for name, spec in services.items():
        env = {k: str(v) for k, v in (spec.get("environment") or {}).items()}
        for key, value in env.items():
            # Every `service:port` in the value (a list of nodes names several) becomes its loopback port.
            env[key] = re.sub(
                r"([a-z][a-z0-9-]*):(\d+)",
                lambda m: f"127.0.0.1:{ports[m[1]]}" if m[1] in ports else m[0],
                value,
            )
            if value == str(_service_port(spec)) and key.endswith("PORT"):
                env[key] = str(ports[name])
        envs[name] = env
    return envs


def _service_port(spec: dict) -> int:
    env = spec.get("environment") or {}
    return next(int(v) for k, v in env.items() if k.endswith("PORT"))


def _health_command(spec: dict, port: int, compose_port: int) -> list[str]:
    """The service's health check as a local command, pointed at its loopback port."""
    test = spec["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python", test
    return [sys.executable, *(arg.replace(f"localhost:{compose_port}", f"127.0.0.1:{port}") for arg in test[2:])]


@pytest.mark.model
@pytest.mark.slow
def test_every_compose_service_command_runs_locally_and_answers(model_dir) -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(services) == {"scheduler", "executor", "swapd", "executor-1", "swapd-1", "http"}
    base = free_port_base(executors=2)
    ports = {
        "scheduler": base, "executor": base + 1, "swapd": base + 2, "executor-1": base + 3, "swapd-1": base + 4,
        "http": free_port(),
    }  # fmt: skip
    envs = _local_env(services, ports)
    assert envs["scheduler"]["FASTSWITCH_EXECUTOR_ADDR"].split() == [
        f"127.0.0.1:{ports['executor']},127.0.0.1:{ports['swapd']}",
        f"127.0.0.1:{ports['executor-1']},127.0.0.1:{ports['swapd-1']}",
    ]
    assert envs["http"]["FASTSWITCH_SCHEDULER_ADDR"] == f"127.0.0.1:{ports['scheduler']}"
    for name, spec in services.items():
        assert spec["restart"] == "unless-stopped" and spec["healthcheck"]["test"], name
    log_dir = tempfile.mkdtemp(prefix="fastswitch-compose-")
    procs = []
    try:
        for name in ("executor", "swapd", "executor-1", "swapd-1", "scheduler", "http"):
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
        for name in ("executor", "swapd", "executor-1", "swapd-1", "scheduler"):
            wait_healthy(f"127.0.0.1:{ports[name]}", 300, procs, log_dir)
            check = _health_command(services[name], ports[name], _service_port(services[name]))
            assert subprocess.run(check, capture_output=True, timeout=60).returncode == 0, name
        with Client(f"127.0.0.1:{ports['scheduler']}") as client:
            answer = client.complete("What is the capital of France?", chat=True, max_tokens=20)
            nodes = client.stats()["executors"]
        assert "Paris" in answer.text
        assert [n["state"] for n in nodes] == ["up", "up"], "the scheduler drives both nodes"
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
        http_check = services["http"]["healthcheck"]["test"]
        probe = [sys.executable, *(a.replace("localhost:8000", f"127.0.0.1:{ports['http']}") for a in http_check[2:])]
        assert subprocess.run(probe, capture_output=True, timeout=60).returncode == 0
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
    reads |= {"executor-1": ExecutorConfig, "swapd-1": SwapDaemonConfig}
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, spec in services.items():
        unknown = set(spec.get("environment") or {}) - env_names(reads[name])
        assert not unknown, f"compose sets {sorted(unknown)} on {name}, which reads none of them"


def test_the_healthcheck_fails_where_nothing_serves() -> None:
    probe = [sys.executable, "-m", "svc_common.healthcheck", f"127.0.0.1:{free_port()}", "--timeout", "1"]
    failed = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "UNAVAILABLE" in failed.stderr


def test_the_gpu_variant_reserves_one_gpu_per_node_and_builds_on_cuda() -> None:
    services = yaml.safe_load((COMPOSE.parent / "docker-compose.gpu.yml").read_text())["services"]
    assert set(services) <= set(yaml.safe_load(COMPOSE.read_text())["services"]), "it overrides, adds nothing"
    gpus = {}
    for name, spec in services.items():
        assert spec["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:") and spec["image"] == "fastswitch:cuda"
        for device in spec.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []):
            assert device["capabilities"] == ["gpu"]
            gpus[name] = device["device_ids"]
    assert gpus == {"executor": ["0"], "swapd": ["0"], "executor-1": ["1"], "swapd-1": ["1"]}
    assert all(services[n]["environment"]["FASTSWITCH_DEVICE"] == "cuda" for n in ("executor", "executor-1"))
