"""The broker as clients other than the project's own see it: librdkafka (confluent-kafka;
the C client most Kafka tools are built on) and kcat, beside aiokafka.

Each test starts ``python -m localkafka`` as a process, logging every request it serves.
librdkafka's own log (``debug=protocol``) goes to a list, so a test can look for a parse
failure or a downgraded version from the client's side.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (
    AdminClient,
    ConfigResource,
    NewTopic,
    OffsetSpec,
    ResourceType,
)

from localkafka.protocol import SUPPORTED
from tests.localkafka.conftest import BrokerProcess, consume, consumer

pytestmark = pytest.mark.integration

CLIENT_ID = "conformance"
T0 = 1_700_000_000_000
# Group timings a test can wait through: the broker's default minimum session is 6 s.
GROUP = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 100,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
}


class Librdkafka(logging.Handler):
    """Client configs on one broker; collects the clients' log lines."""

    def __init__(self, bootstrap: str) -> None:
        super().__init__(logging.DEBUG)
        self.bootstrap = bootstrap
        self.lines: list[str] = []
        self._logger = logging.getLogger(f"librdkafka.{id(self)}")
        self._logger.setLevel(logging.DEBUG)
        self._logger.propagate = False
        self._logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def config(self, **settings: Any) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.bootstrap,
            "client.id": CLIENT_ID,
            "debug": "protocol",
            "logger": self._logger,
            **settings,
        }

    def failures(self) -> list[str]:
        """Lines where librdkafka could not read a response or fell back to old versions."""
        pattern = re.compile(r"parse failure|failed to parse|fallback|UNSUPPORTED_VERSION", re.I)
        return [line for line in self.lines if pattern.search(line)]


@pytest.fixture
def broker(broker_process: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_process("--log-level", "DEBUG")


@pytest.fixture
def rdkafka(broker: BrokerProcess) -> Librdkafka:
    return Librdkafka(broker.bootstrap)


def served_to_us(broker: BrokerProcess, run_dir: Path) -> set[str]:
    """The APIs the broker (every start of it) answered for this module's clients."""
    pattern = re.compile(rf"localkafka\.dispatch: (\w+) v\d+ from {CLIENT_ID}")
    names: set[str] = set()
    for path in run_dir.glob("localkafka-*.log"):
        names.update(pattern.findall(path.read_text()))
    return names


def create_topics(admin: AdminClient, **partitions: int) -> None:
    futures = admin.create_topics([NewTopic(name, count, 1) for name, count in partitions.items()])
    for future in futures.values():
        future.result(timeout=10)


def produce_all(producer: Producer, topic: str, values: list[str], **fields: Any) -> list[Message]:
    """Produces every value keyed by its index mod 8; returns the delivery reports."""
    delivered: list[Message] = []
    failed: list[Any] = []

    def on_delivery(error: Any, message: Message) -> None:
        (failed if error else delivered).append(error or message)

    for index, value in enumerate(values):
        producer.produce(topic, value=value, key=f"k{index % 8}", on_delivery=on_delivery, **fields)
        producer.poll(0)
    assert producer.flush(30) == 0, "messages left undelivered"
    assert failed == []
    return delivered


def text(field: bytes | None) -> str:
    assert field is not None
    return field.decode()


def poll_values(source: Consumer, count: int, timeout_s: float = 30.0) -> list[str]:
    """At least ``count`` values, in the order received."""
    values: list[str] = []
    deadline = time.monotonic() + timeout_s
    while len(values) < count:
        assert time.monotonic() < deadline, f"consumed {len(values)} of {count}"
        message = source.poll(0.2)
        if message is not None:
            assert message.error() is None, message.error()
            values.append(text(message.value()))
    return values


def test_versions_are_negotiated_without_a_parse_failure(rdkafka: Librdkafka) -> None:
    create_topics(AdminClient(rdkafka.config()), first=1)
    producer = Producer(rdkafka.config(**{"enable.idempotence": True}))
    produce_all(producer, "first", ["one"])
    sent = " ".join(rdkafka.lines)
    assert "Sent ApiVersionRequest (v3" in sent
    assert "Received ApiVersionResponse (v3" in sent
    assert "Received InitProducerIdResponse (v1" in sent  # the idempotent producer's id
    assert rdkafka.failures() == []


def test_librdkafka_uses_every_api_the_broker_advertises(
    broker: BrokerProcess, rdkafka: Librdkafka, tmp_path: Path
) -> None:
    admin = AdminClient(rdkafka.config())
    create_topics(admin, data=4, doomed=1)
    configs = admin.describe_configs([ConfigResource(ResourceType.TOPIC, "data")])
    [entries] = [future.result(timeout=10) for future in configs.values()]
    assert "retention.ms" in entries

    producer = Producer(rdkafka.config(**{"enable.idempotence": True, "linger.ms": 5}))
    produce_all(producer, "data", [str(i) for i in range(400)], timestamp=T0)
    produce_all(producer, "data", [str(i) for i in range(400, 800)], timestamp=T0 + 60_000)

    reader = Consumer(rdkafka.config(**{"group.id": "g", **GROUP}))
    reader.subscribe(["data"])
    assert sorted(map(int, poll_values(reader, 800))) == list(range(800))
    reader.commit(asynchronous=False)
    deadline = time.monotonic() + 10
    while "HEARTBEAT" not in served_to_us(broker, tmp_path):  # one every 100 ms
        assert time.monotonic() < deadline, "no heartbeat"
        reader.poll(0.1)
    later = reader.offsets_for_times(
        [TopicPartition("data", p, T0 + 30_000) for p in range(4)], timeout=10
    )
    latest = admin.list_offsets({TopicPartition("data", p): OffsetSpec.latest() for p in range(4)})
    ends = {tp.partition: f.result(timeout=10).offset for tp, f in latest.items()}
    assert sum(ends.values()) == 800
    # The first record stamped at or after T0 + 30 s is the first of the second 400.
    assert sum(ends[tp.partition] - tp.offset for tp in later) == 400

    listed = admin.list_consumer_groups().result(timeout=10)
    assert "g" in {group.group_id for group in listed.valid}
    [described] = [f.result(timeout=10) for f in admin.describe_consumer_groups(["g"]).values()]
    assert (described.state.name, len(described.members)) == ("STABLE", 1)
    [committed] = [
        f.result(timeout=10)
        for f in admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions("g")]).values()
    ]
    assert sum(tp.offset for tp in committed.topic_partitions) == 800  # null topics: all
    reader.close()

    deleted = admin.delete_records([TopicPartition("data", 0, 10)])
    assert [f.result(timeout=10).low_watermark for f in deleted.values()] == [10]
    for future in admin.delete_topics(["doomed"]).values():
        future.result(timeout=10)
    assert "doomed" not in admin.list_topics(timeout=10).topics
    admin.poll(0.1)  # serves the admin client's log lines

    assert rdkafka.failures() == []
    assert {key.name.title().replace("_", "") for key in SUPPORTED} <= {
        name.title().replace("_", "") for name in served_to_us(broker, tmp_path)
    }


