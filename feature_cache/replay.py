"""``python -m feature_cache.replay``: publish market events to Kafka at 1x, Nx or max speed.

Sources: the seeded generator, or a recording ``--source KIND:PATH`` (KIND coinbase,
binance, kraken or csv; PATH a file or a folder), which ends with a summary per symbol.
Exchange times are rebased to now unless ``--keep-times``; each run publishes in a session
of its own, so the consumers follow a replay started again.
Exit status (each error one line on stderr): 0 published, 2 a bad argument, 3 a file that
cannot be read on, 4 nothing to publish, 5 the broker unreachable or refusing, 130 stopped
by SIGINT or SIGTERM, 1 a bug.
Details: docs/market-data.md#publishing-market-data
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import logging
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from feature_cache.codec import encode
from feature_cache.events import MarketEvent
from feature_cache.exchanges.feed import ReplaySummary
from feature_cache.exchanges.recording import UnreadableFile
from feature_cache.exchanges.sources import KINDS, Source
from feature_cache.settings import FeatureCacheSettings

# Futures awaited per chunk: bounds memory while keeping the producer's batches full.
_CHUNK = 5000
# A paced replay wakes this long after an event is due, so the events due meanwhile go
# out in one batch: ~50 wake-ups and produce requests a second instead of one per event
# (at 300 events/s that was a fifth of a core on the 2-core local stack). Events are
# never sent early, at most this late.
PACING_SLACK_S = 0.02
# A broker that has not answered a connection in this long is not coming: say so and
# stop, rather than wait out aiokafka's 40 s request timeout per try.
BROKER_WAIT_S = 10.0

# Exit statuses (the module docstring says when).
EXIT_USAGE = 2
EXIT_UNREADABLE = 3
EXIT_NO_EVENTS = 4
EXIT_BROKER = 5
EXIT_STOPPED = 130  # SIGINT or SIGTERM, as a shell reports Ctrl-C


class ReplayError(Exception):
    """Why a replay stopped, in one line, and the exit status that says so."""

    exit_status = 1


class NothingToPublish(ReplayError):
    exit_status = EXIT_NO_EVENTS


class BrokerError(ReplayError):
    exit_status = EXIT_BROKER


class Progress:
    """A one-line progress report on stderr (a line every few seconds when not a terminal)."""

    def __init__(self, total: int | None, label: str = "replayed") -> None:
        self._total = total
        self._label = label
        self._started = time.monotonic()
        self._last = 0.0
        self._interval = 0.5 if sys.stderr.isatty() else 5.0
        self.count = 0

    def advance(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._print(final=False)

    def _print(self, *, final: bool) -> None:
        rate = self.count / max(time.monotonic() - self._started, 1e-9)
        of = f"/{self._total:,} ({100 * self.count / self._total:.0f}%)" if self._total else ""
        end = "\n" if final or not sys.stderr.isatty() else "\r"
        print(f"{self._label} {self.count:,}{of} at {rate:,.0f} events/s", end=end, file=sys.stderr)

    def done(self) -> None:
        self._print(final=True)


def in_session(events: Iterable[MarketEvent], session: int) -> Iterator[MarketEvent]:
    """The events, each in ``session``."""
    for event in events:
        yield dataclasses.replace(event, session=session)


def rebased(events: Iterable[MarketEvent], now_us: int, *, end_now: bool) -> Iterator[MarketEvent]:
    """The events with exchange times shifted so that the first one is ``now_us`` (for a
    paced replay, which keeps up with the clock) or the last one is (for a replay at full
    speed, so that no event is stamped in the future: the consumer refuses those)."""
    if end_now:
        events = list(events)
        if not events:
            return
        shift = now_us - events[-1].exchange_time_us
    else:
        events = iter(events)
        first = next(events, None)
        if first is None:
            return
        shift = now_us - first.exchange_time_us
        events = itertools.chain([first], events)
    for event in events:
        yield dataclasses.replace(event, exchange_time_us=event.exchange_time_us + shift)


async def replay(
    events: Iterable[MarketEvent],
    *,
    bootstrap: str,
    topic: str,
    speed: float | None,
    progress: Progress,
) -> int:
    """Publishes the events in order; ``speed`` None is as fast as possible. Returns the
    count. Raises ``BrokerError`` when the broker does not answer within
    ``BROKER_WAIT_S`` or fails a send, and ``UnreadableFile`` from ``events`` once the
    events read before it are published (``progress.count``)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)
    try:  # stopped however it ends: a failure, or cancelled (SIGINT, SIGTERM)
        try:
            with _quiet("aiokafka"):  # it logs each failed try; the error says it once
                await asyncio.wait_for(producer.start(), BROKER_WAIT_S)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise BrokerError(f"broker {bootstrap} unreachable: {_unreachable(exc)}") from exc
        try:
            await _publish(producer, events, topic, speed, progress)
        except KafkaError as exc:
            raise BrokerError(f"broker {bootstrap} failed a send: {exc}") from exc
    finally:
        await producer.stop()
    progress.done()
    return progress.count


