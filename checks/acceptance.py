"""Acceptance: every real recording under ``../shared/data/`` through Kafka into Redis.

Finds the recordings (for each folder, each source kind with files there: Coinbase,
Binance, Kraken websocket recordings, the vendors' L2 CSV files; see
``feature_cache.exchanges.sources``), and for each starts its own Kafka-protocol broker
and redis-server, replays it at full speed through one consumer, and checks that every
symbol's features in Redis equal the features computed offline from the same events.
Prints the reader's summary per symbol and the time the read and the replay took.
Exit status 0 when every recording passed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
import uvloop

from core.processes import free_ports
from feature_cache.consumer import FeatureConsumer
from feature_cache.events import MarketEvent
from feature_cache.exchanges.feed import ReplaySummary
from feature_cache.exchanges.sources import KINDS, Source
from feature_cache.features import compute_offline, same_features
from feature_cache.replay import Progress, replay
from feature_cache.schema import FEATURE_NAMES
from feature_cache.settings import KafkaSettings
from feature_cache.store import FeatureReader
from localstack.kafka_broker import create_topics, start_kafka_broker
from localstack.redis_server import start_redis

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data"
SHOWN = ("spread_bps", "imbalance_l5", "ofi_5s", "realized_vol_30s_bps", "trade_intensity_5s")


def find_sources(root: Path) -> list[Source]:
    """Each folder under ``root`` (and ``root`` itself), each kind with files there."""
    folders = [root, *sorted(p for p in root.rglob("*") if p.is_dir())]
    return [
        Source(kind, folder) for folder in folders for kind in KINDS if Source(kind, folder).files()
    ]


async def run(source: Source, run_dir: Path) -> bool:
    summary = ReplaySummary()
    started = time.monotonic()
    events: list[MarketEvent] = list(source.events(summary))
    read_s = time.monotonic() - started
    want = compute_offline(events)
    print(f"\n## {source.kind}:{source.path}: {len(events):,} events for {len(want)} symbols")
    broker_port, redis_port = free_ports(2)
    broker = start_kafka_broker(broker_port, run_dir / "kafka")
    redis_proc = start_redis(redis_port, run_dir / "redis")
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_port}/0")
    try:
        bootstrap = f"127.0.0.1:{broker_port}"
        await create_topics(bootstrap, {"acceptance": 4, "acceptance.dlq": 1})
        settings = KafkaSettings(
            bootstrap_servers=bootstrap,
            topic="acceptance",
            group_id="acceptance",
        )
        consumer = FeatureConsumer(settings, redis, key_prefix="acceptance:", feature_ttl_s=3600)
        async with consumer:
            started = time.monotonic()
            await replay(
                events,
                bootstrap=bootstrap,
                topic="acceptance",
                speed=None,
                progress=Progress(len(events)),
            )
            replay_s = time.monotonic() - started
            reader = FeatureReader(redis, key_prefix="acceptance:")
            deadline = time.monotonic() + 60
            while True:
                records = await reader.read_many(list(want))
                got = {s: (r.values if r else None) for s, r in zip(want, records, strict=True)}
                if all(same_features(got[s], want[s]) for s in want) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            in_redis_s = time.monotonic() - started
            stats = consumer.stats
    finally:
        await redis.aclose()
        redis_proc.stop()
        broker.stop()

    print(summary.table())
    index = [FEATURE_NAMES.index(name) for name in SHOWN]
    print("\n| symbol | match | " + " | ".join(SHOWN) + " |")
    print("| --- | --- |" + " ---: |" * len(SHOWN))
    for symbol in sorted(want):
        values = got[symbol]
        cells = [f"{values[i]:.3f}" for i in index] if values else ["-"] * len(SHOWN)
        match = "yes" if same_features(values, want[symbol]) else "NO"
        print(f"| {symbol} | {match} | " + " | ".join(cells) + " |")
    print(
        f"read {read_s:.2f} s, published at full speed in {replay_s:.2f} s, all features in"
        f" Redis after {in_redis_s:.2f} s; consumer: {stats.events:,} events,"
        f" {stats.malformed} malformed, {stats.batches} batches"
    )
    mismatched = [s for s in want if not same_features(got[s], want[s])]
    if stats.malformed or stats.events != len(events):
        print(f"FAILED: consumed {stats.events:,} of {len(events):,} events", file=sys.stderr)
        return False
    if mismatched:
        print(f"FAILED: features differ for {mismatched}", file=sys.stderr)
        return False
    print("OK: every symbol's features in Redis equal the offline computation")
    return True


async def run_all(sources: list[Source]) -> int:
    failed = []
    for source in sources:
        with tempfile.TemporaryDirectory(prefix="acceptance-") as tmp:
            if not await run(source, Path(tmp)):
                failed.append(f"{source.kind}:{source.path}")
    print(f"\n{len(sources) - len(failed)} of {len(sources)} recordings passed")
    for name in failed:
        print(f"FAILED {name}")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DATA, help="where to look for recordings")
    parser.add_argument("--source", action="append", help="KIND:PATH instead (repeatable)")
    args = parser.parse_args()
    try:
        sources = (
            [Source.parse(spec) for spec in args.source] if args.source else find_sources(args.data)
        )
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not sources:
        raise SystemExit(f"no recording found under {args.data}")
    print("recordings: " + ", ".join(f"{s.kind}:{s.path}" for s in sources))
    sys.exit(uvloop.run(run_all(sources)))


if __name__ == "__main__":
    main()
