"""A TorchServe replica: its config.properties, its own temp and log folders, its ports.

Each replica gets its own TMPDIR (TorchServe keeps its pid file and worker sockets
there) and its own ``initial_worker_port``, so several replicas share one machine.
The config is ``torchserve/replicas/replica.properties`` with this replica's ports,
paths and bind address filled in (loopback here; why token auth is off: the template),
followed
by its model section: the committed ``{role}.properties`` beside it for the primary,
secondary and challenger, or one rendered by ``ModelServing`` (replay, benchmarks).
"""

from __future__ import annotations

import json
import os
import string
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from core.processes import ManagedProcess, niced, start_ready
from feature_cache.schema import MODEL_INPUT_WIDTH, pack_rows
from proto.third_party.torchserve import inference_pb2, inference_pb2_grpc


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
        """The README's ports: 7070/7071 and 8080/8081/8082 for the primary, +100 per replica."""
        return cls(base_grpc, base_grpc + 1, base_rest, base_rest + 1, base_rest + 2, worker)

    def shifted(self, offset: int) -> ReplicaPorts:
        """Every port moved by ``offset``: a second stack on the same machine."""
        return ReplicaPorts(*(port + offset for port in asdict(self).values()))


PRIMARY_PORTS = ReplicaPorts.from_base(7070, 8080, 9000)
SECONDARY_PORTS = ReplicaPorts.from_base(7170, 8180, 9100)
CHALLENGER_PORTS = ReplicaPorts.from_base(7270, 8280, 9200)


CONFIG_DIR = Path(__file__).resolve().parent / "replicas"
CONFIG_TEMPLATE = CONFIG_DIR / "replica.properties"
LOG_CONFIG = CONFIG_DIR / "log4j2.xml"
ROLES = ("primary", "secondary", "challenger")


@dataclass(frozen=True)
class ModelServing:
    """One model's section of a replica config (TorchServe's ``models`` property)."""

    model_name: str = "champion"
    batch_size: int = 1
    max_batch_delay_ms: int = 0
    workers: int = 1
    mar_name: str | None = None  # default: ``{model_name}.mar``
    # As the committed sections set it (why: replica.properties): a worker holding a job
    # this long on the wall clock is restarted, so a paused replica's must outlast a pause.
    response_timeout_s: int = 60

    def properties(self) -> str:
        mar = self.mar_name or f"{self.model_name}.mar"
        config = {
            self.model_name: {
                "1.0": {
                    "defaultVersion": True,
                    "marName": mar,
                    "minWorkers": self.workers,
                    "maxWorkers": self.workers,
                    "batchSize": self.batch_size,
                    "maxBatchDelay": self.max_batch_delay_ms,
                    "responseTimeout": self.response_timeout_s,
                }
            }
        }
        return (
            f"load_models={self.model_name}={mar}\n"
            f"models={json.dumps(config, separators=(',', ':'))}\n"
        )


def role_section(role: str) -> str:
    """The committed model section of a replica role (primary, secondary, challenger)."""
    if role not in ROLES:
        raise ValueError(f"unknown replica role {role!r}; one of {', '.join(ROLES)}")
    return (CONFIG_DIR / f"{role}.properties").read_text()


def config_properties(
    ports: ReplicaPorts, model_store: Path, model_section: str, *, bind_address: str = "127.0.0.1"
) -> str:
    """The replica's config.properties: the shared template, then its model section.

    ``bind_address``: where the inference and metrics APIs listen (management stays on
    loopback): loopback on one machine, ``0.0.0.0`` in a container.
    """
    template = string.Template(CONFIG_TEMPLATE.read_text())
    common = template.substitute(
        asdict(ports), model_store=str(model_store), bind_address=bind_address
    )
    return f"{common}\n{model_section}"


def replica_dir(run_dir: Path, name: str) -> Path:
    """Where ``torchserve_replica`` keeps replica ``name``'s config, temp files and logs."""
    return run_dir / name


