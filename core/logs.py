"""Every process's log lines, with the trace id and the decision ids of the call being handled.

``LogContext`` puts the current span's trace id and the decision ids the engine is making
into every record (``%(trace_id)s``, ``%(decision_id)s``: "-" outside a call, and in the
feature cache and the labeler); ``JsonFormatter`` writes a JSON object per line
(``telemetry.log_format``). Imports no gRPC: ``server.__main__`` configures logging before
the supervisor forks its workers, and no gRPC state may exist by then.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace

# The decisions the current task is making, for log lines (set by the engine).
decision_ids: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "decision_ids", default=()
)


@contextmanager
def deciding(ids: Sequence[str]) -> Iterator[None]:
    """Log records made inside carry these decision ids."""
    token = decision_ids.set(tuple(ids))
    try:
        yield
    finally:
        decision_ids.reset(token)


class LogContext(logging.Filter):
    """Adds ``trace_id`` (32 hex digits, or "-") and ``decision_id`` (the first of the
    decisions being made, "+N" for a batch's others, or "-") to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        record.trace_id = f"{context.trace_id:032x}" if context.is_valid else "-"
        ids = decision_ids.get()
        record.decision_id = (
            "-" if not ids else ids[0] if len(ids) == 1 else f"{ids[0]}+{len(ids) - 1}"
        )
        return True


TEXT_FORMAT = (
    "%(asctime)s %(levelname)s %(processName)s %(name)s"
    " [trace=%(trace_id)s decision=%(decision_id)s]: %(message)s"
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
            "trace_id": getattr(record, "trace_id", "-"),
            "decision_id": getattr(record, "decision_id", "-"),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(level: str, log_format: str) -> None:
    """The process's root handler: text or JSON, with the trace and decision ids."""
    handler = logging.StreamHandler()
    handler.addFilter(LogContext())
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
