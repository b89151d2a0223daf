"""Session fixtures that start real processes on free loopback ports and always stop them."""

from __future__ import annotations

import fcntl
import gc
import signal
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from core.processes import ManagedProcess, free_port, free_ports, stop_all
from localstack.kafka_broker import start_kafka_broker
from localstack.redis_server import start_redis
from localstack.stack import decision_server
from torchserve.archive import ArchiveInfo, archive_meta
from torchserve.models import ensure_models
from torchserve.replica import ReplicaPorts, replica_dir, start_replica, torchserve_replica

REPO = Path(__file__).resolve().parents[1]


def stop_as_interrupted(signum: int, frame: FrameType | None) -> None:
    # Once: a second SIGTERM (a runner escalating) must not cut the teardown short. Not
    # SIG_IGN, which the processes the teardown still starts would inherit.
    signal.signal(signal.SIGTERM, lambda *_: None)
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def pytest_configure(config: pytest.Config) -> None:
    # CI stops a job with SIGTERM, whose default ends pytest at once: the session's
    # redis-server, broker and TorchServe replicas (each in a process group of its own, out
    # of reach of a signal to pytest's group) would outlive it. Raised as Ctrl-C's
    # KeyboardInterrupt, pytest stops the test and tears every fixture down first.
    signal.signal(signal.SIGTERM, stop_as_interrupted)


def pytest_collection_finish(session: pytest.Session) -> None:
    # What collection imported (about 360,000 objects) lives as long as the session; like
    # the server after start-up (server/__main__.py), it is kept out of the cyclic
    # collector's full passes, which otherwise stall an in-process server's event loop for
    # 200-400 ms in the middle of a test's calls.
    gc.collect()
    gc.freeze()


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Polls ``condition`` until it holds; fails the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def server_process(
    name: str,
    run_dir: Path,
    *,
    port: int,
    redis_url: str,
    key_prefix: str,
    primary: str,
    secondary: str,
    **settings: str,
) -> ManagedProcess:
    """A decision server process (``localstack.stack.decision_server``, not started) on
    the test's Redis key prefix and replicas (``host:port``), with its journal, SQLite
    store and ``server.log`` under ``run_dir``; ``settings`` (``DECISION_...`` names) add
    or override the test defaults."""
    return decision_server(
        name,
        run_dir,
        port=port,
        redis_url=redis_url,
        primary=primary,
        secondary=secondary,
        settings={
            "DECISION_REDIS__KEY_PREFIX": key_prefix,
            "DECISION_DEADLINE__STORE_READ_MS": "200",
            # Tests write features once: a long bound keeps them fresh on a slow machine.
            "DECISION_FEATURES__MAX_AGE_MS": "120000",
            "DECISION_DEADLINE__MODEL_CALL_MS": "500",
            **settings,
        },
    )


class RedisInstance:
    def __init__(self, proc: ManagedProcess, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def redis_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisInstance]:
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    try:
        yield RedisInstance(proc, port)
    finally:
        proc.stop()


class KafkaInstance:
    def __init__(self, proc: ManagedProcess, port: int) -> None:
        self.proc = proc
        self.port = port
        self.bootstrap = f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def kafka_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaInstance]:
    """A real Kafka-protocol broker (localkafka, on disk) for the session."""
    port = free_port()
    proc = start_kafka_broker(port, tmp_path_factory.mktemp("kafka"))
    try:
        yield KafkaInstance(proc, port)
    finally:
        proc.stop()


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of the test's own, so tests sharing one redis-server never collide."""
    return f"t{time.monotonic_ns()}:{request.node.name[:40]}:"


@pytest.fixture
async def redis_client(redis_instance: RedisInstance) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_instance.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def sync_redis(redis_instance: RedisInstance) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_instance.url)
    try:
        yield client
    finally:
        client.close()


# A small training run (about 10 s): the same pipeline as ``make models``, fewer events.
TEST_TRAINING = {"days": 3, "events_per_day": 40_000}
TEST_MODELS = REPO / ".run" / "test-models"


