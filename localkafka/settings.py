"""The broker's settings and the command line that sets them (``python -m localkafka -h``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from localkafka.group import GroupSettings
from localkafka.log import LogConfig


@dataclass(frozen=True)
class BrokerSettings:
    data_dir: Path
    """Where topics, segments and committed offsets live; created if missing."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 19092
    """Port to listen on; 0 picks a free one (``Broker.port`` tells which)."""
    advertised_host: str | None = None
    """Host given to clients in Metadata and FindCoordinator; ``host`` when unset."""
    retention_ms: int = 600_000
    """Default retention of a topic's segments (ms) by their newest timestamp; -1: forever."""
    segment_bytes: int = 16 * 1024 * 1024
    """Default size (bytes) at which a partition's active segment is rolled."""
    retention_check_interval_ms: int = 30_000
    """How often retention runs (ms)."""
    fsync_interval_ms: int = 1000
    """How often written segments and offsets are fsynced (ms); all are at shutdown too."""
    auto_create_topics: bool = False
    """Create unknown topics on Metadata and Produce, as Kafka's auto.create.topics.enable."""
    default_partitions: int = 1
    """Partitions of an auto-created topic, or of a CreateTopics asking for -1."""
    max_request_bytes: int = 100 * 1024 * 1024
    """Largest request frame accepted (Kafka's socket.request.max.bytes); larger closes."""
    max_batch_bytes: int = 1_048_588
    """Largest record batch accepted (Kafka's message.max.bytes); larger: MESSAGE_TOO_LARGE."""
    groups: GroupSettings = field(default_factory=GroupSettings)
    """Consumer group coordinator settings."""

    @property
    def log_defaults(self) -> LogConfig:
        return LogConfig(retention_ms=self.retention_ms, segment_bytes=self.segment_bytes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m localkafka",
        description="A single-node, durable Kafka-protocol broker for local runs and tests.",
    )
    defaults = BrokerSettings(data_dir=Path())
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--advertised-host", default=None)
    parser.add_argument("--retention-ms", type=int, default=defaults.retention_ms)
    parser.add_argument("--segment-bytes", type=int, default=defaults.segment_bytes)
    parser.add_argument(
        "--retention-check-interval-ms", type=int, default=defaults.retention_check_interval_ms
    )
    parser.add_argument("--fsync-interval-ms", type=int, default=defaults.fsync_interval_ms)
    parser.add_argument(
        "--auto-create-topics", action=argparse.BooleanOptionalAction, default=False
    )
    parser.add_argument("--default-partitions", type=int, default=defaults.default_partitions)
    parser.add_argument(
        "--initial-rebalance-delay-ms",
        type=int,
        default=defaults.groups.initial_rebalance_delay_ms,
    )
    parser.add_argument(
        "--min-session-timeout-ms", type=int, default=defaults.groups.min_session_timeout_ms
    )
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[BrokerSettings, str]:
    """Settings and log level from the command line; argparse exits 2 on bad arguments."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.segment_bytes < 14 or args.retention_check_interval_ms <= 0:
        parser.error("--segment-bytes must be at least 14, the check interval positive")
    if args.fsync_interval_ms <= 0 or args.default_partitions < 1:
        parser.error("--fsync-interval-ms and --default-partitions must be positive")
    settings = BrokerSettings(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        advertised_host=args.advertised_host,
        retention_ms=args.retention_ms,
        segment_bytes=args.segment_bytes,
        retention_check_interval_ms=args.retention_check_interval_ms,
        fsync_interval_ms=args.fsync_interval_ms,
        auto_create_topics=args.auto_create_topics,
        default_partitions=args.default_partitions,
        groups=GroupSettings(
            initial_rebalance_delay_ms=args.initial_rebalance_delay_ms,
            min_session_timeout_ms=args.min_session_timeout_ms,
        ),
    )
    return settings, str(args.log_level)
