"""The local pod's manifest (k8s/podman.py's ``pod_manifest``) from the local overlay, as
podman kube play would take it; tests/images plays it."""

from __future__ import annotations

import pytest

from k8s.podman import POD_DEPLOYMENTS, pod_manifest
from k8s.render import Object, one, pod_spec, render_overlay

HOST_PORTS = {"grpc": 41001, "redis": 41002}


@pytest.fixture(scope="module")
def objects() -> list[Object]:
    return render_overlay("local")


@pytest.fixture(scope="module")
def pod(objects: list[Object]) -> Object:
    return pod_manifest(objects, "token", HOST_PORTS, "secret")


def test_the_pod_runs_every_container_of_its_deployments_as_their_manifests_say(objects, pod):
    played = {c["name"]: c for c in pod["spec"]["containers"] + pod["spec"]["initContainers"]}
    for deployment in POD_DEPLOYMENTS:
        spec = pod_spec(one(objects, "Deployment", deployment))
        for container in spec["containers"] + spec.get("initContainers", []):
            assert played[container["name"]]["image"].startswith("localhost/")
            assert played[container["name"]]["securityContext"] == container["securityContext"]
    assert len(played) == sum(
        len(pod_spec(one(objects, "Deployment", d))["containers"])
        + len(pod_spec(one(objects, "Deployment", d)).get("initContainers", []))
        for d in POD_DEPLOYMENTS
    )
    # The sidecar is an ordinary container; the init container that finishes stays one.
    assert "torchserve" in {c["name"] for c in pod["spec"]["containers"]}
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["model-references"]


def test_each_container_reaches_the_others_on_loopback_on_ports_of_its_own(pod):
    env = {
        (c["name"], var["name"]): var["value"]
        for c in pod["spec"]["containers"]
        for var in c.get("env", [])
    }
    for container in ("decision-server", "feature-cache", "replayer"):
        assert env[(container, "DECISION_KAFKA__BOOTSTRAP_SERVERS")] == "127.0.0.1:9092"
    for container in ("decision-server", "feature-cache"):
        assert env[(container, "DECISION_REDIS__URL")] == "redis://:secret@127.0.0.1:6379/0"
    ports = [p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
    assert len(ports) == len(set(ports))
    published = {
        p["name"]: (p["hostIP"], p["hostPort"])
        for c in pod["spec"]["containers"]
        for p in c.get("ports", [])
        if "hostPort" in p
    }
    assert published == {name: ("127.0.0.1", port) for name, port in HOST_PORTS.items()}


def test_every_mount_is_of_a_volume_of_the_pod_and_scratch_space_is_tmpfs(pod):
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for container in pod["spec"]["containers"] + pod["spec"]["initContainers"]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, (container["name"], mount["name"])
    assert "feature-cache-tmp" in volumes and "market-data-broker-data" in volumes
    assert not any("emptyDir" in v for v in volumes.values())