def shared_models(seed: int) -> dict[str, ArchiveInfo]:
    """The test training run's champion and challenger for ``seed``, trained by the first
    test worker that asks and reused by the others, the timed tests and later runs, for as
    long as they are current (the spec and the training code: ``torchserve.train``)."""
    out = TEST_MODELS / f"seed-{seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f"seed-{seed}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return ensure_models(out, seed=seed, **TEST_TRAINING)


@pytest.fixture(scope="session")
def trained_models() -> dict[str, ArchiveInfo]:
    """Champion and challenger archives (seed 0), shared by every worker and run."""
    return shared_models(seed=0)


@pytest.fixture(scope="session")
def model_store(trained_models: dict[str, ArchiveInfo]) -> tuple[Path, ArchiveInfo]:
    champion = trained_models["champion"]
    return champion.path.parent, champion


class Replica:
    """A real TorchServe process that a test may kill, pause and restart."""

    def __init__(self, name: str, ports: ReplicaPorts, store: Path, run_dir: Path) -> None:
        self.name = name
        self.ports = ports
        self.address = f"127.0.0.1:{self.ports.grpc_inference}"
        self._store = store
        self._run_dir = run_dir
        self.dir = replica_dir(run_dir, name)
        self.model_name = "challenger" if name == "challenger" else "champion"
        self.proc = self._new_proc()

    def _new_proc(self) -> ManagedProcess:
        return torchserve_replica(self.name, self.ports, self._store, self._run_dir)

    def start(self) -> None:
        start_replica(self.proc, self.ports, model_name=self.model_name)

    def restart(self) -> None:
        restart_all([self])

    def ensure_running(self) -> None:
        if not self.proc.running():
            self.restart()
        else:
            self.proc.resume()


def restart_all(replicas: Iterable[Replica]) -> None:
    """Stops and starts them side by side: their JVMs boot together."""
    replicas = list(replicas)
    stop_all(replica.proc for replica in replicas)
    for replica in replicas:
        replica.proc = replica._new_proc()
        replica.proc.start()
    for replica in replicas:
        replica.start()  # already started: waits for readiness


def offline_scores(archive: Path, rows: np.ndarray, work_dir: Path) -> list[float]:
    """Scores from the archive's own serialized model, loaded outside any model server.

    ``torchserve.train`` is imported here, not at the top: collecting the suite then
    imports no torch or xgboost (3.5 s in each of its five pytest processes)."""
    from torchserve.train import OFFLINE_SCORERS

    meta = archive_meta(archive)
    with zipfile.ZipFile(archive) as mar:
        mar.extract(meta["serialized_file"], work_dir)
    scores = OFFLINE_SCORERS[meta["framework"]](work_dir / meta["serialized_file"], rows)
    return [float(score) for score in scores]


@pytest.fixture(scope="session")
def replicas(
    model_store: tuple[Path, ArchiveInfo], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Replica]]:
    """A primary and a secondary TorchServe; tests that break one restore it after."""
    store, _ = model_store
    run_dir = tmp_path_factory.mktemp("torchserve")
    ports = free_ports(12)
    pair = {
        name: Replica(name, ReplicaPorts(*ports[6 * i : 6 * i + 6]), store, run_dir)
        for i, name in enumerate(("primary", "secondary"))
    }
    try:
        for replica in pair.values():
            replica.proc.start()
        for replica in pair.values():
            replica.start()  # already started: waits for readiness
        yield pair
    finally:
        stop_all(replica.proc for replica in pair.values())


@pytest.fixture(scope="session")
def challenger_replica(
    model_store: tuple[Path, ArchiveInfo], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    """The challenger's TorchServe, for the session; tests that break it restore it after."""
    store, _ = model_store
    replica = Replica(
        "challenger", ReplicaPorts(*free_ports(6)), store, tmp_path_factory.mktemp("ts")
    )
    try:
        replica.start()
        yield replica
    finally:
        replica.proc.stop()
