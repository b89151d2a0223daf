"""Log lines carry the trace id and the decision ids of the call being handled."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from core.logs import TEXT_FORMAT, JsonFormatter, LogContext, deciding
from server.tracing import Tracing


def record(message: str = "breaker opened") -> logging.LogRecord:
    made = logging.LogRecord("server.replica", logging.WARNING, __file__, 1, message, (), None)
    assert LogContext().filter(made)
    return made


def test_outside_a_call_the_ids_are_dashes() -> None:
    line = logging.Formatter(TEXT_FORMAT).format(record())
    assert "[trace=- decision=-]: breaker opened" in line


@pytest.mark.parametrize(("ids", "shown"), [(["d-1"], "d-1"), (["d-1", "d-2", "d-3"], "d-1+2")])
def test_inside_a_traced_decision_both_ids_are_on_the_line(ids: list[str], shown: str) -> None:
    tracing = Tracing.with_processor(SimpleSpanProcessor(InMemorySpanExporter()), sampler=ALWAYS_ON)
    with tracing.tracer.start_as_current_span("decide") as span, deciding(ids):
        made = record()
    trace_id = f"{span.get_span_context().trace_id:032x}"
    assert f"[trace={trace_id} decision={shown}]" in logging.Formatter(TEXT_FORMAT).format(made)
    doc = json.loads(JsonFormatter().format(made))
    assert doc["trace_id"] == trace_id and doc["decision_id"] == shown
    assert (doc["level"], doc["logger"], doc["message"]) == (
        "WARNING",
        "server.replica",
        "breaker opened",
    )
    assert record().decision_id == "-"  # type: ignore[attr-defined]


def test_json_lines_carry_the_exception() -> None:
    try:
        raise RuntimeError("journal write failed")
    except RuntimeError:
        made = logging.LogRecord(
            "server.audit",
            logging.ERROR,
            __file__,
            1,
            "failed",
            (),
            exc_info=sys.exc_info(),
        )
    LogContext().filter(made)
    doc = json.loads(JsonFormatter().format(made))
    assert "RuntimeError: journal write failed" in doc["exception"]
