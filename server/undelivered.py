"""Answers gRPC could not send, counted instead of logged one traceback each.

When a handler returns after its caller's deadline (or the caller went away), grpcio
cannot send the answer and logs that at ERROR with a full traceback, once per call: under
overload hundreds a second, on a process already short of CPU, in the log on-call reads.
``UndeliveredAnswers`` drops those records, counts them (the metric
``decision_answers_undelivered_total``) and lets one summary line through every
``summary_interval_s``. The metric: docs/architecture.md#deadlines-and-load-on-the-decide-path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

GRPC_LOGGER = "grpc._cython.cygrpc"
# grpcio's message (``_handle_exceptions`` in its aio server, 1.85): an upgrade that
# rewords it brings the tracebacks back, and the metric stays at 0.
UNSENT_PREFIX = "ExecuteBatchError raised in core"

log = logging.getLogger(__name__)


class UndeliveredAnswers(logging.Filter):
    def __init__(
        self, *, summary_interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.count = 0
        self._interval_s = summary_interval_s
        self._clock = clock
        self._reported = 0
        self._reported_at = float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(UNSENT_PREFIX):
            return True
        self.count += 1
        now = self._clock()
        if now - self._reported_at >= self._interval_s:
            log.warning(
                "%d answer(s) could not be sent since the last report (%d in all): their"
                " callers' deadlines had passed or the callers went away",
                self.count - self._reported,
                self.count,
            )
            self._reported, self._reported_at = self.count, now
        return False

    def install(self) -> None:
        logging.getLogger(GRPC_LOGGER).addFilter(self)

    def remove(self) -> None:
        logging.getLogger(GRPC_LOGGER).removeFilter(self)
