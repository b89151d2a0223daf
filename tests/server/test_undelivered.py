"""UndeliveredAnswers: grpcio's per-call tracebacks for answers it could not send are
counted, summarised at most every interval, and everything else grpcio logs still passes."""

from __future__ import annotations

import logging

import pytest

from server.undelivered import GRPC_LOGGER, UndeliveredAnswers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def unsent(grpc_log: logging.Logger) -> None:
    try:
        raise RuntimeError('Failed "execute_batch"')
    except RuntimeError:
        grpc_log.exception(
            "ExecuteBatchError raised in core by servicer method [%s]",
            "/decision.v1.DecisionService/Decide",
        )


def test_unsent_answers_are_counted_and_summarised_not_logged_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    undelivered = UndeliveredAnswers(summary_interval_s=10.0, clock=clock)
    grpc_log = logging.getLogger(GRPC_LOGGER)
    undelivered.install()
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(50):
                unsent(grpc_log)
            clock.now += 10.0
            for _ in range(3):
                unsent(grpc_log)
            grpc_log.error("Unexpected [ValueError] raised by servicer method [/x]")
    finally:
        undelivered.remove()
    assert undelivered.count == 53
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("ExecuteBatchError") for m in messages), messages
    summaries = [m for m in messages if "could not be sent" in m]
    assert summaries[0].startswith("1 answer(s) could not be sent")  # the first, at once
    # then once per 10 s: the 51st is the first after the interval; two more wait
    assert summaries[1].startswith("50 answer(s) could not be sent")
    assert "(51 in all)" in summaries[1] and len(summaries) == 2
    assert "Unexpected [ValueError] raised by servicer method [/x]" in messages


def test_once_removed_grpc_logs_as_before(caplog: pytest.LogCaptureFixture) -> None:
    undelivered = UndeliveredAnswers()
    undelivered.install()
    undelivered.remove()
    with caplog.at_level(logging.WARNING):
        unsent(logging.getLogger(GRPC_LOGGER))
    assert undelivered.count == 0
    assert caplog.records[0].getMessage().startswith("ExecuteBatchError raised in core")
