"""Which fetched records the consumer applies around a partition's restore (pure logic:
a stand-in for aiokafka's consumer, no broker)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiokafka import TopicPartition

from feature_cache.consumer import FeatureConsumer
from feature_cache.settings import KafkaSettings

TP = TopicPartition("market-data", 0)


@dataclass
class Record:
    offset: int


class AssignedConsumer:
    def __init__(self) -> None:
        self.positions: dict[TopicPartition, int] = {}

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset


@pytest.fixture
async def consumer() -> AsyncIterator[FeatureConsumer]:
    consumer = FeatureConsumer(KafkaSettings(), redis=None, key_prefix="t:")  # type: ignore[arg-type]
    kafka_consumer, consumer._consumer = consumer._consumer, AssignedConsumer()
    yield consumer
    await consumer._dead_letters.stop()  # never started: nothing to connect or flush
    await kafka_consumer.stop()


def records(first: int, last: int) -> list[Record]:
    return [Record(offset) for offset in range(first, last + 1)]


async def test_a_partition_not_restored_yet_is_read_again_from_the_batch_start(consumer):
    assert consumer._restored({TP: records(100, 120)}) == {}
    assert consumer._consumer.positions[TP] == 100


async def test_records_a_restored_checkpoint_holds_are_not_applied_again(consumer):
    consumer.states[TP] = {}
    consumer._next_offset[TP] = 151  # restored from a checkpoint at offset 150
    # Fetched before the restore's seek, from an older committed offset.
    assert consumer._restored({TP: records(100, 200)}) == {TP: records(151, 200)}


async def test_a_batch_that_starts_where_the_states_end_is_applied_whole(consumer):
    consumer.states[TP] = {}
    consumer._next_offset[TP] = 151
    assert consumer._restored({TP: records(151, 160)}) == {TP: records(151, 160)}
    assert consumer._restored({TP: records(140, 150)}) == {}
