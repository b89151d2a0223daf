"""Settings that would silently disable a safety mechanism are rejected at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.settings import Settings


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"breaker": {"fail_max": 0}}, "breaker.fail_max"),
        ({"torchserve": {"per_call_timeout_ms": 0}}, "torchserve.per_call_timeout_ms"),
        ({"breaker": {"min_counted_timeout_ms": 30}}, "hung replica would never open"),
        ({"decision": {"fallback_reserve_ms": 60}}, "fallback_reserve_ms must be below"),
        ({"redis": {"max_connections": 0}}, "redis.max_connections"),
        ({"server": {"no_such_field": 1}}, "server.no_such_field"),
    ],
)
def test_unsafe_or_unknown_settings_are_rejected(sections, message):
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        Settings(**sections)


def test_nested_environment_variables(monkeypatch):
    monkeypatch.setenv("DECISION_TORCHSERVE__PER_CALL_TIMEOUT_MS", "15")
    monkeypatch.setenv("DECISION_SERVER__PORT", "6000")
    settings = Settings()
    assert settings.torchserve.per_call_timeout_ms == 15
    assert settings.server.port == 6000
    assert settings.torchserve.primary_address == "127.0.0.1:7070"
