"""The dead-letter topic: where the consumer sends each message it could not apply.

A dead letter keeps the original key and value, with two headers: ``error``, the reason,
and ``source``, the ``topic/partition/offset`` it was read from.
"""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from feature_cache.batch import Record
from feature_cache.settings import KafkaSettings


class DeadLetterProducer:
    def __init__(self, settings: KafkaSettings) -> None:
        self._topic = settings.dead_letter_topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers, client_id="feature-cache-dlq"
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def send(self, record: Record, reason: str) -> None:
        """Sends one dead letter and waits for its acknowledgement; raises what Kafka raises."""
        headers = [
            ("error", reason.encode()),
            ("source", f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        await self._producer.send_and_wait(
            self._topic, value=record.value, key=record.key, headers=headers
        )
