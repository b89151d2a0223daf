"""The server and the local stack as real processes: readiness, signals, nothing left behind."""

from __future__ import annotations

import signal

import grpc
import pytest

from core.processes import free_port, free_ports, port_open
from decision_client.v1 import decision_pb2, decision_pb2_grpc
from localstack.health import serving
from tests.conftest import server_process
from tests.server.conftest import buy

pytestmark = pytest.mark.integration


def test_server_process_serves_then_stops_cleanly_on_sigterm(redis_instance, tmp_path):
    port, admin_port = free_ports(2)
    proc = server_process(
        "decision server",
        tmp_path,
        port=port,
        redis_url=redis_instance.url,
        key_prefix=f"proc{port}:",
        primary=f"127.0.0.1:{free_port()}",
        secondary=f"127.0.0.1:{free_port()}",
        # Every port the server binds is free: 50052, the default, lies in Linux's
        # ephemeral range, where another test's connection may hold it.
        DECISION_ADMIN__PORT=str(admin_port),
        DECISION_SERVER__GRACE_PERIOD_S="2",
    )
    try:
        proc.start()
        proc.wait_ready(lambda: serving(port), 20.0)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = decision_pb2_grpc.DecisionServiceStub(channel).Decide(buy(), timeout=1.0)
            assert response.source == decision_pb2.SOURCE_ABSTAIN  # no features written

        proc.signal_group(signal.SIGTERM)
        assert proc.wait(10.0) == 0
        text = proc.log_path.read_text()
        assert "signal received: shutting down" in text
        assert text.rstrip().endswith("stopped")
        assert not port_open("127.0.0.1", port)
    finally:
        proc.kill()
