"""The load driver: closed- and open-loop gRPC calls from worker processes, HdrHistogram
latencies (1 us .. 60 s, 3 significant digits).

A ``LoadSpec`` says what to call (``decide``; ``stream``: DecideStream, a stream a
connection; ``echo``; ``torchserve``; Triton's ``oip``), how (``closed``: ``concurrency``
callers, each backing off after a refusal; ``open``: ``rate_per_s`` on a fixed schedule,
latency from the *scheduled* send, so a generator that falls behind shows as latency, not
fewer samples) and its bounds (loopback only, ``seconds`` after ``warmup_s``, ...).
``LoadGenerator`` splits it over spawned processes, each with ``channels`` connections
used in turn, and merges their results; ``loadtest.bench`` is its command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.pool import Pool
from typing import Any, Literal

import grpc
import uvloop

# hdrhistogram ships no type stubs or py.typed marker; HdrHistogram is used as Any.
from hdrh.histogram import HdrHistogram

from core.backoff import Backoff
from core.deadline import DEFAULT_BUDGET_MS
from decision_client.channel import CALLER_OPTIONS
from decision_client.stream import DecideStreamClient
from decision_client.v1 import decision_pb2, decision_pb2_grpc
from feature_cache.schema import MODEL_INPUT_WIDTH, pack_rows
from loadtest.locust_scenarios import is_loopback
from proto.third_party.torchserve import inference_pb2, inference_pb2_grpc
from server.oip import oip_model_infer, oip_request
from torchserve.triton import TRITON_OIP_SERVICE as OIP_SERVICE

Target = Literal["decide", "stream", "echo", "torchserve", "oip"]
Mode = Literal["closed", "open"]
Call = Callable[[], Awaitable[str]]
"""One request; returns a label for the answer (a Decide source), raises AioRpcError."""

LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS = 1, 60_000_000, 3
REFUSALS = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED"})
"""The codes a server (or the channel) refuses a call with, to be retried elsewhere:
CANCELLED is gRPC's core ending a call past the server's queue limit (docs/overload.md)."""
# A refused closed-loop caller waits before its next call, as a caller that retries
# elsewhere would: resending at once only spins, on the CPU the server needs when they
# share a machine. From 1 ms (about what a refusal takes), doubling up to a deadline.
REFUSED_BACKOFF_S, REFUSED_BACKOFF_MAX_S = 0.001, DEFAULT_BUDGET_MS / 1000
MAX_SECONDS = 600.0


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def merge_histograms(encoded: Iterable[bytes]) -> HdrHistogram:
    """One histogram holding every value of the encoded ones."""
    merged = new_histogram()
    for blob in encoded:
        merged.add(HdrHistogram.decode(blob))
    return merged


@dataclass(frozen=True)
class LoadSpec:
    target: Target
    address: str
    mode: Mode
    seconds: float
    max_requests: int
    concurrency: int = 1
    rate_per_s: float = 0.0
    warmup_s: float = 0.5
    timeout_s: float = 1.0
    processes: int = 1
    channels: int = 1
    """Connections per process, called in turn."""
    model_name: str = "champion"
    rows: int = 1
    """Rows a model server's call carries (``torchserve``, ``oip``)."""
    phase_s: float = 0.0
    """Open loop: this share's schedule starts this much later (set by ``shares``)."""
    burst: int = 1
    """Open loop: calls sent at once, each process's, at the same mean rate."""
    caller_options: bool = True
    """``decision_client.channel.CALLER_OPTIONS`` on the channels; False: a plain channel."""

    def __post_init__(self) -> None:
        if not is_loopback(self.address):
            raise ValueError(f"loopback addresses only, not {self.address!r}")
        if not 0 < self.seconds <= MAX_SECONDS or not 0 <= self.warmup_s <= MAX_SECONDS:
            raise ValueError(f"seconds and warmup_s must be within (0, {MAX_SECONDS:g}]")
        if (
            min(self.max_requests, self.processes, self.channels, self.rows, self.burst) < 1
            or self.timeout_s <= 0
        ):
            raise ValueError(
                "max_requests, processes, channels, rows, burst and timeout_s must be positive"
            )
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError("closed loop needs concurrency >= 1")
        if self.mode == "open" and self.rate_per_s <= 0:
            raise ValueError("open loop needs rate_per_s > 0")

    def shares(self) -> list[LoadSpec]:
        """The spec split into one part per process, which together make this spec.

        Open loop: each process sends every ``processes``-th call of one schedule (its
        rate divided, its start shifted), so the merged sends stay evenly spaced.
        """
        count = min(self.processes, self.concurrency) if self.mode == "closed" else self.processes
        count = min(count, self.max_requests)
        parts = []
        for index in range(count):
            parts.append(
                dataclasses.replace(
                    self,
                    processes=1,
                    concurrency=_part(self.concurrency, count, index),
                    max_requests=_part(self.max_requests, count, index),
                    rate_per_s=self.rate_per_s / count,
                    phase_s=index / self.rate_per_s if self.mode == "open" else 0.0,
                )
            )
        return parts


