"""Short headless locust runs of loadtest/locustfile.py against a real decision server
(real Redis, real TorchServe primary and secondary): the scenarios run, the CSV says what
happened, and the primary-failure scenario leaves no override behind."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from proto.decision.v1 import admin_pb2, admin_pb2_grpc
from tests.loadtest.conftest import (
    FRESH_SYMBOL,
    MISSING_SYMBOL,
    OPERATOR_TOKEN,
    STALE_SYMBOL,
    DecisionServer,
    LocustRun,
    locust,
    run_locust,
)

# The locustfile's exit code for options it refuses (it cannot be imported here: importing
# locust monkey-patches this process with gevent).
EXIT_BAD_OPTIONS = 2

pytestmark = pytest.mark.integration


def no_failures(run: LocustRun) -> None:
    assert run.count("Aggregated") > 0, run.log
    assert run.count("Aggregated", "Failure Count") == 0, run.log
    assert run.exit_code == 0, run.log


def primary_mode(server: DecisionServer) -> admin_pb2.BreakerMode.ValueType:
    with grpc.insecure_channel(server.admin_address) as channel:
        status = admin_pb2_grpc.AdminServiceStub(channel).GetStatus(
            admin_pb2.GetStatusRequest(),
            metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),),
            timeout=5.0,
        )
    (primary,) = [r for r in status.replicas if r.name == "primary"]
    return primary.mode


def test_steady_decides_from_the_models(decision_server, tmp_path: Path):
    run = run_locust(decision_server, tmp_path, "steady", "--symbols", FRESH_SYMBOL)
    no_failures(run)
    decided = run.names("Decide (")
    assert decided, run.rows.keys()
    # Fresh features: a model (or at worst the rules) decides, never ABSTAIN.
    assert "Decide (abstain)" not in decided, run.rows.keys()


def test_stale_features_are_answered_by_the_fallback_ladder(decision_server, tmp_path: Path):
    run = run_locust(
        decision_server,
        tmp_path,
        "stale-features",
        "--stale-symbols",
        f"{STALE_SYMBOL},{MISSING_SYMBOL}",
        run_time_s=3,
    )
    no_failures(run)
    # Never scored, so no cached score; the rules need fresh features: ABSTAIN.
    assert run.names("Decide") == {"Decide (abstain)"}, run.rows.keys()


def test_primary_failure_fails_over_and_restores_the_breaker(decision_server, tmp_path: Path):
    assert primary_mode(decision_server) == admin_pb2.BREAKER_MODE_AUTO
    run = run_locust(
        decision_server,
        tmp_path,
        "primary-failure",
        "--symbols",
        FRESH_SYMBOL,
        "--fault-at-s",
        "2",
        # Longer than the run: only the scenario's own restore at the end brings AUTO back.
        "--fault-for-s",
        "120",
        run_time_s=6,
    )
    no_failures(run)
    assert run.count("SetBreaker primary FORCE_OPEN") == 1, run.log
    assert run.count("Decide (secondary)") > 0, run.rows.keys()
    assert run.count("SetBreaker primary AUTO") == 1, run.log
    assert primary_mode(decision_server) == admin_pb2.BREAKER_MODE_AUTO, run.log


def test_refuses_a_remote_target_and_a_fault_without_a_token(tmp_path: Path):
    exit_code, log = locust(
        tmp_path, "remote", "--headless", "-t", "5s", "-H", "10.1.2.3:50051", timeout_s=30.0
    )
    assert exit_code == EXIT_BAD_OPTIONS, log
    assert "not a loopback" in log, log
    env = {k: v for k, v in os.environ.items() if not k.startswith("DECISIONCTL_")}
    exit_code, log = locust(
        tmp_path,
        "no-token",
        "--headless",
        "-t",
        "20s",
        "--scenario",
        "primary-failure",
        timeout_s=30.0,
        env=env,
    )
    assert exit_code == EXIT_BAD_OPTIONS, log
    assert "needs an operator token" in log, log
