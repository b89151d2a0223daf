"""Traces of real calls, caught by an in-memory exporter: the span tree of a Decide that
retries to the secondary, a caller's ``traceparent`` continued and answered, and the
trace id in the audit record."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, StatusCode

from core.processes import free_port
from decision_client.v1 import decision_pb2
from server.app import DecisionApp
from server.control import flags
from server.tracing import Tracing
from tests.conftest import wait_for
from tests.server.conftest import (
    UNHURRIED,
    audited_decision,
    buy,
    decision_stub,
    replica_settings,
    sample_record,
)

pytestmark = pytest.mark.integration

DECIDE = "/decision.v1.DecisionService/Decide"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Tracing:
    return Tracing.with_processor(SimpleSpanProcessor(exporter), sampler=ALWAYS_ON)


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def named(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    (found,) = [s for s in spans if s.name == name]
    return found


async def test_a_decide_retried_to_the_secondary_is_one_span_tree(
    replicas, start_app, channel_to, feature_writer, tracing, exporter
) -> None:
    await feature_writer.write_many([sample_record("BTC-USD")])
    nobody = f"127.0.0.1:{free_port()}"  # the primary's address answers nothing
    app: DecisionApp = await start_app(
        tracing=tracing, torchserve=replica_settings(replicas, primary_address=nobody), **UNHURRIED
    )
    exporter.clear()  # readiness and warm-up calls
    answer = await decision_stub(channel_to(app)).Decide(buy(), timeout=2.0)
    assert answer.source == decision_pb2.SOURCE_SECONDARY, answer.reason

    spans = list(exporter.get_finished_spans())
    server = named(spans, DECIDE)
    assert server.kind is SpanKind.SERVER and server.parent is None
    assert server.status.status_code is not StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["decision.id"] == answer.decision_id
    assert server.attributes["decision.source"] == "secondary"
    assert server.context is not None
    assert {s.context.trace_id for s in spans if s.context} == {server.context.trace_id}

    steps = children(spans, server)
    assert [s.name for s in sorted(steps, key=lambda s: s.start_time or 0)] == [
        "decision.features",
        "decision.model",
        "audit.journal_append",
    ]
    model = named(steps, "decision.model")
    assert model.attributes is not None and model.attributes["decision.answered_by"] == "secondary"
    primary, secondary = sorted(children(spans, model), key=lambda s: s.start_time or 0)
    assert primary.name == secondary.name == "model.attempt"
    assert primary.attributes is not None and secondary.attributes is not None
    assert (primary.attributes["replica"], primary.attributes["outcome"]) == ("primary", "failed")
    assert primary.status.status_code is StatusCode.ERROR
    assert (secondary.attributes["replica"], secondary.attributes["outcome"]) == (
        "secondary",
        "ok",
    )
    # The model call itself, from the gRPC client instrumentation, under its attempt.
    (rpc,) = children(spans, secondary)
    assert rpc.kind is SpanKind.CLIENT and rpc.name.endswith("/Predictions")
    (refused,) = children(spans, primary)
    assert refused.kind is SpanKind.CLIENT and refused.status.status_code is StatusCode.ERROR


async def test_the_callers_trace_is_continued_answered_and_audited(
    replicas, start_app, channel_to, feature_writer, tracing, exporter
) -> None:
    await feature_writer.write_many([sample_record("BTC-USD")])
    app: DecisionApp = await start_app(
        tracing=tracing, torchserve=replica_settings(replicas), **UNHURRIED
    )
    exporter.clear()
    call = decision_stub(channel_to(app)).Decide(
        buy(),
        timeout=2.0,
        metadata=(("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),),
    )
    answer = await call
    assert answer.source == decision_pb2.SOURCE_PRIMARY, answer.reason

    server = named(list(exporter.get_finished_spans()), DECIDE)
    assert server.context is not None and server.parent is not None
    assert f"{server.context.trace_id:032x}" == CALLER_TRACE
    assert f"{server.parent.span_id:016x}" == CALLER_SPAN
    trailing = dict(await call.trailing_metadata() or ())
    assert trailing["traceparent"] == f"00-{CALLER_TRACE}-{server.context.span_id:016x}-01"


async def test_a_call_without_a_traceparent_is_audited_with_its_new_trace(
    replicas, start_app, channel_to, feature_writer, tracing, exporter
) -> None:
    await feature_writer.write_many([sample_record("BTC-USD")])
    app: DecisionApp = await start_app(
        tracing=tracing, torchserve=replica_settings(replicas), **UNHURRIED
    )
    exporter.clear()
    call = decision_stub(channel_to(app)).Decide(buy(), timeout=2.0)
    answer = await call
    server = named(list(exporter.get_finished_spans()), DECIDE)
    assert server.context is not None and server.parent is None
    trace_id = f"{server.context.trace_id:032x}"
    answered = str(dict(await call.trailing_metadata() or ())["traceparent"])
    assert answered.split("-")[1] == trace_id

    row = await audited_decision(app, answer.decision_id)
    assert row["trace_id"] == trace_id


async def test_without_tracing_no_span_is_made_and_no_traceparent_answered(
    replicas, start_app, channel_to, feature_writer
) -> None:
    await feature_writer.write_many([sample_record("BTC-USD")])
    app: DecisionApp = await start_app(torchserve=replica_settings(replicas), **UNHURRIED)
    assert not app.tracing.enabled
    call = decision_stub(channel_to(app)).Decide(
        buy(), timeout=2.0, metadata=(("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)
    )
    answer = await call
    trailing = dict(await call.trailing_metadata() or ())
    assert "traceparent" not in trailing
    # No server span to take a trace id from: the record keeps the caller's.
    row = await audited_decision(app, answer.decision_id)
    assert row["trace_id"] == CALLER_TRACE


async def test_a_refused_call_answers_its_traceparent_too(
    replicas, start_app, channel_to, tracing, exporter
) -> None:
    app: DecisionApp = await start_app(
        tracing=tracing, torchserve=replica_settings(replicas), **UNHURRIED
    )
    exporter.clear()
    call = decision_stub(channel_to(app)).Decide(buy(quantity=-1.0), timeout=2.0)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    # The server span ends after the status is sent: the caller may see it first.
    await asyncio.to_thread(
        wait_for, lambda: any(s.name == DECIDE for s in exporter.get_finished_spans()), 5
    )
    server = named(list(exporter.get_finished_spans()), DECIDE)
    assert server.context is not None
    trailing = dict(refused.value.trailing_metadata() or ())
    assert str(trailing["traceparent"]).split("-")[2] == f"{server.context.span_id:016x}"


@pytest.mark.timed  # the shadow call's own fixed timeout
async def test_a_shadowed_decision_has_a_shadow_span_with_the_challengers_attempt(
    replicas,
    challenger_replica,
    start_app,
    channel_to,
    feature_writer,
    tracing,
    exporter,
    monkeypatch,
) -> None:
    monkeypatch.setattr(flags, "DEFAULT_SHADOW_SAMPLE_RATE", 1.0)
    await feature_writer.write_many([sample_record("BTC-USD")])
    app: DecisionApp = await start_app(
        tracing=tracing,
        torchserve=replica_settings(replicas, challenger_address=challenger_replica.address),
        **UNHURRIED,
    )
    exporter.clear()
    answer = await decision_stub(channel_to(app)).Decide(buy(), timeout=2.0)
    assert answer.source == decision_pb2.SOURCE_PRIMARY, answer.reason
    deadline = time.monotonic() + 10  # the shadow call runs after the answer
    while not any(s.name == "decision.shadow" for s in exporter.get_finished_spans()):
        assert time.monotonic() < deadline, "no shadow span"
        await asyncio.sleep(0.02)

    spans = list(exporter.get_finished_spans())
    server = named(spans, DECIDE)
    shadow = named(spans, "decision.shadow")
    assert shadow.parent is not None and server.context is not None
    assert shadow.parent.span_id == server.context.span_id
    assert shadow.attributes is not None and shadow.attributes["decision.shadowed"] == 1
    (attempt,) = children(spans, shadow)
    assert attempt.name == "model.attempt" and attempt.attributes is not None
    assert (attempt.attributes["replica"], attempt.attributes["outcome"]) == ("challenger", "ok")
