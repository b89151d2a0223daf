"""Both replicas slowed (not stopped) and the load past what they serve in time: every
call is answered before the caller's deadline or refused at once, the model keeps
answering what the replicas can serve, and once the load drops the breakers close within
5 s. And the server stopped for a moment under load loses only the calls that waited
through the stop. The server runs as users run it (``python -m server``, uvloop); the
load, the reference and the deadline follow this machine's speed, measured in the same
run, since these machines run 2-4 x slower on some days than on others (``LADDER_SHARE``,
``deadline_s``). The contract, and where a slow host misses it:
docs/overload.md#where-it-falls-short.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from core.processes import ManagedProcess
from decision_client.v1 import admin_pb2, decision_pb2
from loadtest.feature_keeper import fresh_features
from loadtest.loadgen import REFUSALS, LoadGenerator, LoadResult, LoadSpec
from server.breaker_probe import PROBE_ROW
from server.model_client import TorchServeClient
from tests.conftest import Replica
from tests.server.conftest import OPERATOR, VIEWER, ServerProcess, buy, slowed
from torchserve.replica import workers_lost

pytestmark = [pytest.mark.integration, pytest.mark.timed]

# The open-loop rate, as a share of the server's ladder-only throughput: 3-7 x what the
# slowed replicas serve. A fixed rate would be past what the server itself answers on a
# slow day (every answer late whatever it does) and nowhere near overload on a fast one.
# At 0.5 the server's own CPU was the limit besides the replicas (with the generator,
# both JVMs and the slowing on two cores).
LADDER_SHARE = 0.35
SECONDS = 6.0
# Past capacity with slowed replicas the contract (docs/overload.md) is every call
# answered in time or refused at once (p99 within 5 ms). On a slow host (2026-11-28, 11
# runs, the tree before that day's changes alike) 3-33 of ~2,400 calls (0.1-1.4 %) came
# late and refusals took 33-39 ms at p99, where quieter hours met it; on a slower day
# still (2026-11-29, the echo server at twice its usual CPU a call), 2.4-4.3 % late, the
# tree before that day's changes alike. These bounds catch a collapse (many late
# answers, refusals that outlast the deadline), not a slow host.
MAX_LATE_SHARE = 0.05
WARMUP_S = 1.0
# The callers' deadline, unless the replicas are too slow today for it (``deadline_s``).
DEADLINE_S = 0.05
# Each replica is held off the CPU this long, then let run as long, over and over.
SLOWING_MS = 8.0
# Of a caller's deadline, the server keeps back 12 ms for the answer's way back and 3 ms
# for the fallback ladder (the CallPlan: response margin, fallback reserve); the
# rest is the model's.
SERVER_KEEPS_MS = 15.0
# The server is held off the CPU this long once, mid-load: a stall of the host or of the
# process longer than any the 2-core VMs showed (10-40 ms), and six times the deadline.
SERVER_STOP_S = 0.3
# The load around the stop, as a share of the server's ladder-only throughput: a steady
# load with room to work off what queued meanwhile. At 0.35 (``LADDER_SHARE``, 896/s
# here) the two cores, shared with the load generator and both replicas, took a second
# to work off the queue, with the model skipped for lack of budget meanwhile.
STOP_LOAD_SHARE = 0.2
# How long after the stop the ladder may answer: the queue's time to drain. A breaker
# opened on timeouts the stop caused stays open 2 s, and then lets the model in slowly.
RECOVERY_S = 1.0
# How long the server may take to settle on the slowed replicas before the reference.
SETTLE_S = 15.0
MODEL_SOURCES = (decision_pb2.SOURCE_PRIMARY, decision_pb2.SOURCE_SECONDARY)
REPLICAS = ("primary", "secondary")


async def stopped_once(proc: ManagedProcess, *, after_s: float, for_s: float) -> float:
    """``proc`` (its whole group) held off the CPU once: ``for_s`` from ``after_s``.
    Returns when it was stopped (``time.monotonic``)."""
    await asyncio.sleep(after_s)
    proc.pause()
    stopped_at = time.monotonic()
    try:
        await asyncio.sleep(for_s)
    finally:
        proc.resume()
    return stopped_at


async def set_breakers(server: ServerProcess, mode: admin_pb2.BreakerMode.ValueType) -> None:
    for replica in REPLICAS:
        await server.admin.SetBreaker(
            admin_pb2.SetBreakerRequest(replica=replica, mode=mode, reason="overload test"),
            metadata=OPERATOR,
            timeout=5.0,
        )


def decide_load(server: ServerProcess, **load: Any) -> LoadSpec:
    """Decide calls to ``server`` over two connections, shaped by ``load`` (LoadSpec's
    fields: mode, duration, concurrency or rate, deadline)."""
    load.setdefault("max_requests", 100_000)
    return LoadSpec(target="decide", address=f"127.0.0.1:{server.port}", channels=2, **load)


def open_load(server: ServerProcess, rate: float, timeout_s: float) -> LoadSpec:
    """``rate`` Decide calls a second for ``SECONDS`` after ``WARMUP_S``, each with a
    deadline of ``timeout_s``."""
    return decide_load(
        server,
        mode="open",
        seconds=SECONDS,
        warmup_s=WARMUP_S,
        max_requests=int(rate * SECONDS),
        rate_per_s=rate,
        timeout_s=timeout_s,
    )


async def ladder_throughput(server: ServerProcess, generator: LoadGenerator) -> float:
    """Decisions a second the server answers with both breakers forced open (closed
    loop, 16 callers): what it can do without the model on this machine today."""
    await set_breakers(server, admin_pb2.BREAKER_MODE_FORCE_OPEN)
    spec = decide_load(
        server, mode="closed", seconds=2.0, warmup_s=0.5, concurrency=16, timeout_s=1.0
    )
    try:
        result = await asyncio.to_thread(generator.run, spec)
    finally:
        await set_breakers(server, admin_pb2.BREAKER_MODE_AUTO)
    # Sixteen callers keep more calls waiting than the server's queue limit holds: the
    # excess is refused (each refused caller backs off), not queued.
    assert result.ok > 0 and not set(result.errors) - REFUSALS, result.errors
    return result.throughput_per_s


async def model_answers_in_time(server: ServerProcess) -> None:
    """Waits (at most 20 s: a replica the ladder measurement left alone is idle) until
    the model answers in time again."""
    deadline = time.monotonic() + 20.0
    while True:
        response = await server.decisions.Decide(buy(), timeout=1.0)
        if response.source in MODEL_SOURCES:
            return
        assert time.monotonic() < deadline, response.reason
        await asyncio.sleep(0.05)


async def model_back(server: ServerProcess, within_s: float, why: str) -> None:
    """Waits until both breakers are closed and the model answers a decision; fails after
    ``within_s`` with what it saw last, and ``why``."""
    deadline = time.monotonic() + within_s
    while True:
        response = await server.decisions.Decide(buy(), timeout=1.0)
        status = await server.admin.GetStatus(
            admin_pb2.GetStatusRequest(), metadata=VIEWER, timeout=1.0
        )
        states = {r.name: r.breaker_state for r in status.replicas if r.name in REPLICAS}
        if set(states.values()) == {"closed"} and response.source in MODEL_SOURCES:
            return
        assert time.monotonic() < deadline, (states, response.reason, why)
        await asyncio.sleep(0.05)


async def answer_time_p90_ms(replica: Replica, seconds: float = 1.0) -> float:
    """The replica's p90 answer time to one row, called directly one call at a time for
    ``seconds``: how fast this machine runs TorchServe now."""
    client = TorchServeClient(replica.name, replica.address, replica.model_name)
    await client.start()
    try:
        times_ms: list[float] = []
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            started = time.perf_counter()
            await client.predict([PROBE_ROW], timeout_s=1.0)
            times_ms.append((time.perf_counter() - started) * 1000.0)
    finally:
        await client.stop()
    times_ms.sort()
    return times_ms[int(0.9 * (len(times_ms) - 1))]


def deadline_s(answer_p90_ms: float) -> float:
    """The callers' deadline: ``DEADLINE_S``, or longer when the replicas answer so slowly
    today (p90 ``answer_p90_ms`` unslowed) that a slowed one would not fit in what it
    leaves the model. A slowed replica's answer can wait out one stop and then take twice
    its time (it runs half the time); the model's part of the deadline holds two such
    answers, as a request that arrives just after a call went out waits for it and goes in
    the next. Measured here: p90 1.4-3.2 ms on a quiet hour (50-54 ms), 4-9 ms with a busy
    loop beside the test (57-78 ms), 8-13 ms with two, where slowed replicas answered with
    a p90 of 16-23 ms and a 50 ms deadline left the model 25 ms."""
    slowed_ms = SLOWING_MS + 2.0 * answer_p90_ms
    return max(DEADLINE_S, (2.0 * slowed_ms + SERVER_KEEPS_MS) / 1000.0)


def within_capacity(server: ServerProcess, timeout_s: float) -> LoadSpec:
    """Four callers, each waiting for its answer: a load the slowed replicas keep up with."""
    return decide_load(
        server, mode="closed", seconds=3.0, warmup_s=0.5, concurrency=4, timeout_s=timeout_s
    )


def lost_since(before: dict[str, int], replicas: dict[str, Replica]) -> dict[str, int]:
    """Workers each replica has lost since ``before`` (a replica left without one answers
    nothing for minutes: the likeliest cause when the model stops answering)."""
    return {name: workers_lost(r.dir) - before[name] for name, r in replicas.items()}


def modelled(result: LoadResult) -> int:
    return sum(
        n for s, n in result.answers.items() if decision_pb2.Source.Value(s) in MODEL_SOURCES
    )


async def test_slowed_replicas_past_capacity_answer_in_time_and_recover(
    server_processes, replicas, redis_instance, key_prefix
):
    async with fresh_features(redis_instance.url, key_prefix):
        [server] = server_processes(1)
        lost_before = {name: workers_lost(r.dir) for name, r in replicas.items()}
        try:
            await model_answers_in_time(server)
            with LoadGenerator(processes=1) as generator:
                await asyncio.to_thread(generator.wait_ready)
                rate = LADDER_SHARE * await ladder_throughput(server, generator)
                await model_answers_in_time(server)
                answer_p90_ms = max([await answer_time_p90_ms(r) for r in replicas.values()])
                timeout_s = deadline_s(answer_p90_ms)
                spec = open_load(server, rate, timeout_s)
                procs = [r.proc for r in replicas.values()]
                async with slowed(procs, stopped_ms=SLOWING_MS, running_ms=SLOWING_MS):
                    # The slowing's onset can time calls out and open both breakers (for
                    # 2 s, then probed): in a failed CI run that took most of the 3 s
                    # reference. The reference is what the slowed replicas serve once
                    # the server has settled on them.
                    await model_back(
                        server,
                        SETTLE_S,
                        f"slowed, workers lost {lost_since(lost_before, replicas)}",
                    )
                    served = await asyncio.to_thread(
                        generator.run, within_capacity(server, timeout_s)
                    )
                    result = await asyncio.to_thread(generator.run, spec)

            served_per_s = modelled(served) / served.spec.seconds
            seen = (
                f"replicas' p90 {answer_p90_ms:.1f} ms unslowed, deadline {timeout_s * 1000:.0f}"
                f" ms; at {rate:.0f}/s: answers {result.answers}, errors {result.errors},"
                f" p99 {result.percentile_ms(99):.1f} ms, refusals' p50/p90/p99"
                f" {result.refusal_percentile_ms(50):.1f}/{result.refusal_percentile_ms(90):.1f}"
                f"/{result.refusal_percentile_ms(99):.1f} ms, the generator up to"
                f" {result.send_lag_max_ms:.1f} ms behind; within capacity the model answered"
                f" {served_per_s:.0f}/s ({served.answers}, errors {served.errors}); TorchServe"
                f" workers lost {lost_since(lost_before, replicas)}"
            )
            # Within capacity the replicas, slowed as they are, keep up: the reference. The
            # model gave 34-99 % of the answers in 29 of 30 runs at a fixed 50 ms deadline,
            # but on slow hours (2026-11-25, and in CI) the reference collapsed in 8 runs of
            # 10: the slowed replicas answered later than the 25 ms that deadline left the
            # model (reproduced with two busy loops beside the test: p90 16-23 ms, one call
            # at a time), so both breakers opened, and the four callers, answered at once by
            # the ladder, then kept the replicas off the CPU. With the deadline following the
            # replicas' speed the model gave 99-100 % of the reference in 22 of 22 runs (3
            # quiet, 16 with a busy loop beside the test, 3 with two). A lower reference
            # makes the comparison past capacity below easier, so it must stay well above
            # nothing.
            assert modelled(served) >= 0.25 * served.ok > 0, seen
            assert result.ok > 0.5 * rate * SECONDS, seen
            # Every call is answered or refused, nothing else: gRPC's core refuses what
            # waits for the event loop past its queue limit, and the callers' channels what
            # is past the stream cap (how soon and how few late: ``MAX_LATE_SHARE``).
            assert not set(result.errors) - {"DEADLINE_EXCEEDED", *REFUSALS}, seen
            late = result.errors.get("DEADLINE_EXCEEDED", 0)
            assert late <= MAX_LATE_SHARE * (result.ok + result.error_count), seen
            if result.refused:  # refused before the deadline, not held until it
                # p90, not p99: quiet runs refuse in 3-4 ms at p99, but one stall of the
                # VM (tens of ms, these hosts have them) holds every call sent meanwhile,
                # about 100 at this rate: 1-4 % of the refusals (p99 75 ms in a CI run,
                # 2026-11-30). A server holding refusals would fail p90 too.
                assert result.refusal_percentile_ms(90) < 1000 * timeout_s, seen
            # No collapse onto the ladder: past capacity the model answers at least as many
            # a second as within it (its calls carry more rows as the load grows; 1.8-3.2 x
            # measured at 0.35, and 0.3-0.5 x when it collapsed). Once in 16 runs with a busy
            # loop beside the test it was 0.5 x with no breaker open: the server's own CPU was
            # the limit, and it shed to the ladder (admission limit at 5, its floor 4 then;
            # budgets spent before the model step), as it should; the two-core machine gives
            # no more.
            assert modelled(result) / SECONDS >= served_per_s, seen

            # The load and the slowing are over: within 5 s the model answers and both
            # breakers are closed again.
            await model_back(
                server, 5.0, f"workers lost since the start {lost_since(lost_before, replicas)}"
            )
        finally:
            await server.close()


async def test_a_stopped_server_loses_only_the_calls_that_waited_through_the_stop(
    server_processes, redis_instance, key_prefix
):
    """A server held off the CPU for ``SERVER_STOP_S`` under steady load (a fifth of what
    it answers from the ladder alone) loses the calls that arrived while it was stopped,
    and no more: the calls behind them are answered in time, and from the model once the
    queue has drained. A server that kept shedding to the ladder after the stop fails
    here (a stall margin of 400 ms, since removed, made the ladder answer 1.0 s of calls
    after the stop, in two runs of two); a breaker opened on the timeouts the stop caused
    would keep the model out for its 2 s reset timeout and more."""
    async with fresh_features(redis_instance.url, key_prefix):
        [server] = server_processes(1)
        try:
            await model_answers_in_time(server)
            with LoadGenerator(processes=1) as generator:
                await asyncio.to_thread(generator.wait_ready)
                rate = STOP_LOAD_SHARE * await ladder_throughput(server, generator)
                await model_answers_in_time(server)
                spec = open_load(server, rate, DEADLINE_S)
                # Stopped in the middle of the measured seconds.
                stop = asyncio.create_task(
                    stopped_once(server.proc, after_s=WARMUP_S + SECONDS / 2, for_s=SERVER_STOP_S)
                )
                began = time.monotonic()
                try:
                    result = await asyncio.to_thread(generator.run, spec)
                finally:
                    stopped_at = await stop
                ended = time.monotonic()
            # The load generator's processes were ready: the load began with the call, and
            # the stop came within its measured seconds, or the counts below mean nothing.
            assert began + WARMUP_S < stopped_at < ended - SERVER_STOP_S, (began, ended)
            late = result.errors.get("DEADLINE_EXCEEDED", 0)
            # The calls sent while the server was stopped, and those sent within the
            # deadline before it stopped (they cannot be answered by then either).
            held_up = rate * (SERVER_STOP_S + DEADLINE_S)
            seen = (
                f"at {rate:.0f}/s with the server stopped {SERVER_STOP_S * 1000:.0f} ms:"
                f" answers {result.answers}, errors {result.errors}, the stop held up about"
                f" {held_up:.0f} calls"
            )
            # Measured here (2026-11-26, three runs at 242-470/s, before the stream cap):
            # 65-135 late of 85-165 held up, and the ladder answered 0-51 calls. Read from
            # the audit records of a run at 1,100/s, the model answered every decision again
            # within 0.1-0.2 s of the stop's end. Half again of what it held up is room for
            # a busy machine; seconds of late answers after it would be several times more.
            # The stream cap does not bound this: a call that reaches its deadline frees its
            # stream in the caller's channel, and the next call takes it (122 late at
            # 486/s with the cap, 2 x 16 streams).
            assert 0 < late <= 1.5 * held_up, seen
            assert not set(result.errors) - {"DEADLINE_EXCEEDED", *REFUSALS}, seen
            # All but the calls answered while the queue drained came from the model.
            assert result.ok - modelled(result) <= rate * RECOVERY_S, seen
            # No breaker opened on the replicas for a stop that was the server's.
            await model_back(server, 1.0, seen)
        finally:
            await server.close()
