"""A TorchServe replica: its config.properties, its own temp and log folders, its ports.

Each replica gets its own TMPDIR (TorchServe keeps its pid file and worker sockets
there) and its own ``initial_worker_port``, so several replicas share one machine.
The config is ``torchserve/replicas/replica.properties`` with this replica's ports and
paths filled in; token auth is off there because every address is loopback.
"""

from __future__ import annotations

import os
import string
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from feature_cache.schema import MODEL_INPUT_WIDTH
from proto.third_party.torchserve import inference_pb2, inference_pb2_grpc
from server.localstack.processes import ManagedProcess, start_ready
from server.model_client import pack_rows


@dataclass(frozen=True)
class ReplicaPorts:
    grpc_inference: int
    grpc_management: int
    rest_inference: int
    rest_management: int
    rest_metrics: int
    initial_worker: int

    @classmethod
    def from_base(cls, base_grpc: int, base_rest: int, worker: int) -> ReplicaPorts:
        """DESIGN.md's scheme: 7070/7071 and 8080/8081/8082 for the primary, +100 per replica."""
        return cls(base_grpc, base_grpc + 1, base_rest, base_rest + 1, base_rest + 2, worker)

    def shifted(self, offset: int) -> ReplicaPorts:
        """Every port moved by ``offset``: a second stack on the same machine."""
        return ReplicaPorts(*(port + offset for port in asdict(self).values()))


PRIMARY_PORTS = ReplicaPorts.from_base(7070, 8080, 9000)
SECONDARY_PORTS = ReplicaPorts.from_base(7170, 8180, 9100)


CONFIG_TEMPLATE = Path(__file__).resolve().parents[2] / "torchserve/replicas/replica.properties"


def config_properties(ports: ReplicaPorts, model_store: Path, models: str, workers: int) -> str:
    """The replica's config.properties, from the committed template."""
    template = string.Template(CONFIG_TEMPLATE.read_text())
    return template.substitute(
        asdict(ports), model_store=str(model_store), models=models, workers=workers
    )


def torchserve_replica(
    name: str,
    ports: ReplicaPorts,
    model_store: Path,
    run_dir: Path,
    *,
    models: str = "champion=champion.mar",
    workers: int = 1,
) -> ManagedProcess:
    replica_dir = run_dir / name
    tmp_dir = replica_dir / "tmp"
    logs_dir = replica_dir / "logs"
    for folder in (tmp_dir, logs_dir):
        folder.mkdir(parents=True, exist_ok=True)
    config = replica_dir / "config.properties"
    config.write_text(config_properties(ports, model_store, models, workers))
    launcher = Path(sys.executable).with_name("torchserve")
    argv = [
        str(launcher),
        "--foreground",
        "--ncs",
        "--disable-token-auth",
        "--ts-config", str(config),
        "--model-store", str(model_store),
    ]  # fmt: skip
    env = {
        **os.environ,
        "TMPDIR": str(tmp_dir),
        "TEMP": str(tmp_dir),
        "LOG_LOCATION": str(logs_dir),
        "METRICS_LOCATION": str(logs_dir),
    }
    return ManagedProcess(
        f"torchserve-{name}", argv, cwd=replica_dir, log_path=logs_dir / "stdout.log", env=env
    )


def torchserve_ready(address: str, model_name: str = "champion") -> bool:
    """True once the replica is Healthy and has scored one row.

    The first prediction through a new JVM takes about a second (class loading, JIT);
    readiness pays for it so that the first real decision does not.
    """
    try:
        with grpc.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            if "Healthy" not in stub.Ping(empty_pb2.Empty(), timeout=1.0).health:
                return False
            request = inference_pb2.PredictionsRequest(
                model_name=model_name, input={"rows": pack_rows([[0.0] * MODEL_INPUT_WIDTH])}
            )
            return b'"scores"' in stub.Predictions(request, timeout=10.0).prediction
    except grpc.RpcError:
        return False


def start_replica(proc: ManagedProcess, ports: ReplicaPorts, *, timeout_s: float = 90.0) -> None:
    address = f"127.0.0.1:{ports.grpc_inference}"
    start_ready(proc, lambda: torchserve_ready(address), timeout_s)