def torchserve_replica(
    name: str,
    ports: ReplicaPorts,
    model_store: Path,
    run_dir: Path,
    *,
    model_section: str | None = None,
    niceness: int = 0,
    log_config: Path = LOG_CONFIG,
) -> ManagedProcess:
    """The replica ``name`` (not started); its model section is ``role_section(name)``
    unless one is given; ``niceness``: its CPU priority (``nice``), JVM and workers too;
    ``log_config``: TorchServe's log4j2 configuration."""
    folder = replica_dir(run_dir, name)
    tmp_dir = folder / "tmp"
    logs_dir = folder / "logs"
    for made in (tmp_dir, logs_dir):
        made.mkdir(parents=True, exist_ok=True)
    config = folder / "config.properties"
    section = role_section(name) if model_section is None else model_section
    config.write_text(config_properties(ports, model_store, section))
    launcher = Path(sys.executable).with_name("torchserve")
    argv = [
        str(launcher),
        "--foreground",
        "--ncs",
        "--disable-token-auth",
        "--ts-config", str(config),
        "--log-config", str(log_config),
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
        f"torchserve-{name}",
        niced(argv, niceness),
        cwd=folder,
        log_path=logs_dir / "stdout.log",
        env=env,
    )


# TorchServe's frontend logs this each time a worker's backend connection closes: a
# crashed or killed worker, or one whose gRPC call was cancelled (pytorch/serve 1888,
# 3087). Most such workers are started again ("Retry worker"); in TorchServe 0.12 some
# were not within the 7 minutes watched, and the replica answered no call meanwhile:
# counting restarts missed those. A worker stopped on purpose (scaled down) is not lost.
WORKER_LOST_LINE = "Worker disconnected"
WORKER_STOPPED_ON_PURPOSE = "WORKER_SCALED_DOWN"


def workers_lost(replica_dir: Path) -> int:
    """Workers the replica in ``replica_dir`` has lost, restarted or not, as its frontend's
    log (``logs/ts_log.log``, kept across starts of the replica: compare two counts) says."""
    count = 0
    for log_path in sorted((replica_dir / "logs").glob("ts_log*.log")):  # with rolled ones
        with log_path.open(errors="replace") as lines:
            count += sum(
                WORKER_LOST_LINE in line and WORKER_STOPPED_ON_PURPOSE not in line for line in lines
            )
    return count


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


# Long enough for a cold first call on a busy machine: a warm-up call is never cut short.
WARM_UP_CALL_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class WarmUp:
    calls: int
    problem: str = ""  # why it stopped early, when a call failed


def warm_up_replica(
    address: str, model_name: str = "champion", *, calls: int = 2000, max_s: float = 15.0
) -> WarmUp:
    """Scores ``calls`` small batches (four at a time, for at most ``max_s``).

    A fresh JVM interprets until it has compiled its hot paths (with C1 only, as
    ``replica.properties`` sets, within these calls), and until then a call takes
    several times longer: a stack that took decisions from the first second timed out
    half of its model calls in its first minute. Warming up is an
    optimisation, so a failed call ends it with the reason rather than the stack's start;
    and its calls are never cut short (a cancelled call can cost TorchServe its worker).
    """
    rows = [[0.0] * MODEL_INPUT_WIDTH]
    requests = [
        inference_pb2.PredictionsRequest(model_name=model_name, input={"rows": pack_rows(rows * n)})
        for n in (1, 2, 4, 8)
    ]
    stop_at = time.monotonic() + max_s
    made = 0
    with grpc.insecure_channel(address) as channel:
        predict = inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions
        while made < calls and time.monotonic() < stop_at:
            in_flight = [
                predict.future(request, timeout=WARM_UP_CALL_TIMEOUT_S) for request in requests
            ]
            # Every call is waited for, failed or not: closing the channel on the first
            # failure would cancel the others.
            failures = [call.exception() for call in in_flight]
            failed = next((exc for exc in failures if exc is not None), None)
            if isinstance(failed, grpc.RpcError) and isinstance(failed, grpc.Call):
                return WarmUp(made, f"{failed.code().name.lower()}: {failed.details()}")
            if failed is not None:
                return WarmUp(made, repr(failed))
            made += len(in_flight)
    return WarmUp(made)


def start_replica(
    proc: ManagedProcess,
    ports: ReplicaPorts,
    *,
    model_name: str = "champion",
    timeout_s: float = 90.0,
) -> None:
    address = f"127.0.0.1:{ports.grpc_inference}"
    start_ready(proc, lambda: torchserve_ready(address, model_name), timeout_s)