def test_what_a_killed_broker_left_unanswered_is_resent_and_written_once(
    broker: BrokerProcess, rdkafka: Librdkafka
) -> None:
    create_topics(AdminClient(rdkafka.config()), orders=4)
    producer = Producer(
        rdkafka.config(
            **{"enable.idempotence": True, "linger.ms": 2, "reconnect.backoff.max.ms": 200}
        )
    )
    total = 6000
    delivered: list[Message] = []

    def on_delivery(error: Any, message: Message) -> None:
        assert error is None, error
        delivered.append(message)

    def send(indexes: range) -> None:
        for index in indexes:
            producer.produce(
                "orders", value=str(index), key=f"k{index % 8}", on_delivery=on_delivery
            )
            if index % 100 == 0:
                producer.poll(0.002)  # many requests, a few in flight at a time

    def unanswered() -> int:
        producer.poll(0.5)  # lets the requests go out and serves the log lines
        count = " ".join(rdkafka.lines).count
        return count("Sent ProduceRequest") - count("Received ProduceResponse")

    send(range(0, 3000))
    assert producer.flush(30) == 0
    broker.proc.pause()  # the requests that follow reach a broker that answers nothing
    send(range(3000, 4000))
    assert unanswered() > 0
    broker.restart_after(signal.SIGKILL)
    send(range(4000, total))
    assert producer.flush(60) == 0
    assert len(delivered) == total

    reader = Consumer(rdkafka.config(**{"group.id": "check", **GROUP}))
    reader.assign([TopicPartition("orders", p, 0) for p in range(4)])
    by_key: dict[str, list[int]] = defaultdict(list)
    values: list[int] = []
    deadline = time.monotonic() + 30
    while len(values) < total and time.monotonic() < deadline:
        message = reader.poll(0.2)
        if message is not None and message.error() is None:
            values.append(int(text(message.value())))
            by_key[text(message.key())].append(values[-1])
    assert reader.poll(1.0) is None  # nothing beyond: no duplicate
    reader.close()
    assert sorted(values) == list(range(total))
    assert all(sent == sorted(sent) for sent in by_key.values())  # each key in order
    # A retry of a batch written before the answer was lost is not reproduced here (the
    # broker answered nothing after the freeze): test_log and test_wire cover duplicates.