def _part(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


@dataclass
class WorkerResult:
    """What one process measured; plain data, so it pickles back to the parent."""

    histogram: bytes
    refusals: bytes
    """Latencies of the calls refused (``REFUSALS``), as the caller saw them."""
    ok: int
    errors: dict[str, int]
    answers: dict[str, int]
    elapsed_s: float
    cpu_s: float
    """CPU time the process used while measuring, its gRPC threads included."""
    pid: int
    send_lag_max_s: float = 0.0
    """Open loop: how far behind its schedule it sent at most (a lag in its latencies)."""


class Recorder:
    """Counts and times the calls of one process."""

    def __init__(self) -> None:
        self.histogram = new_histogram()
        self.refusals = new_histogram()
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()
        self.send_lag_max_s = 0.0  # how far behind its schedule an open loop sent

    async def observe(self, call: Call, since: float) -> bool:
        """Runs ``call``; an OK answer's latency is counted from ``since`` (perf_counter).
        Whether the call was refused."""
        try:
            answer = await call()
        except grpc.aio.AioRpcError as exc:
            self.errors[exc.code().name] += 1
            if exc.code().name in REFUSALS:
                refused_us = round((time.perf_counter() - since) * 1e6)
                self.refusals.record_value(min(max(refused_us, LOWEST_US), HIGHEST_US))
                return True
        else:
            latency_us = round((time.perf_counter() - since) * 1e6)
            self.histogram.record_value(min(max(latency_us, LOWEST_US), HIGHEST_US))
            self.ok += 1
            self.answers[answer] += 1
        return False

    def result(self, elapsed_s: float, cpu_s: float) -> WorkerResult:
        return WorkerResult(
            histogram=self.histogram.encode(),
            refusals=self.refusals.encode(),
            ok=self.ok,
            errors=dict(self.errors),
            answers=dict(self.answers),
            elapsed_s=elapsed_s,
            cpu_s=cpu_s,
            pid=os.getpid(),
            send_lag_max_s=self.send_lag_max_s,
        )


async def closed_loop(
    call: Call, recorder: Recorder, *, concurrency: int, seconds: float, max_requests: int
) -> float:
    """``concurrency`` callers for ``seconds``, each backing off after a refusal (not past
    the end); returns the elapsed time, last answer included."""
    start = time.perf_counter()
    stop_at = start + seconds
    sent = 0

    async def caller() -> None:
        nonlocal sent
        backoff = Backoff(initial_s=REFUSED_BACKOFF_S, max_s=REFUSED_BACKOFF_MAX_S)
        while sent < max_requests and time.perf_counter() < stop_at:
            sent += 1
            if await recorder.observe(call, time.perf_counter()):
                await asyncio.sleep(min(backoff.next_s(), max(0.0, stop_at - time.perf_counter())))
            else:  # answered, or failed otherwise (a timeout has waited long enough)
                backoff.reset()

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return time.perf_counter() - start


async def open_loop(
    call: Call,
    recorder: Recorder,
    *,
    rate_per_s: float,
    seconds: float,
    max_requests: int,
    phase_s: float = 0.0,
    burst: int = 1,
) -> float:
    """Calls sent every 1/rate s (``burst`` at once every ``burst``/rate s) for ``seconds``
    whatever the answers; returns the elapsed time from the first scheduled send to the
    last answer."""
    interval = 1.0 / rate_per_s
    count = max(1, min(max_requests, int(seconds * rate_per_s)))
    start = time.perf_counter() + phase_s
    pending: set[asyncio.Task[bool]] = set()
    for i in range(count):
        scheduled = start + (i - i % burst) * interval
        delay = scheduled - time.perf_counter()
        # Behind schedule it still yields once per send, so answers are read between sends.
        await asyncio.sleep(max(delay, 0.0))
        # The event loop's timers and a busy loop wake us late; the call is still charged
        # from its scheduled time, or a stalled generator would hide a slow server.
        recorder.send_lag_max_s = max(recorder.send_lag_max_s, time.perf_counter() - scheduled)
        task = asyncio.create_task(recorder.observe(call, scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    return time.perf_counter() - start


def make_call(channel: grpc.aio.Channel, spec: LoadSpec) -> Call:
    if spec.target in ("decide", "echo", "stream"):
        decide = decision_pb2_grpc.DecisionServiceStub(channel).Decide
        stream, ids = DecideStreamClient(channel), itertools.count()
        order: dict[str, Any] = {"symbol": "BTC-USD", "side": 1, "quantity": 1.0}  # SIDE_BUY
        request = decision_pb2.DecideRequest(**order)

        async def call_decide() -> str:
            if spec.target == "stream":
                one = decision_pb2.DecideRequest(request_id=f"{next(ids)}", **order)
                response = await stream.decide(one, spec.timeout_s)
            else:
                response = await decide(request, timeout=spec.timeout_s)
            return decision_pb2.Source.Name(response.source)

        return call_decide
    rows = [[0.1] * MODEL_INPUT_WIDTH] * spec.rows
    if spec.target == "oip":
        infer = oip_model_infer(channel, OIP_SERVICE)
        one_row = oip_request(spec.model_name, rows)

        async def call_oip() -> str:
            await infer(one_row, timeout=spec.timeout_s)
            return "scored"

        return call_oip
    predictions = inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions
    ts_request = inference_pb2.PredictionsRequest(
        model_name=spec.model_name, input={"rows": pack_rows(rows)}
    )

    async def call_torchserve() -> str:
        response = await predictions(ts_request, timeout=spec.timeout_s)
        # The handler answers a rejected row with an error document, not a gRPC status.
        return "rejected" if b'"error"' in response.prediction else "scored"

    return call_torchserve


async def drive(call: Call, recorder: Recorder, spec: LoadSpec, seconds: float) -> float:
    """Runs ``spec``'s loop for ``seconds``; returns the elapsed time."""
    if spec.mode == "closed":
        return await closed_loop(call, recorder, concurrency=spec.concurrency, seconds=seconds,
                                 max_requests=spec.max_requests)  # fmt: skip
    return await open_loop(call, recorder, rate_per_s=spec.rate_per_s, seconds=seconds,
                           max_requests=spec.max_requests, phase_s=spec.phase_s,
                           burst=spec.burst)  # fmt: skip


def in_turn(calls: Sequence[Call]) -> Call:
    """One call that goes to each of ``calls`` in turn."""
    turn = itertools.cycle(calls)

    async def call() -> str:
        return await next(turn)()

    return call


async def _measure(spec: LoadSpec) -> WorkerResult:
    # A subchannel pool of its own per channel: otherwise channels to one address share
    # one TCP connection, and a server's workers would see one connection.
    options = [
        *(CALLER_OPTIONS if spec.caller_options else ()),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(
                grpc.aio.insecure_channel(spec.address, options=options)
            )
            for _ in range(spec.channels)
        ]
        for channel in channels:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(channel.channel_ready(), timeout=2.0)
        call = in_turn([make_call(channel, spec) for channel in channels])
        if spec.warmup_s > 0:
            await drive(call, Recorder(), spec, spec.warmup_s)
        recorder, cpu_start = Recorder(), time.process_time()
        elapsed_s = await drive(call, recorder, spec, spec.seconds)
        return recorder.result(elapsed_s, time.process_time() - cpu_start)


def run_worker(spec: LoadSpec) -> WorkerResult:
    """One process's share, on its own uvloop event loop (the pool's task function); what
    lives on is frozen out of full collections, which stalled a share 120-200 ms."""
    gc.collect()
    gc.freeze()
    return uvloop.run(_measure(spec))


def _ready(_: int) -> int:
    # Held long enough that every idle worker takes one, proving all have started.
    time.sleep(0.3)
    return os.getpid()


@dataclass
class LoadResult:
    """A spec's measurement: what its processes returned, over ``runs`` runs (rounds)."""

    spec: LoadSpec
    workers: list[WorkerResult]
    runs: int = 1

    def __post_init__(self) -> None:
        self.histogram = merge_histograms(w.histogram for w in self.workers)
        self.refusals = merge_histograms(w.refusals for w in self.workers)

    @classmethod
    def combine(cls, rounds: list[LoadResult]) -> LoadResult:
        """Rounds of one spec: histograms and counts added, throughput averaged."""
        workers = [w for one in rounds for w in one.workers]
        return cls(rounds[0].spec, workers, sum(one.runs for one in rounds))

    @property
    def ok(self) -> int:
        return sum(w.ok for w in self.workers)

    @property
    def errors(self) -> dict[str, int]:
        return dict(sum((Counter(w.errors) for w in self.workers), Counter()))

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def answers(self) -> dict[str, int]:
        return dict(sum((Counter(w.answers) for w in self.workers), Counter()))

    @property
    def send_lag_max_ms(self) -> float:
        return max((w.send_lag_max_s for w in self.workers), default=0.0) * 1000.0

    @property
    def throughput_per_s(self) -> float:
        # Per process: each timed its own window, and the windows of one run overlap.
        return sum(w.ok / w.elapsed_s for w in self.workers if w.elapsed_s > 0) / self.runs

    @property
    def generator_cores(self) -> float:
        """CPU cores the load generator itself kept busy: near 1 per process means the
        generator, not the server, may be what limits the throughput."""
        return sum(w.cpu_s / w.elapsed_s for w in self.workers if w.elapsed_s > 0) / self.runs

    def percentile_ms(self, percent: float) -> float:
        if self.ok == 0:
            return float("nan")
        return float(self.histogram.get_value_at_percentile(percent)) / 1000

    @property
    def refused(self) -> int:
        return sum(n for code, n in self.errors.items() if code in REFUSALS)

    def refusal_percentile_ms(self, percent: float) -> float:
        """How long a refused call took to be refused, as the caller saw it."""
        if self.refused == 0:
            return float("nan")
        return float(self.refusals.get_value_at_percentile(percent)) / 1000


class LoadGenerator:
    """``processes`` spawned worker processes, reused from run to run; a context manager.
    Spawned, not forked: gRPC does not support a child inheriting its state."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: Pool | None = None

    def start(self) -> None:
        """Starts the workers without waiting for them (imports take a second or two)."""
        self._started()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Returns once every worker has started and imported the generator."""
        pool = self._started()
        deadline = time.monotonic() + timeout_s
        while len(set(pool.map(_ready, range(self.processes), chunksize=1))) < self.processes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.processes} load generator processes not ready")

    def run(self, spec: LoadSpec) -> LoadResult:
        shares = spec.shares()
        if len(shares) > self.processes:
            raise ValueError(f"{len(shares)} processes wanted, {self.processes} in the pool")
        # A worker that never answers must fail the run, not hang it.
        limit_s = spec.warmup_s + spec.seconds + 2 * spec.timeout_s + 30.0
        workers = self._started().map_async(run_worker, shares, chunksize=1).get(limit_s)
        if len({w.pid for w in workers}) != len(shares):
            # Two shares one after the other in one process would halve the load silently.
            raise RuntimeError("a load generator process ran more than one share")
        return LoadResult(spec, workers)

    def _started(self) -> Pool:
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(self.processes)
        return self._pool

    def stop(self) -> None:
        """Ends the worker processes (by pid, through the pool). Idempotent."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> LoadGenerator:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
