"""The images `make images` built, run as Kubernetes runs them (make test-images; not in
make test: building the images takes several minutes). Each model server's image alone:
its own uid, a read-only root file system, ready on the Open Inference Protocol. Then the
decision pod played by podman from the local overlay's rendered manifests, with the
feature-cache consumer, Redis, the broker and the replayer: a Decide answered by the
sidecar's model on the replayed market data, and readiness NOT_SERVING while the sidecar
is stopped."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decision_client.v1 import decision_pb2, decision_pb2_grpc
from k8s.podman import IMAGES, LocalPod, check, environment, local_pod, podman, sbom
from tests.server.conftest import buy

pytestmark = [pytest.mark.images, pytest.mark.integration, pytest.mark.timeout(600)]

DECISION_SERVICE = "decision.v1.DecisionService"


@pytest.mark.parametrize("name", [name for name, image in IMAGES.items() if image.model])
def test_a_model_server_image_is_ready_on_oip_as_its_own_user_on_a_read_only_root(name):
    check(IMAGES[name])  # raises when it is not ready, or runs as another uid


def test_the_model_server_images_sbom_lists_its_python_packages_with_versions(tmp_path):
    out = tmp_path / "model-server.cdx.json"
    sbom(IMAGES["model-server"], "localhost/model-server:local", out)
    document = json.loads(out.read_text())
    assert document["bomFormat"] == "CycloneDX"
    versions = {c["name"]: c["version"] for c in document["components"]}
    assert versions["torch"].startswith("2.13.0") and versions["grpcio"] == "1.85.1"
    assert versions["decision-service"] and "torchserve" in versions


@pytest.fixture(scope="module")
def pod() -> Iterator[LocalPod]:
    with local_pod() as played:
        yield played


def health(pod: LocalPod, service: str = DECISION_SERVICE) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{pod.ports['grpc']}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError as error:
            return str(error.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


def until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.5)


def decide(pod: LocalPod) -> decision_pb2.DecideResponse:
    with grpc.insecure_channel(f"127.0.0.1:{pod.ports['grpc']}") as channel:
        return decision_pb2_grpc.DecisionServiceStub(channel).Decide(buy(), timeout=2)


def test_the_decision_pod_decides_with_its_sidecar_and_leaves_readiness_while_it_is_stopped(pod):
    until(lambda: health(pod) == "SERVING", 300, "the pod's decision server is ready")
    # Its containers run as the manifests say: their own uid, a read-only root.
    containers = (("decision-server", "10001"), ("torchserve", "10002"), ("feature-cache", "10001"))
    for container, uid in containers:
        name = pod.container(container)
        assert podman("exec", name, "id", "-u", capture=True).strip() == uid
        touched = subprocess.run(
            ["podman", "exec", name, "touch", "/opt/written"],
            env=environment(), capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert touched.returncode != 0 and "Read-only file system" in touched.stderr

    # On features the replayer published through the broker and the consumer wrote to Redis.
    until(lambda: decide(pod).source == decision_pb2.SOURCE_PRIMARY, 60, "the sidecar decides")

    podman("stop", "--time", "10", pod.container("torchserve"), capture=True)
    until(lambda: health(pod) == "NOT_SERVING", 30, "readiness says NOT_SERVING")
    assert health(pod, "") == "SERVING"  # liveness: the server itself is fine
    assert decide(pod).source != decision_pb2.SOURCE_PRIMARY  # the ladder answers meanwhile

    podman("start", pod.container("torchserve"), capture=True)
    until(lambda: health(pod) == "SERVING", 180, "readiness is back once the sidecar is")
    until(lambda: decide(pod).source == decision_pb2.SOURCE_PRIMARY, 60, "the sidecar decides")