def test_two_consumers_share_the_partitions_and_one_takes_all_when_the_other_leaves(
    rdkafka: Librdkafka,
) -> None:
    create_topics(AdminClient(rdkafka.config()), shared=4)
    producer = Producer(rdkafka.config())
    produce_all(producer, "shared", [str(i) for i in range(200)])
    first = Consumer(rdkafka.config(**{"group.id": "pair", **GROUP}))
    second = Consumer(rdkafka.config(**{"group.id": "pair", **GROUP}))
    seen: set[int] = set()

    def poll_until(condition: Callable[[], bool], *members: Consumer) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, "the group never got there"
            for member in members:
                message = member.poll(0.05)
                if message is not None and message.error() is None:
                    seen.add(int(text(message.value())))

    first.subscribe(["shared"])
    poll_until(lambda: len(first.assignment()) == 4, first)
    second.subscribe(["shared"])
    poll_until(
        lambda: len(first.assignment()) == 2 and len(second.assignment()) == 2, first, second
    )
    assert {tp.partition for tp in first.assignment() + second.assignment()} == {0, 1, 2, 3}
    produce_all(producer, "shared", [str(i) for i in range(200, 400)])
    second.close()
    poll_until(lambda: len(first.assignment()) == 4 and len(seen) == 400, first)
    first.close()


def test_a_group_resumes_from_its_committed_offset(rdkafka: Librdkafka) -> None:
    create_topics(AdminClient(rdkafka.config()), resume=1)
    produce_all(Producer(rdkafka.config()), "resume", [str(i) for i in range(100)])
    before = Consumer(rdkafka.config(**{"group.id": "r", **GROUP}))
    before.subscribe(["resume"])
    first_part = poll_values(before, 40)[:40]
    before.commit(offsets=[TopicPartition("resume", 0, 40)], asynchronous=False)
    before.close()
    after = Consumer(rdkafka.config(**{"group.id": "r", **GROUP}))
    after.subscribe(["resume"])
    rest = poll_values(after, 60)
    assert after.poll(1.0) is None
    after.close()
    assert first_part + rest == [str(i) for i in range(100)]


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
async def test_batches_librdkafka_compressed_read_back_through_aiokafka(
    broker: BrokerProcess, rdkafka: Librdkafka, codec: str
) -> None:
    create_topics(AdminClient(rdkafka.config()), packed=2)
    producer = Producer(rdkafka.config(**{"compression.type": codec, "linger.ms": 20}))
    values = [f"value {i} " * 8 for i in range(500)]
    await asyncio.to_thread(produce_all, producer, "packed", values)
    reader = consumer(broker.bootstrap, "packed", group=None)
    await reader.start()
    try:
        got = await consume(reader, len(values))
    finally:
        await reader.stop()
    assert sorted(value.decode() for _, _, _, value in got) == sorted(values)


KCAT = shutil.which("kcat")


@pytest.fixture
def kcat(broker: BrokerProcess) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    if KCAT is None:
        pytest.fail("kcat is not installed: make setup-ci installs it (Debian package kcat)")

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        argv = [KCAT, "-b", broker.bootstrap, "-X", f"client.id={CLIENT_ID}", *args]
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert not re.search(r"parse failure|fallback", done.stderr, re.I), done.stderr
        return done

    yield run


def test_kcat_produces_consumes_and_finds_offsets_by_time(
    kcat: Callable[..., subprocess.CompletedProcess[str]], rdkafka: Librdkafka
) -> None:
    create_topics(AdminClient(rdkafka.config()), tools=1)
    lines = [f"k{i % 3}:v{i}" for i in range(300)]
    kcat("-P", "-t", "tools", "-K:", "-z", "zstd", "-X", "enable.idempotence=true",
         "-d", "protocol", stdin="\n".join(lines) + "\n")  # fmt: skip
    metadata = kcat("-L", "-t", "tools").stdout
    assert 'topic "tools" with 1 partitions' in metadata
    consumed = kcat("-C", "-t", "tools", "-o", "beginning", "-e", "-q", "-f", "%k:%s\\n").stdout
    assert consumed.splitlines() == lines
    now_ms = int(time.time() * 1000)
    found = kcat("-Q", "-t", f"tools:0:{now_ms - 600_000}").stdout
    assert re.search(r"offset 0\b", found), found
    end = kcat("-Q", "-t", f"tools:0:{now_ms + 600_000}").stdout
    assert re.search(r"offset -1\b", end), end  # nothing stamped that late: the end
