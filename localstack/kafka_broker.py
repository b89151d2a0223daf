"""The local Kafka-protocol broker (``localkafka``, durable, on disk) and topics on it.

For ``make run``, the soak and the tests only; production points the consumer at a
Kafka cluster. ``localkafka`` replaced Tansu's memory engine, whose fetch cost grew with
the retained log until the consumer fell behind (see ``localkafka``'s docstring).
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from core.processes import ManagedProcess, listening, niced, start_ready

# The local stack replays market data for hours: ten minutes of it is plenty to
# restart a consumer from, and keeps the broker's disk use bounded.
RETENTION_MS = 600_000


def kafka_broker(
    port: int, run_dir: Path, *, retention_ms: int = RETENTION_MS, niceness: int = 0
) -> ManagedProcess:
    """The broker on 127.0.0.1:``port`` (not started), its log and data under ``run_dir``;
    a restart on the same ``run_dir`` keeps the topics, records and committed offsets."""
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "localkafka",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--data-dir", str(run_dir / "data"),
        "--retention-ms", str(retention_ms),
    ]  # fmt: skip
    return ManagedProcess(
        "kafka-broker", niced(argv, niceness), cwd=run_dir, log_path=run_dir / "broker.log"
    )


def start_kafka_broker(port: int, run_dir: Path, *, timeout_s: float = 20.0) -> ManagedProcess:
    return start_ready(kafka_broker(port, run_dir), listening(port), timeout_s)


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
