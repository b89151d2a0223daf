"""localkafka: a small, durable, single-node broker speaking the Kafka wire protocol.

For the local stack and the tests (production uses a Kafka cluster): aiokafka's and
librdkafka's clients work against it unchanged, and a request's cost does not grow with a
partition's history. Run it with ``python -m localkafka --data-dir DIR`` or in-process::

    async with Broker(BrokerSettings(data_dir=path, port=0)) as broker:
        bootstrap = f"127.0.0.1:{broker.port}"

What it serves, and how to reach it with other clients: docs/kafka-apis.md.
"""

from __future__ import annotations

from localkafka.server import Broker
from localkafka.settings import BrokerSettings

__all__ = ["Broker", "BrokerSettings"]
