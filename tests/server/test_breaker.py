"""The asyncio adapter over pybreaker's state machine (pure logic, fake calls)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest

from server.breaker import AsyncCircuitBreaker, BreakerOpenError, CallWindow, RateRule


class Boom(Exception):
    pass


class NotTheReplicasFault(Exception):
    pass


async def fail() -> None:
    raise Boom


async def succeed() -> str:
    return "ok"


def breaker(**kwargs: object) -> AsyncCircuitBreaker:
    options: dict[str, Any] = {"fail_max": 3, "reset_timeout_s": 0.05, **kwargs}
    return AsyncCircuitBreaker("primary", **options)


async def test_opens_after_fail_max_failures_and_rejects_without_calling():
    cb = breaker()
    for _ in range(3):
        with pytest.raises(Boom):
            await cb.call(fail)
    assert cb.state == "open"
    called = False

    async def tracked() -> None:
        nonlocal called
        called = True

    with pytest.raises(BreakerOpenError):
        await cb.call(tracked)
    assert not called
    assert not cb.allows_call()


async def test_a_success_resets_the_failure_count():
    cb = breaker()
    for _ in range(2):
        with pytest.raises(Boom):
            await cb.call(fail)
    assert await cb.call(succeed) == "ok"
    with pytest.raises(Boom):
        await cb.call(fail)
    assert cb.state == "closed"


async def test_a_replica_failing_every_other_call_opens_on_its_failure_rate():
    # Each success resets the consecutive count: fail_max alone never opens it.
    cb = breaker(rates=RateRule(min_calls=20, failure_rate=0.25))
    for n in range(20):
        if n % 2:
            assert await cb.call(succeed) == "ok"
        else:
            with pytest.raises(Boom):
                await cb.call(fail)
        assert cb.state == ("open" if n == 19 else "closed"), n
    assert not cb.allows_call()


async def test_a_replica_failing_one_call_in_a_hundred_stays_closed():
    cb = breaker(rates=RateRule(min_calls=20, failure_rate=0.25))
    for n in range(300):
        if n % 100 == 50:
            with pytest.raises(Boom):
                await cb.call(fail)
        else:
            await cb.call(succeed)
    assert cb.state == "closed"
    assert cb.rates().calls == 300 and cb.rates().failure_rate == pytest.approx(0.01)


async def test_a_replica_answering_slowly_opens_on_its_slow_call_rate():
    cb = breaker(rates=RateRule(min_calls=10, slow_rate=0.5, slow_ms=5.0))

    async def slow() -> str:
        await asyncio.sleep(0.01)
        return "ok"

    for n in range(10):
        assert await (cb.call(slow) if n % 2 else cb.call(succeed)) == "ok"
    assert cb.state == "open"


async def test_rates_never_open_the_last_replica_that_could_take_the_calls():
    rule = RateRule(min_calls=4, failure_rate=0.25)
    primary, secondary = breaker(rates=rule), breaker(rates=rule)
    primary.peers, secondary.peers = [secondary], [primary]

    async def every_other_fails(cb: AsyncCircuitBreaker, calls: int) -> None:
        for n in range(calls):
            with pytest.raises(Boom) if n % 2 == 0 else contextlib.nullcontext():
                await cb.call(fail if n % 2 == 0 else succeed)

    await every_other_fails(secondary, 3)  # under min_calls: still a healthy peer
    await every_other_fails(primary, 4)
    assert primary.state == "open"
    # The secondary takes the calls and fails as often, but nothing else could take them.
    await every_other_fails(secondary, 40)
    assert secondary.state == "closed" and secondary.rates().failure_rate > 0.5


def test_the_window_forgets_calls_older_than_its_seconds():
    window = CallWindow(10)
    window.record(100.2, failed=True, slow=True)
    window.record(105.0, failed=False, slow=True)
    window.record(109.9, failed=False, slow=False)
    rates = window.rates(109.9)
    assert (rates.calls, rates.failure_rate, rates.slow_rate) == (3, 1 / 3, 2 / 3)
    assert window.rates(110.0).calls == 2  # second 100 left the window
    assert window.rates(119.9).calls == 0 and window.rates(119.9).failure_rate == 0.0


async def test_calls_in_flight_together_that_fail_together_count_once():
    cb = breaker(fail_max=2)
    stall = asyncio.Event()

    async def stalled() -> None:
        await stall.wait()
        raise Boom

    calls = [asyncio.create_task(cb.call(stalled)) for _ in range(5)]
    await asyncio.sleep(0)
    stall.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, Boom) for r in results)
    assert cb.state == "closed"  # one failure of the two it takes
    with pytest.raises(Boom):
        await cb.call(fail)  # begun after the stall: new evidence
    assert cb.state == "open"


async def test_half_open_trial_success_closes_and_failure_reopens():
    cb = breaker()
    for _ in range(3):
        with pytest.raises(Boom):
            await cb.call(fail)
    await asyncio.sleep(0.06)
    assert cb.allows_call()
    with pytest.raises(Boom):
        await cb.call(fail)  # the trial fails
    assert cb.state == "open"
    with pytest.raises(BreakerOpenError):
        await cb.call(succeed)
    await asyncio.sleep(0.06)
    assert await cb.call(succeed) == "ok"
    assert cb.state == "closed"


async def test_half_open_lets_a_doubling_number_of_trials_through_until_it_closes():
    cb = breaker(success_threshold=3)
    for _ in range(3):
        with pytest.raises(Boom):
            await cb.call(fail)
    await asyncio.sleep(0.06)
    release = asyncio.Event()

    async def slow_success() -> str:
        await release.wait()
        return "ok"

    first = asyncio.create_task(cb.call(slow_success))
    await asyncio.sleep(0)
    with pytest.raises(BreakerOpenError, match="1 trial call"):
        await cb.call(succeed)
    release.set()
    assert await first == "ok"
    assert cb.state == "half-open"  # one success of three
    release.clear()
    two = [asyncio.create_task(cb.call(slow_success)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(BreakerOpenError, match="2 trial call"):
        await cb.call(succeed)
    release.set()
    assert await asyncio.gather(*two) == ["ok", "ok"]
    assert cb.state == "closed"


async def test_a_failed_trial_reopens_the_breaker_whatever_the_others_do():
    cb = breaker(success_threshold=4)
    for _ in range(3):
        with pytest.raises(Boom):
            await cb.call(fail)
    await asyncio.sleep(0.06)
    assert await cb.call(succeed) == "ok"  # two trials at once from now on
    release = asyncio.Event()

    async def slow_success() -> str:
        await release.wait()
        return "ok"

    slow = asyncio.create_task(cb.call(slow_success))
    await asyncio.sleep(0)
    with pytest.raises(Boom):
        await cb.call(fail)
    assert cb.state == "open"
    release.set()
    assert await slow == "ok"
    assert cb.state == "open"  # a success that began half-open does not close it now


async def test_ignored_errors_and_cancellation_count_as_neither_failure_nor_success():
    cb = breaker(ignore=lambda exc: isinstance(exc, NotTheReplicasFault))

    async def caller_error() -> None:
        raise NotTheReplicasFault

    with pytest.raises(Boom):
        await cb.call(fail)
    for _ in range(5):
        with pytest.raises(NotTheReplicasFault):
            await cb.call(caller_error)

    async def hang() -> None:
        await asyncio.sleep(10)

    for _ in range(5):
        task = asyncio.create_task(cb.call(hang))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # Still one failure of three: the ignored and cancelled calls neither reset the
    # count nor added to it.
    with pytest.raises(Boom):
        await cb.call(fail)
    assert cb.state == "closed"
    with pytest.raises(Boom):
        await cb.call(fail)
    assert cb.state == "open"


async def test_trial_runs_half_open_and_a_late_result_does_not_decide_a_later_state():
    cb = breaker()
    release = asyncio.Event()

    async def slow_success() -> str:
        await release.wait()
        return "ok"

    late = asyncio.create_task(cb.call(slow_success))  # admitted while closed
    await asyncio.sleep(0)
    for _ in range(3):
        with pytest.raises(Boom):
            await cb.call(fail)
    assert cb.state == "open"
    await asyncio.sleep(0.06)
    release.set()
    assert await late == "ok"
    assert cb.state == "open"  # the late success was not the trial

    trial_release = asyncio.Event()

    async def slow_trial() -> str:
        await trial_release.wait()
        return "ok"

    trial = asyncio.create_task(cb.call(slow_trial))
    await asyncio.sleep(0)
    assert cb.state == "half-open"
    trial_release.set()
    await trial
    assert cb.state == "closed"


async def test_opening_and_closing_are_warnings_the_trials_between_are_info(caplog):
    cb = breaker(fail_max=1)
    with caplog.at_level(logging.INFO, logger="server.breaker"):
        with pytest.raises(Boom):
            await cb.call(fail)
        await asyncio.sleep(0.06)
        with pytest.raises(Boom):
            await cb.call(fail)  # a failed trial: open -> half-open -> open
        await asyncio.sleep(0.06)
        assert await cb.call(succeed) == "ok"  # open -> half-open -> closed
    seen = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "server.breaker"]
    assert seen == [
        (logging.WARNING, "breaker primary: closed -> open"),
        (logging.INFO, "breaker primary: open -> half-open"),
        (logging.INFO, "breaker primary: half-open -> open"),
        (logging.INFO, "breaker primary: open -> half-open"),
        (logging.WARNING, "breaker primary: half-open -> closed"),
    ]
