"""Short headless locust runs of loadtest/locustfile.py against a real decision server
(real Redis, real TorchServe primary and secondary): the scenarios run and the CSV says
what happened."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.loadtest.conftest import (
    FRESH_SYMBOL,
    MISSING_SYMBOL,
    STALE_SYMBOL,
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


@pytest.mark.parametrize("scenario", ["steady", "stream"])  # stream: on DecideStream
def test_steady_decides_from_the_models(decision_server, tmp_path: Path, scenario: str):
    run = run_locust(decision_server, tmp_path, scenario, "--symbols", FRESH_SYMBOL)
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


def test_refuses_a_remote_target(tmp_path: Path):
    exit_code, log = locust(
        tmp_path, "remote", "--headless", "-t", "5s", "-H", "10.1.2.3:50051", timeout_s=30.0
    )
    assert exit_code == EXIT_BAD_OPTIONS, log
    assert "not a loopback" in log, log
