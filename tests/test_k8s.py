"""The Kubernetes manifests (deploy/k8s/) are valid against the API's schemas (kubernetes-validate,
offline) and wired as the design says: one scheduler behind a Service driving every node by its stable
name; a node is one pod of an executor and its swap daemon sharing a memory-backed /dev/shm, with a GPU
and gRPC probes on the ports the services listen on."""

from __future__ import annotations

import pathlib

import kubernetes_validate
import pytest
import yaml

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
    return {e["name"]: e["value"] for e in container.get("env", [])}


@pytest.mark.parametrize("doc", _documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_is_valid_against_the_kubernetes_schema(doc: dict) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_an_invalid_manifest_is_caught() -> None:
    """The validator is not a rubber stamp: a probe port of the wrong type fails."""
    broken = _one("Deployment", "fastswitch-scheduler")
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_the_scheduler_drives_every_node_by_its_stable_name() -> None:
    scheduler = _one("Deployment", "fastswitch-scheduler")
    nodes = _one("StatefulSet", "fastswitch-node")
    headless = _one("Service", nodes["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert scheduler["spec"]["replicas"] == 1
    container = scheduler["spec"]["template"]["spec"]["containers"][0]
    addrs = _env(container)["FASTSWITCH_EXECUTOR_ADDR"].split()
    pods = [f"fastswitch-node-{i}.{headless['metadata']['name']}" for i in range(nodes["spec"]["replicas"])]
    assert addrs == [f"{pod}:50052,{pod}:50053" for pod in pods]
    service = _one("Service", "fastswitch")
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
