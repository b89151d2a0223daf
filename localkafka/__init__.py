"""localkafka: a small, durable, single-node broker speaking the Kafka wire protocol.

For the local stack and the tests (production uses a Kafka cluster). aiokafka's and
librdkafka's producers (idempotent ones too), consumers (with consumer groups) and admin
clients work against it unchanged; docs/kafka-apis.md lists what it serves. Run it with
``python -m localkafka --data-dir DIR`` or in-process::

    async with Broker(BrokerSettings(data_dir=path, port=0)) as broker:
        bootstrap = f"127.0.0.1:{broker.port}"

The cost of a request does not grow with the length of a partition's history: segments
and batches are found by bisection, retention deletes whole old segments.
"""

from __future__ import annotations

from localkafka.server import Broker
from localkafka.settings import BrokerSettings

__all__ = ["Broker", "BrokerSettings"]
