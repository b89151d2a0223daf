"""Topics: their partitions' logs, their configs, and their persistence in the data dir.

Layout: ``<data dir>/topics/<topic>/topic.json`` (name, partition count, the configs set at
creation) and ``<data dir>/topics/<topic>/<partition>/`` (the segments). ``topic.json`` is
written last and atomically, so a topic whose creation was interrupted has none and is
removed at the next start. A deleted topic's directory is renamed away before it is removed.

Configs a topic may set: ``retention.ms`` and ``segment.bytes``; anything else is refused
with INVALID_CONFIG, as Kafka refuses a config it does not know. A topic without them
follows the broker's defaults (``--retention-ms``, ``--segment-bytes``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from localkafka.errors import ErrorCode, KafkaApiError
from localkafka.fsutil import write_atomic
from localkafka.log import LogConfig, PartitionLog

log = logging.getLogger(__name__)

TOPIC_FILE = "topic.json"
_DELETED_PREFIX = ".deleted-"
_LEGAL_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
MIN_SEGMENT_BYTES = 14  # Kafka's lower bound for segment.bytes
TOPIC_CONFIGS = ("retention.ms", "segment.bytes")


def check_topic_name(name: str | None) -> str:
    if name is None or not _LEGAL_NAME.fullmatch(name) or name in (".", ".."):
        raise KafkaApiError(ErrorCode.INVALID_TOPIC_EXCEPTION, f"invalid topic name {name!r}")
    return name


def parse_configs(configs: list[tuple[str, str | None]]) -> dict[str, int]:
    """Validated topic config overrides; raises INVALID_CONFIG for unknown keys or values."""
    overrides: dict[str, int] = {}
    for key, value in configs:
        if key not in TOPIC_CONFIGS:
            raise KafkaApiError(ErrorCode.INVALID_CONFIG, f"unknown topic config {key!r}")
        try:
            number = int(value or "")
        except ValueError:
            raise KafkaApiError(
                ErrorCode.INVALID_CONFIG, f"{key}={value!r} is not an integer"
            ) from None
        low = -1 if key == "retention.ms" else MIN_SEGMENT_BYTES
        if number < low:
            raise KafkaApiError(ErrorCode.INVALID_CONFIG, f"{key}={number} below {low}")
        overrides[key] = number
    return overrides


@dataclass
class Topic:
    name: str
    overrides: dict[str, int]
    """Configs set at creation; the broker's defaults apply to the others."""
    partitions: list[PartitionLog]
    directory: Path


class TopicStore:
    def __init__(self, data_dir: Path, defaults: LogConfig) -> None:
        self._root = data_dir / "topics"
        self.defaults = defaults
        self._topics: dict[str, Topic] = {}

    def open(self) -> None:
        """Loads every topic in the data dir, repairing torn segment tails."""
        self._root.mkdir(parents=True, exist_ok=True)
        for directory in sorted(self._root.iterdir()):
            meta = directory / TOPIC_FILE
            if directory.name.startswith(_DELETED_PREFIX) or not meta.exists():
                log.warning("%s: a deleted or half-created topic, removed", directory)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            spec = json.loads(meta.read_text())
            config = self.config_for(spec["configs"])
            logs = [
                PartitionLog.open(directory / str(p), config) for p in range(spec["partitions"])
            ]
            self._topics[spec["name"]] = Topic(spec["name"], spec["configs"], logs, directory)
        log.info("opened %d topic(s) in %s", len(self._topics), self._root)

    def config_for(self, overrides: dict[str, int]) -> LogConfig:
        return LogConfig(
            retention_ms=overrides.get("retention.ms", self.defaults.retention_ms),
            segment_bytes=overrides.get("segment.bytes", self.defaults.segment_bytes),
        )

    def get(self, name: str) -> Topic | None:
        return self._topics.get(name)

    def partition(self, topic: str, partition: int) -> PartitionLog | None:
        found = self._topics.get(topic)
        if found is None or not 0 <= partition < len(found.partitions):
            return None
        return found.partitions[partition]

    def names(self) -> list[str]:
        return list(self._topics)

    def highest_producer_id(self) -> int:
        """The highest idempotent producer id in any partition; -1 when none."""
        return max(
            (p.highest_producer_id for t in self._topics.values() for p in t.partitions),
            default=-1,
        )

    def check_new(self, name: str, partitions: int) -> None:
        """Raises the error creating this topic would meet (configs: ``parse_configs``)."""
        check_topic_name(name)
        if name in self._topics:
            raise KafkaApiError(ErrorCode.TOPIC_ALREADY_EXISTS, f"Topic '{name}' already exists.")
        if partitions < 1:
            raise KafkaApiError(ErrorCode.INVALID_PARTITIONS, "partitions must be at least 1")

    def create(self, name: str, partitions: int, overrides: dict[str, int]) -> Topic:
        """Creates a topic; ``overrides`` come from ``parse_configs``."""
        self.check_new(name, partitions)
        directory = self._root / name
        if directory.exists():  # left by an interrupted creation
            shutil.rmtree(directory)
        config = self.config_for(overrides)
        logs = [PartitionLog.open(directory / str(p), config) for p in range(partitions)]
        spec = {"name": name, "partitions": partitions, "configs": overrides}
        write_atomic(directory / TOPIC_FILE, json.dumps(spec).encode())
        topic = Topic(name, dict(overrides), logs, directory)
        self._topics[name] = topic
        log.info("created topic %s (%d partitions, configs %s)", name, partitions, overrides)
        return topic

    def delete(self, name: str) -> None:
        topic = self._topics.pop(name, None)
        if topic is None:
            raise KafkaApiError(ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"no topic {name!r}")
        for partition in topic.partitions:
            partition.close()
        graveyard = self._root / f"{_DELETED_PREFIX}{name}-{time.time_ns()}"
        topic.directory.rename(graveyard)
        shutil.rmtree(graveyard, ignore_errors=True)
        log.info("deleted topic %s", name)

    def enforce_retention(self, now_ms: int) -> int:
        """Applies every partition's retention; returns the number of segments deleted."""
        return sum(p.enforce_retention(now_ms) for t in self._topics.values() for p in t.partitions)

    def dup_dirty(self) -> list[int]:
        return [fd for t in self._topics.values() for p in t.partitions for fd in p.dup_dirty()]

    def fsync(self) -> None:
        for topic in self._topics.values():
            for partition in topic.partitions:
                partition.fsync()

    def close(self) -> None:
        for topic in self._topics.values():
            for partition in topic.partitions:
                partition.close()
        self._topics.clear()
