"""Feature-cache ingest: throughput through one consumer, and Kafka → Redis freshness.

Starts its own Kafka-protocol broker and redis-server on free loopback ports. Throughput: N
generated events are published first, then one consumer (this process) is timed from
start until every event is in Redis. Freshness: a replayer process publishes at a fixed
rate (5,000 events/s by default) while the consumer runs; freshness is the time from a
message's Kafka create time to the end of the Redis write that includes it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
import uvloop

from core.processes import ManagedProcess, free_ports
from core.stats import percentile
from feature_cache.consumer import FeatureConsumer
from feature_cache.generator import MarketGenerator
from feature_cache.replay import Progress, rebased, replay
from feature_cache.settings import KafkaSettings
from loadtest.report import markdown_table, write_block
from localstack.kafka_broker import create_topics, start_kafka_broker
from localstack.redis_server import start_redis

REPO = Path(__file__).resolve().parents[1]
SYMBOLS = [f"SYM{i}-USD" for i in range(20)]
PARTITIONS = 4


async def throughput(settings: KafkaSettings, redis_url: str, count: int) -> float:
    # Stamped in the past (ending now): events from the future are refused.
    events = rebased(
        MarketGenerator(SYMBOLS, seed=3, start_time_us=0).events(count),
        time.time_ns() // 1000,
        end_now=True,
    )
    print(f"publishing {count:,} events …", flush=True)
    await replay(events, bootstrap=settings.bootstrap_servers, topic=settings.topic,
                 speed=None, progress=Progress(count, "published"))  # fmt: skip
    redis = aioredis.Redis.from_url(redis_url)
    consumer = FeatureConsumer(settings, redis, key_prefix="bench-tp:")
    await consumer.start()
    progress = Progress(count, "consumed")
    # Timed from the end of the first batch: joining the group is not ingest.
    started, first = 0.0, 0
    deadline = time.monotonic() + 300
    while consumer.stats.events < count:
        if time.monotonic() > deadline or consumer.failed:
            raise RuntimeError(f"consumer stalled at {consumer.stats.events:,} events")
        await asyncio.sleep(0.001 if not first else 0.05)
        if not first and consumer.stats.events:
            started, first = time.perf_counter(), consumer.stats.events
        progress.advance(consumer.stats.events - progress.count)
    elapsed = time.perf_counter() - started
    count -= first
    progress.done()
    await consumer.stop()
    await redis.aclose()
    return count / elapsed


async def freshness(
    settings: KafkaSettings, redis_url: str, rate: float, seconds: float, run_dir: Path
) -> list[float]:
    redis = aioredis.Redis.from_url(redis_url)
    consumer = FeatureConsumer(settings, redis, key_prefix="bench-fresh:")
    await consumer.start()
    await asyncio.sleep(2)  # joined and assigned before the clock starts
    consumer.stats.freshness_ms.clear()
    replayer = ManagedProcess(
        "replayer",
        [
            sys.executable, "-m", "feature_cache.replay",
            "--bootstrap", settings.bootstrap_servers, "--topic", settings.topic,
            "--symbols", ",".join(SYMBOLS), "--count", str(int(rate * seconds)),
            "--events-per-second", str(rate), "--speed", "1",
        ],
        cwd=REPO,
        log_path=run_dir / "replayer.log",
    )  # fmt: skip
    print(f"publishing at {rate:,.0f} events/s for {seconds:.0f} s …", flush=True)
    replayer.start()
    try:
        code = await asyncio.to_thread(replayer.wait, seconds + 30)
    finally:
        replayer.stop()
    if code != 0:
        raise RuntimeError(f"replayer failed:\n{replayer.log_tail()}")
    await asyncio.sleep(1)
    samples = list(consumer.stats.freshness_ms)
    await consumer.stop()
    await redis.aclose()
    return samples


async def run(args: argparse.Namespace, run_dir: Path) -> str:
    broker_port, redis_port = free_ports(2)
    broker = start_kafka_broker(broker_port, run_dir / "kafka")
    redis_proc = start_redis(redis_port, run_dir / "redis")
    try:
        bootstrap = f"127.0.0.1:{broker_port}"
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        topics = {"bench-tp": PARTITIONS, "bench-fresh": PARTITIONS}
        topics |= {"bench-tp.dlq": 1, "bench-fresh.dlq": 1}
        await create_topics(bootstrap, topics)
        base = {"bootstrap_servers": bootstrap}
        rate = await throughput(
            KafkaSettings(**base, topic="bench-tp", group_id="bench-tp"), redis_url, args.count
        )
        fresh = await freshness(
            KafkaSettings(**base, topic="bench-fresh", group_id="bench-fresh"),
            redis_url,
            args.rate,
            args.seconds,
            run_dir,
        )
    finally:
        redis_proc.stop()
        broker.stop()
    at = f"freshness at {args.rate:,.0f} events/s"
    rows = [
        ("ingest through one consumer, events/s", f"{rate:,.0f}", ">= 50,000"),
        (f"{at}, p50 ms", f"{percentile(fresh, 0.5):.1f}", ""),
        (f"{at}, p99 ms", f"{percentile(fresh, 0.99):.1f}", "<= 20"),
    ]
    return (
        markdown_table(["measure", ">value", ">target"], rows)
        + f"\n\n({len(fresh):,} freshness samples; mean {statistics.fmean(fresh):.1f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--doc", type=Path, help="put the table in this doc's bench-ingest block")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        table = uvloop.run(run(args, Path(tmp)))
    print(f"\n{table}")
    if args.doc:
        write_block(args.doc, "bench-ingest", table)


if __name__ == "__main__":
    main()
