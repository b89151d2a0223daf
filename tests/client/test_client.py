"""The client's call metadata: the caller's trace context first, then its own entries."""

from __future__ import annotations

from decision_client.client import call_metadata

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_trace_context_goes_with_the_callers_own_metadata() -> None:
    own = (("x-desk", "7"),)
    assert call_metadata(PARENT, "vendor=1", own) == (
        ("traceparent", PARENT),
        ("tracestate", "vendor=1"),
        ("x-desk", "7"),
    )
    assert call_metadata(None, None, own) == own
    # A tracestate without its traceparent means nothing (W3C): it is not sent.
    assert call_metadata(None, "vendor=1", ()) == ()
