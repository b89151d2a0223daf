"""A feed that starts over is followed, not ignored, by real processes: a decision server
on the session's TorchServe replicas, the feature-cache consumer, the labeler and the
replayer (``python -m feature_cache.replay``, as the local stack runs them), on the
session's broker and redis-server.

In turn: the stack restarted within the topic's retention (Redis empty, as the local
stack's own redis-server keeps nothing), only the replayer restarted, the same recording
replayed twice; then a symbol's feed ignored (an older publisher beside a newer one)
shows in ``GetStatus`` and the consumer's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from core.processes import ManagedProcess, free_ports, listening, stop_all
from decision_client.v1 import admin_pb2, decision_pb2
from feature_cache.events import MarketEvent
from feature_cache.feed_watch import IGNORED_ALARM_S
from feature_cache.generator import MarketGenerator
from feature_cache.settings import KafkaSettings
from tests.conftest import REPO, RedisInstance
from tests.feature_cache.conftest import consumer_env, publish
from tests.feature_cache.recordings import write_csv
from tests.metrics import scrape, value
from tests.server.conftest import VIEWER, ServerProcess, buy

pytestmark = [pytest.mark.integration, pytest.mark.timed]  # features fresher than 2 s

SYMBOLS = ("SIM-A", "SIM-B")
RECORDED = "REC-USD"
RECORDED_KEY = f"COINBASE:{RECORDED}"  # a recording's symbols are keyed by their venue
LABEL_POLL_S = 0.5  # the labeler's passes: labels within the horizon and half a second
LABELLED_WITHIN_S = 60.0  # the bound, from a restart to its decisions labelled
FRESH_MS = 2000.0  # the server's default features.max_age_ms, set here explicitly
MODEL = (decision_pb2.SOURCE_PRIMARY, decision_pb2.SOURCE_SECONDARY)
FEATURES_WANTING = ("no features", "features stale", "features unusable")  # the reasons


@dataclasses.dataclass
class Pipeline:
    """The processes off the Decide path, each restartable on its own."""

    env: dict[str, str]
    logs: Path
    kafka: KafkaSettings
    consumer_port: int
    labeler_port: int
    procs: dict[str, ManagedProcess] = dataclasses.field(default_factory=dict)

    def start(self, name: str, *argv: str) -> None:
        proc = ManagedProcess(
            name, [sys.executable, *argv], cwd=REPO, log_path=self.logs / f"{name}.log",
            env=self.env,
        )  # fmt: skip
        self.procs[name] = proc
        proc.start()

    def start_consumer_and_labeler(self) -> None:
        """The labeler first, before any checkpoint of the consumer's: it reads the topic
        from its start. Not waited for: ``ready`` waits for both, once the server starts."""
        self.start("labeler", "-m", "quality")
        self.start("consumer", "-m", "feature_cache")

    def ready(self) -> None:
        self.procs["labeler"].wait_ready(listening(self.labeler_port), 30.0)
        self.procs["consumer"].wait_ready(listening(self.consumer_port), 30.0)

    def start_replayer(self, name: str = "replayer", *source: str, speed: str = "1") -> None:
        """The generator, endless and paced (as ``make run``), or ``source``'s arguments."""
        default = ("--count", "0", "--symbols", ",".join(SYMBOLS), "--events-per-second", "200")
        self.start(
            name, "-m", "feature_cache.replay", *(source or default), "--speed", speed,
            "--bootstrap", self.kafka.bootstrap_servers, "--topic", self.kafka.topic,
        )  # fmt: skip

    def stop(self, *names: str) -> None:
        stop_all(self.procs.pop(name) for name in names or list(self.procs) if name in self.procs)

    def metrics(self, which: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        return scrape(self.consumer_port if which == "consumer" else self.labeler_port)


@pytest.fixture
def pipeline(
    kafka_settings: KafkaSettings, redis_instance: RedisInstance, key_prefix: str, tmp_path: Path
) -> Iterator[Pipeline]:
    consumer_port, labeler_port = free_ports(2)
    env = consumer_env(
        kafka_settings,
        redis_instance.url,
        key_prefix,
        DECISION_FEATURE_CACHE__METRICS_PORT=str(consumer_port),
        DECISION_QUALITY__METRICS_PORT=str(labeler_port),
        DECISION_QUALITY__POLL_INTERVAL_S=str(LABEL_POLL_S),
        DECISION_AUDIT__DATABASE_URL=f"sqlite:///{tmp_path / 'audit.db'}",
    )
    pipe = Pipeline(env, tmp_path, kafka_settings, consumer_port, labeler_port)
    try:
        yield pipe
    finally:
        pipe.stop()


@contextlib.asynccontextmanager
async def deciding(
    server: ServerProcess, symbol: str
) -> AsyncIterator[list[decision_pb2.DecideResponse]]:
    """Decide calls for ``symbol`` about 20 a second while the block runs; the answers."""
    answers: list[decision_pb2.DecideResponse] = []

    async def loop() -> None:
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                answers.append(await server.decisions.Decide(buy(symbol), timeout=1.0))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(loop())
    try:
        yield answers
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def from_the_model(answers: list[decision_pb2.DecideResponse]) -> list[decision_pb2.DecideResponse]:
    return [a for a in answers if a.source in MODEL and a.feature_age_ms < FRESH_MS]


def on_fresh_features(
    answers: list[decision_pb2.DecideResponse],
) -> list[decision_pb2.DecideResponse]:
    """Those decided on fresh features: by the model, or by the ladder when the model was
    not in time on a busy machine, never for want of features."""
    return [
        a
        for a in answers
        if a.feature_age_ms < FRESH_MS and not any(w in a.reason for w in FEATURES_WANTING)
    ]


def labelled_share(database: Path, decision_ids: list[str]) -> float:
    """Share of ``decision_ids`` with a label in the audit store."""
    with contextlib.closing(sqlite3.connect(database)) as conn:
        marks = ",".join("?" * len(decision_ids))
        (count,) = conn.execute(
            f"SELECT count(*) FROM decision_outcomes WHERE label IS NOT NULL"  # noqa: S608
            f" AND decision_id IN ({marks})",
            decision_ids,
        ).fetchone()
    return float(count) / len(decision_ids)


async def until(condition, timeout_s: float, what: str, pipe: Pipeline) -> float:
    """Waits for ``condition()``; the seconds it took. Fails naming ``what``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            tails = "\n".join(f"--- {n}\n{p.log_tail(15)}" for n, p in pipe.procs.items())
            raise AssertionError(f"{what} not within {timeout_s:.0f} s\n{tails}")
        await asyncio.sleep(0.25)
    return time.monotonic() - started


async def test_a_feed_that_starts_over_is_followed_decided_on_and_labelled(
    pipeline: Pipeline,
    server_processes,
    redis_client: aioredis.Redis,
    key_prefix: str,
    tmp_path: Path,
) -> None:
    pipe = pipeline
    database = tmp_path / "audit.db"

    def start_server() -> ServerProcess:
        servers: list[ServerProcess] = server_processes(
            1, DECISION_FEATURES__MAX_AGE_MS=str(FRESH_MS)
        )
        return servers[0]

    async def decided_from_the_model(
        server: ServerProcess, symbol: str, seconds: float
    ) -> list[str]:
        """Decide calls for ``seconds`` once the model answers; they are all decided on
        fresh features. Their decision ids."""
        async with deciding(server, symbol) as answers:
            await until(
                lambda: len(from_the_model(answers)) >= 5, 30, f"{symbol} from the model", pipe
            )
            answers.clear()  # those before the symbol's first features are not judged
            await asyncio.sleep(seconds)
        fresh = on_fresh_features(answers)
        assert answers and len(fresh) == len(answers), [
            (decision_pb2.Source.Name(a.source), a.reason) for a in answers if a not in fresh
        ]
        return [a.decision_id for a in answers]

    # The stack runs, an hour into its feed (its sequences past 1,000,000: the test
    # publishes that run's last seconds itself): decisions from the model, labelled.
    pipe.start_consumer_and_labeler()
    server = start_server()
    pipe.ready()
    long_run = MarketGenerator(SYMBOLS, seed=4, start_time_us=time.time_ns() // 1000)
    an_hour_in = [
        dataclasses.replace(e, sequence=e.sequence + 1_000_000, session=1)
        for e in long_run.events(200 * 6)
    ]  # 6 s at 200 events/s
    publishing = asyncio.create_task(publish_paced(pipe.kafka, an_hour_in))
    await decided_from_the_model(server, "SIM-A", 1.0)
    outcomes = "decision_quality_outcomes_total"
    await until(
        lambda: value(pipe.metrics("labeler"), outcomes, result="labelled") > 0,
        LABELLED_WITHIN_S, "the first labels", pipe,
    )  # fmt: skip
    await publishing

    # Stopped, and started again within the retention: the topic holds the last run's
    # events, then the new run's, numbered from 1 again.
    await asyncio.gather(server.close(), asyncio.to_thread(pipe.stop))  # side by side
    await redis_client.delete(*[k async for k in redis_client.scan_iter(f"{key_prefix}*")])
    restarted_at = time.monotonic()
    pipe.start_consumer_and_labeler()
    server = start_server()
    pipe.ready()
    pipe.start_replayer()
    after_restart = await decided_from_the_model(server, "SIM-A", 1.5)
    took = await until(
        lambda: labelled_share(database, after_restart) >= 0.9,
        LABELLED_WITHIN_S - (time.monotonic() - restarted_at), "the restarted stack's labels", pipe,
    )  # fmt: skip
    assert time.monotonic() - restarted_at - took < LABELLED_WITHIN_S

    # Only the replayer restarted: the consumer and the labeler follow its new session.
    pipe.stop("replayer")
    restarts = value(pipe.metrics("consumer"), "feature_cache_feed_restarts_total")
    pipe.start_replayer()
    await until(
        lambda: value(pipe.metrics("consumer"), "feature_cache_feed_restarts_total")
        >= restarts + len(SYMBOLS),
        20, "the replayer's new session", pipe,
    )  # fmt: skip
    after_replayer = await decided_from_the_model(server, "SIM-B", 1.0)
    await until(
        lambda: labelled_share(database, after_replayer) >= 0.9,
        LABELLED_WITHIN_S, "labels after the replayer's restart", pipe,
    )  # fmt: skip

    # The same recording replayed twice: during the second replay, fresh features.
    pipe.stop("replayer")
    recording = tmp_path / "recording"
    recording.mkdir()
    recorded = MarketGenerator(
        (RECORDED,), seed=5, start_time_us=1_700_000_000_000_000, events_per_second=200
    )
    write_csv(recording, list(recorded.events(800)))  # 4 s
    source = ("--source", f"csv:{recording}")
    pipe.start_replayer("replay-1", *source, speed="max")  # the first one at once
    assert pipe.procs["replay-1"].wait(60.0) == 0, pipe.procs["replay-1"].log_tail()
    pipe.start_replayer("replay-2", *source)
    await decided_from_the_model(server, RECORDED_KEY, 2.0)
    assert pipe.procs["replay-2"].wait(60.0) == 0, pipe.procs["replay-2"].log_tail()
    ignored = pipe.metrics("consumer")
    assert value(ignored, "feature_cache_events_ignored_total", reason="duplicate") == 0
    assert value(ignored, "feature_cache_events_ignored_total", reason="old_session") == 0

    # An older publisher beside the newest: its events are ignored, and status says so.
    old = [
        dataclasses.replace(e, symbol=RECORDED_KEY, session=1)
        for e in MarketGenerator((RECORDED,), seed=6, start_time_us=time.time_ns() // 1000,
                                 events_per_second=100).events(int(100 * (IGNORED_ALARM_S + 6)))
    ]  # fmt: skip
    publishing = asyncio.create_task(publish_paced(pipe.kafka, old))
    try:
        await until(
            lambda: value(pipe.metrics("consumer"), "feature_cache_symbols_ignored") == 1,
            IGNORED_ALARM_S + 10, "the ignored symbol", pipe,
        )  # fmt: skip
        for _ in range(20):  # reported with the consumer's next batch
            status = await server.admin.GetStatus(
                admin_pb2.GetStatusRequest(), metadata=VIEWER, timeout=5
            )
            if status.ignored_feeds:
                break
            await asyncio.sleep(0.25)
    finally:
        publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
    assert [(f.symbol, f.reason) for f in status.ignored_feeds] == [(RECORDED_KEY, "old_session")]
    assert status.labels.reported and not status.labels.stopped
    assert 0 <= status.labels.behind_s < 60 and status.labels.HasField("newest_labelled")
    await server.close()


async def publish_paced(kafka: KafkaSettings, events: list[MarketEvent]) -> None:
    """``events`` at their own pace (their exchange times), as a live publisher would."""
    started, first = time.monotonic(), events[0].exchange_time_us
    for start in range(0, len(events), 50):
        chunk = events[start : start + 50]
        await asyncio.sleep(
            max(0.0, (chunk[0].exchange_time_us - first) / 1e6 - (time.monotonic() - started))
        )
        await publish(kafka, chunk)