async def _publish(
    producer: AIOKafkaProducer,
    events: Iterable[MarketEvent],
    topic: str,
    speed: float | None,
    progress: Progress,
) -> None:
    first_event_us: int | None = None
    started = time.monotonic()
    pending = []
    try:
        for event in events:
            if speed is not None:
                if first_event_us is None:
                    first_event_us = event.exchange_time_us
                due = started + (event.exchange_time_us - first_event_us) / 1e6 / speed
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay + PACING_SLACK_S)
            pending.append(
                await producer.send(topic, key=event.symbol.encode(), value=encode(event))
            )
            if len(pending) >= _CHUNK:
                await asyncio.gather(*pending)
                progress.advance(len(pending))
                pending.clear()
    except UnreadableFile:
        # Those read before the file broke off were sent: they go out, and are counted.
        await asyncio.gather(*pending)
        progress.advance(len(pending))
        raise
    await asyncio.gather(*pending)
    progress.advance(len(pending))


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unreachable(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer in {BROKER_WAIT_S:.0f} s"
    if isinstance(exc, KafkaConnectionError):
        return "connection refused or failed (is it running? --bootstrap names it)"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def first_read(
    events: Iterable[MarketEvent], source: str, summary: ReplaySummary
) -> Iterator[MarketEvent]:
    """``events``, the first of them read now, before the broker is reached: a recording
    with nothing to publish raises ``NothingToPublish``, saying what its lines were."""
    events = iter(events)
    first = next(events, None)
    if first is None:
        examples = summary.malformed_examples[:1]
        lines = f"{summary.lines:,} lines, {summary.malformed:,} malformed" + "".join(
            f" ({example})" for example in examples
        )
        skipped = ", ".join(f"{kind} {n}" for kind, n in summary.skipped.most_common())
        if skipped:
            lines += f", skipped: {skipped}"
        held = sum(counts.dropped for counts in summary.symbols.values())
        if held:
            lines += f", {held:,} events not published (no book yet, or out of sync)"
        raise NothingToPublish(f"no events in {source}: {lines}; nothing was published")
    return itertools.chain([first], events)


def _events(
    args: argparse.Namespace, summary: ReplaySummary, parser: argparse.ArgumentParser
) -> tuple[Iterable[MarketEvent], int | None]:
    if args.source == "coinbase":  # the older spelling: --source coinbase --path FILE
        if args.path is None:
            parser.error("--source coinbase needs --path to the recording")
        args.source = f"coinbase:{args.path}"
    if args.source != "generator":
        try:
            source = Source.parse(args.source)
        except ValueError as exc:
            parser.error(str(exc))
        return source.events(summary), None
    from feature_cache.generator import MarketGenerator

    generator = MarketGenerator(
        args.symbols.split(","),
        seed=args.seed,
        start_time_us=time.time_ns() // 1000,  # rebased below
        events_per_second=args.events_per_second,
    )
    if args.count <= 0:  # endless, for the local stack
        return itertools.chain.from_iterable(iter(lambda: generator.events(10_000), None)), None
    return generator.events(args.count), args.count


def _parser() -> argparse.ArgumentParser:
    kafka = FeatureCacheSettings().kafka
    parser = argparse.ArgumentParser(
        prog="python -m feature_cache.replay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--source",
        default="generator",
        help=f"generator, or KIND:PATH with KIND one of {', '.join(KINDS)} (a file or a folder)",
    )
    parser.add_argument("--path", type=Path, help="the recording, for --source coinbase")
    parser.add_argument("--symbols", default="BTC-USD,ETH-USD,SOL-USD")
    parser.add_argument("--count", type=int, default=10_000, help="generator events; 0: endless")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--events-per-second", type=float, default=200.0, help="generator rate")
    parser.add_argument("--speed", default="max", help="1 (real time), N (N times) or max")
    parser.add_argument(
        "--keep-times", action="store_true", help="do not rebase exchange times to now"
    )
    parser.add_argument(
        "--bootstrap",
        default=kafka.bootstrap_servers,
        help=f"the broker (default {kafka.bootstrap_servers}; a stack started with "
        "--port-offset N: 127.0.0.1:19092+N)",
    )
    parser.add_argument("--topic", default=kafka.topic)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """The replay ``argv`` asks for; returns the exit status (the module docstring's)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        speed = None if args.speed == "max" else float(args.speed)
    except ValueError:
        parser.error(f"--speed {args.speed!r}: 1 (real time), N (N times) or max")
    summary = ReplaySummary()
    session = time.time_ns() // 1000
    events, total = _events(args, summary, parser)
    events = in_session(events, session)
    if not args.keep_times:
        if speed is None and total is None and args.source == "generator":
            parser.error("an endless generator needs a paced --speed (or --keep-times)")
        events = rebased(events, time.time_ns() // 1000, end_now=speed is None)
    progress = Progress(total)
    try:
        count = asyncio.run(
            replay(
                first_read(events, args.source, summary),
                bootstrap=args.bootstrap,
                topic=args.topic,
                speed=speed,
                progress=progress,
            )
        )
    except UnreadableFile as exc:
        published = (
            f"{progress.count:,} events were published before it"
            if progress.count
            else "nothing was published"
        )
        return _failed(EXIT_UNREADABLE, f"cannot read {exc}; {published}")
    except ReplayError as exc:
        return _failed(exc.exit_status, str(exc))
    print(f"published {count:,} events to {args.topic} in session {session}", file=sys.stderr)
    if args.source != "generator":
        print(summary.table(), file=sys.stderr)
    return 0


def _failed(status: int, message: str) -> int:
    print(f"replay: {message}", file=sys.stderr)
    return status


def main() -> None:
    # SIGTERM stops it as Ctrl-C does: as a container's first process (PID 1) Python would
    # ignore it, and be killed only at the end of the grace period.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        status = run()
    except KeyboardInterrupt:
        print("replay: stopped", file=sys.stderr)
        status = EXIT_STOPPED
    sys.exit(status)


if __name__ == "__main__":
    main()
