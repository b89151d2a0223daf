"""The local Kafka-protocol broker (``python -m localkafka``) under a steady load, over time.

Starts the broker on a free loopback port with a temporary data dir, creates a 4-partition
topic, then runs an aiokafka producer at a steady rate (300 msg/s of ~300-byte values keyed
by 3 symbols, linger 5 ms) and one consumer-group member for ``--duration-s``. Every 10 s
it prints produced, consumed, lag, the broker process's CPU and RSS, and this process's
CPU (the producer and consumer: a control); at the end the first minute against the last.
A shared VM's speed drifts by tens of percent over minutes, moving every process's CPU %
together, so growth counts only if the broker's CPU also grew against the client's. Exit
status 1 when the consumer ends more than 2 s of production behind, or the last minute's
broker CPU is over 25 % (and 2 points) above the first's, its ratio to the client's too.
SIGINT or SIGTERM ends production early and still prints the summary.

``--max-rate`` instead produces as fast as the producer can for ``--duration-s`` (default
30 s in that mode) and prints the rates sustained and the broker's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs in the virtualenv
import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from core.processes import ManagedProcess, free_port, listening, start_ready

REPO = Path(__file__).resolve().parents[1]
TOPIC = "bench"
SYMBOLS = [b"BTC-USD", b"ETH-USD", b"SOL-USD"]
REPORT_EVERY_S = 10.0


@dataclass(frozen=True)
class Sample:
    t_s: float
    """Seconds since the start."""
    cpu_s: float
    """Broker CPU seconds (user + system) so far."""
    client_cpu_s: float
    """This process's CPU seconds so far: the producer and consumer, a control."""
    rss_mib: float


@dataclass
class Counts:
    produced: int = 0
    consumed: int = 0
    failed: int = 0
    samples: list[Sample] = field(default_factory=list)


def start_broker(run_dir: Path, port: int, extra: list[str]) -> ManagedProcess:
    argv = [
        sys.executable, "-m", "localkafka", "--host", "127.0.0.1", "--port", str(port),
        "--data-dir", str(run_dir / "data"), "--log-level", "WARNING", *extra,
    ]  # fmt: skip
    proc = ManagedProcess("localkafka", argv, cwd=REPO, log_path=run_dir / "broker.log")
    return start_ready(proc, listening(port), timeout_s=20)


async def create_topic(bootstrap: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(TOPIC, partitions, 1)])
        if response.topic_errors[0][1]:
            raise RuntimeError(f"create topic failed: {response.topic_errors}")
    finally:
        await admin.close()


