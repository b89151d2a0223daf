"""Tracing is configured by OpenTelemetry's standard environment variables."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server.tracing import DEFAULT_SAMPLE_RATIO, SERVICE_NAME, Tracing


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "OTEL_TRACES_SAMPLER",
    ):
        monkeypatch.delenv(name, raising=False)


def test_no_endpoint_no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not Tracing.from_environment().enabled
    monkeypatch.setenv("OTEL_SERVICE_NAME", "x")
    assert not Tracing.from_environment().enabled


def test_an_endpoint_turns_tracing_on_with_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    tracing = Tracing.from_environment()
    try:
        assert tracing.provider is not None
        assert tracing.provider.resource.attributes["service.name"] == SERVICE_NAME
        assert f"{DEFAULT_SAMPLE_RATIO}" in tracing.provider.sampler.get_description()
    finally:
        tracing.shutdown()


def test_the_environment_names_the_service_and_the_sampler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "decision-canary")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    tracing = Tracing.with_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    assert tracing.provider is not None
    assert tracing.provider.resource.attributes["service.name"] == "decision-canary"
    assert tracing.provider.sampler.get_description() == "AlwaysOnSampler"
