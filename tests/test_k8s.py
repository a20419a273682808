"""The Kubernetes manifests (deploy/k8s/) are valid against the API's schemas (kubernetes-validate,
offline) and wired as the design says: one scheduler behind a Service, which every node joins by its
stable name; a node is one pod of an executor and its swap daemon sharing a memory-backed /dev/shm, with a GPU
and gRPC probes on the ports the services listen on."""

from __future__ import annotations

import pathlib

import kubernetes_validate
import pytest
import yaml

from executor_svc.config import ExecutorConfig
from scheduler_svc.config import SchedulerConfig
from svc_common.settings import parse_value

K8S = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "k8s"


def _documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str, name: str) -> dict:
    found = [d for d in _documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"one {kind} {name}"
    return found[0]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


@pytest.mark.parametrize("doc", _documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_is_valid_against_the_kubernetes_schema(doc: dict) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_an_invalid_manifest_is_caught() -> None:
    """The validator is not a rubber stamp: a probe port of the wrong type fails."""
    broken = _one("Deployment", "fastswitch-scheduler")
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_every_node_registers_with_the_scheduler_by_its_stable_name() -> None:
    scheduler = _one("Deployment", "fastswitch-scheduler")
    nodes = _one("StatefulSet", "fastswitch-node")
    headless = _one("Service", nodes["spec"]["serviceName"])
    service = _one("Service", "fastswitch")
    assert headless["spec"]["clusterIP"] == "None"
    assert scheduler["spec"]["replicas"] == 1
    env = _env(scheduler["spec"]["template"]["spec"]["containers"][0])
    assert parse_value(SchedulerConfig, "accept_nodes", env["FASTSWITCH_ACCEPT_NODES"]) is True
    assert "FASTSWITCH_EXECUTOR_ADDR" not in env, "the nodes join by themselves"
    executor = next(c for c in nodes["spec"]["template"]["spec"]["containers"] if c["name"] == "executor")
    node_env = _env(executor)
    assert node_env["FASTSWITCH_REGISTER_WITH"] == f"{service['metadata']['name']}:{int(env['FASTSWITCH_PORT'])}"
    pod_name = next(e for e in executor["env"] if e["name"] == "POD_NAME")
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Kubernetes expands $(POD_NAME) (defined before it): pod i advertises its own stable name.
    pod = f"fastswitch-node-1.{headless['metadata']['name']}"
    advertised = node_env["FASTSWITCH_ADVERTISE"].replace("$(POD_NAME)", "fastswitch-node-1")
    assert advertised == f"{pod}:50052,{pod}:50053"
    assert [e["name"] for e in executor["env"]].index("POD_NAME") < [e["name"] for e in executor["env"]].index(
        "FASTSWITCH_ADVERTISE"
    )
    config = ExecutorConfig(advertise=advertised, register_with=node_env["FASTSWITCH_REGISTER_WITH"])
    config.validate()
    assert service["spec"]["selector"] == scheduler["spec"]["template"]["metadata"]["labels"]


def test_a_node_pod_is_an_executor_and_its_swap_daemon_sharing_memory_with_probes_and_a_gpu() -> None:
    pod = _one("StatefulSet", "fastswitch-node")["spec"]["template"]["spec"]
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"executor", "swapd"}
    ports = {"executor": ("FASTSWITCH_EXECUTOR_PORT", ["python", "-m", "executor_svc"]),
             "swapd": ("FASTSWITCH_SWAPD_PORT", ["python", "-m", "swap_daemon"])}  # fmt: skip
    for name, (port_env, command) in ports.items():
        c = containers[name]
        assert c["command"] == command
        port = int(_env(c)[port_env])
        assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"], name
        assert c["readinessProbe"]["grpc"]["port"] == c["livenessProbe"]["grpc"]["port"] == port, name
        assert [p["containerPort"] for p in c["ports"]] == [port]
    gpu = containers["executor"]["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == 1
