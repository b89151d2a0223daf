"""Acceptance: the real Coinbase recording through Kafka into Redis features, checked.

Starts its own Kafka-protocol broker and redis-server, replays the recording (default:
``../shared/data/coinbase-l2-2021-04-17/COINBASE.ws.28.0`` beside the repository) at
full speed through one consumer, and checks that every product's features in Redis
equal the features computed offline from the same events. Exit status 0 when they do.
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
from feature_cache.coinbase import CoinbaseParser, read_recording
from feature_cache.consumer import FeatureConsumer
from feature_cache.features import compute_offline, same_features
from feature_cache.replay import Progress, replay
from feature_cache.schema import FEATURE_NAMES
from feature_cache.settings import KafkaSettings
from feature_cache.store import FeatureReader
from localstack.kafka_broker import create_topics, start_kafka_broker
from localstack.redis_server import start_redis

REPO = Path(__file__).resolve().parents[1]
RECORDING = REPO.parent / "shared/data/coinbase-l2-2021-04-17/COINBASE.ws.28.0"


async def run(path: Path, run_dir: Path) -> int:
    parser = CoinbaseParser()
    events = list(read_recording(path, parser=parser))
    want = compute_offline(events)
    print(f"{len(events):,} events for {len(want)} products from {path.name}", flush=True)
    broker_port, redis_port = free_ports(2)
    broker = start_kafka_broker(broker_port, run_dir / "kafka")
    redis_proc = start_redis(redis_port, run_dir / "redis")
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_port}/0")
    try:
        bootstrap = f"127.0.0.1:{broker_port}"
        await create_topics(bootstrap, {"coinbase": 4, "coinbase.dlq": 1})
        settings = KafkaSettings(
            bootstrap_servers=bootstrap,
            topic="coinbase",
            dead_letter_topic="coinbase.dlq",
            group_id="acceptance",
            feature_ttl_s=3600,
        )
        async with FeatureConsumer(settings, redis, key_prefix="acceptance:") as consumer:
            await replay(
                events,
                bootstrap=bootstrap,
                topic="coinbase",
                speed=None,
                progress=Progress(len(events)),
            )
            reader = FeatureReader(redis, key_prefix="acceptance:")
            deadline = time.monotonic() + 60
            while True:
                records = await reader.read_many(list(want))
                got = {s: (r.values if r else None) for s, r in zip(want, records, strict=True)}
                if all(same_features(got[s], want[s]) for s in want) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            stats = consumer.stats
    finally:
        await redis.aclose()
        redis_proc.stop()
        broker.stop()

    shown = ("spread_bps", "imbalance_l5", "ofi_5s", "realized_vol_30s_bps", "trade_intensity_5s")
    index = [FEATURE_NAMES.index(name) for name in shown]
    print("\n| product | match | " + " | ".join(shown) + " |")
    print("| --- | --- |" + " ---: |" * len(shown))
    for symbol in sorted(want):
        values = got[symbol]
        cells = [f"{values[i]:.3f}" for i in index] if values else ["-"] * len(shown)
        print(
            f"| {symbol} | {'yes' if same_features(got[symbol], want[symbol]) else 'NO'} | "
            + " | ".join(cells)
            + " |"
        )
    mismatched = [s for s in want if not same_features(got[s], want[s])]
    if stats.malformed or stats.events != len(events):
        print(
            f"FAILED: consumed {stats.events:,} of {len(events):,} events,"
            f" {stats.malformed} malformed",
            file=sys.stderr,
        )
        return 1
    skipped = sum(parser.stats.skipped.values())
    print(
        f"\nconsumer: {stats.events:,} events, {stats.malformed} malformed,"
        f" {stats.batches} batches; parser skipped {skipped} non-market lines"
    )
    if mismatched:
        print(f"FAILED: features differ for {mismatched}", file=sys.stderr)
        return 1
    print("OK: every product's features in Redis equal the offline computation")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--path", type=Path, default=RECORDING)
    args = parser.parse_args()
    if not args.path.is_file():
        raise SystemExit(f"recording not found: {args.path}")
    with tempfile.TemporaryDirectory(prefix="coinbase-") as tmp:
        sys.exit(uvloop.run(run(args.path, Path(tmp))))


if __name__ == "__main__":
    main()