async def produce(
    bootstrap: str,
    rate: float | None,
    seconds: float,
    value_bytes: int,
    counts: Counts,
    interrupted: asyncio.Event,
) -> None:
    """At ``rate`` msg/s on a fixed schedule (catching up after a stall), or flat out."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    rng = random.Random(7)
    payload = bytes(rng.getrandbits(8) for _ in range(value_bytes))

    def acked(future: asyncio.Future[object]) -> None:
        if future.exception() is None:
            counts.produced += 1
        else:
            counts.failed += 1

    try:
        started = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - started < seconds and not interrupted.is_set():
            if rate is not None:
                due = int((now - started) * rate) + 1
                while sent < due:
                    future = await producer.send(TOPIC, key=SYMBOLS[sent % 3], value=payload)
                    future.add_done_callback(acked)
                    sent += 1
                await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
            else:
                for _ in range(1000):  # send() waits when the accumulator is full
                    future = await producer.send(TOPIC, key=SYMBOLS[sent % 3], value=payload)
                    future.add_done_callback(acked)
                    sent += 1
        await producer.flush()
    finally:
        await producer.stop()


async def consume(bootstrap: str, counts: Counts, stop: asyncio.Event) -> None:
    consumer = AIOKafkaConsumer(
        TOPIC, bootstrap_servers=bootstrap, group_id="bench", auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            counts.consumed += sum(len(records) for records in batches.values())
    finally:
        await consumer.stop()


async def report(broker: psutil.Process, counts: Counts, stop: asyncio.Event) -> None:
    started = time.monotonic()
    client = psutil.Process()
    print(
        f"{'t_s':>6} {'produced':>10} {'consumed':>10} {'lag':>7} {'cpu_%':>6} {'rss_mib':>8} "
        f"{'client_%':>8} {'ratio':>6}"
    )
    while True:
        with broker.oneshot():
            times = broker.cpu_times()
            rss_mib = broker.memory_info().rss / 2**20
        client_times = client.cpu_times()
        sample = Sample(
            time.monotonic() - started,
            times.user + times.system,
            client_times.user + client_times.system,
            rss_mib,
        )
        if counts.samples:
            cpu, client_cpu, ratio = rates(counts.samples[-1], sample)
            print(
                f"{sample.t_s:6.0f} {counts.produced:10,} {counts.consumed:10,} "
                f"{counts.produced - counts.consumed:7,} {cpu:6.1f} {rss_mib:8.1f} "
                f"{client_cpu:8.1f} {ratio:6.2f}",
                flush=True,
            )
        counts.samples.append(sample)
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), REPORT_EVERY_S)
        except TimeoutError:
            pass


def rates(first: Sample, last: Sample) -> tuple[float, float, float]:
    """Broker CPU %, client CPU % and their ratio between two samples."""
    span = max(last.t_s - first.t_s, 1e-9)
    cpu = 100 * (last.cpu_s - first.cpu_s) / span
    client_cpu = 100 * (last.client_cpu_s - first.client_cpu_s) / span
    return cpu, client_cpu, cpu / max(client_cpu, 1e-9)


def window(samples: list[Sample], start: float, end: float) -> tuple[float, float, float]:
    """Broker CPU %, broker/client CPU ratio and mean broker RSS (MiB) over the samples
    bracketing ``start`` to ``end``."""
    first = max((s for s in samples if s.t_s <= start + 0.5), key=lambda s: s.t_s)
    last = min((s for s in samples if s.t_s >= end - 0.5), key=lambda s: s.t_s)
    if last is first:
        last = samples[-1]
    inside = [s for s in samples if first.t_s <= s.t_s <= last.t_s]
    cpu, _, ratio = rates(first, last)
    return cpu, ratio, sum(s.rss_mib for s in inside) / len(inside)


async def run(args: argparse.Namespace) -> int:
    rate = None if args.max_rate else args.rate
    seconds = args.duration_s if args.duration_s is not None else (30 if args.max_rate else 600)
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        port = free_port()
        extra = []
        if args.retention_ms is not None:
            extra += ["--retention-ms", str(args.retention_ms)]
        if args.segment_bytes is not None:
            extra += ["--segment-bytes", str(args.segment_bytes)]
        proc = start_broker(Path(tmp), port, extra)
        try:
            bootstrap = f"127.0.0.1:{port}"
            broker = psutil.Process(proc.pid)
            await create_topic(bootstrap, args.partitions)
            counts = Counts()
            stop, interrupted = asyncio.Event(), asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                asyncio.get_running_loop().add_signal_handler(sig, interrupted.set)
            consumer = asyncio.create_task(consume(bootstrap, counts, stop))
            reporter = asyncio.create_task(report(broker, counts, stop))
            mode = "as fast as possible" if rate is None else f"{rate:g} msg/s"
            print(f"producing {mode} for {seconds:g} s, {args.value_bytes} B values", flush=True)
            started = time.monotonic()
            await produce(bootstrap, rate, seconds, args.value_bytes, counts, interrupted)
            elapsed = time.monotonic() - started
            lag_at_end = counts.produced - counts.consumed
            if rate is None:
                await asyncio.sleep(2)  # let the consumer drain
            stop.set()
            await asyncio.gather(consumer, reporter)
        finally:
            proc.stop()
    return summarize(counts, rate, elapsed, lag_at_end)


def summarize(counts: Counts, rate: float | None, elapsed: float, lag: int) -> int:
    whole_cpu, _, whole_rss = window(counts.samples, 0, elapsed)
    if rate is None:
        print(
            f"sustained: produced {counts.produced / elapsed:,.0f} msg/s, consumed "
            f"{counts.consumed / elapsed:,.0f} msg/s; broker CPU {whole_cpu:.0f} %, "
            f"RSS {whole_rss:.0f} MiB; failed sends {counts.failed}"
        )
        if whole_cpu < 90:
            print("the broker had CPU to spare: this process's producer is the limit here")
        return 0 if counts.failed == 0 else 1
    span = min(60.0, elapsed / 3)
    first_cpu, first_ratio, first_rss = window(counts.samples, 0, span)
    last_cpu, last_ratio, last_rss = window(counts.samples, elapsed - span, elapsed)
    print(
        f"first {span:.0f} s: broker CPU {first_cpu:.1f} % (x{first_ratio:.2f} the client's), "
        f"RSS {first_rss:.1f} MiB\n"
        f"last {span:.0f} s:  broker CPU {last_cpu:.1f} % (x{last_ratio:.2f} the client's), "
        f"RSS {last_rss:.1f} MiB"
    )
    behind_s = lag / rate
    grew = last_cpu > 1.25 * first_cpu and last_cpu - first_cpu > 2.0
    cpu_grew = grew and last_ratio > 1.25 * first_ratio
    print(
        f"lag at the end: {lag} messages ({behind_s:.2f} s of production); "
        f"failed sends {counts.failed}; broker CPU {'GREW' if cpu_grew else 'flat'}"
    )
    return 1 if behind_s > 2.0 or cpu_grew or counts.failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=None, help="600; 30 with --max-rate")
    parser.add_argument("--rate", type=float, default=300.0, help="messages per second")
    parser.add_argument("--value-bytes", type=int, default=300)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--max-rate", action="store_true", help="produce flat out instead")
    parser.add_argument("--retention-ms", type=int, default=None, help="the broker's default")
    parser.add_argument("--segment-bytes", type=int, default=None, help="the broker's default")
    sys.exit(uvloop.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
