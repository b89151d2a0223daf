"""The locust scenarios' plans without locust: options checked, load over time, requests."""

from __future__ import annotations

import argparse

import pytest

from decision_client.v1 import decision_pb2
from loadtest.locust_scenarios import (
    BURST_LADDER,
    DEFAULT_TARGET,
    FED_SYMBOLS,
    UNFED_SYMBOLS,
    ScenarioError,
    ScenarioOptions,
    is_loopback,
    request_mix,
    source_label,
)
from server.validation import order_from_pb


def options(target: str = DEFAULT_TARGET, **changes: object) -> ScenarioOptions:
    """As locust would parse ``-u 8 -r 8 -t 50`` plus the locustfile's defaults."""
    values: dict[str, object] = {
        "scenario": "steady",
        "num_users": 8,
        "spawn_rate": 8.0,
        "run_time": 50,
        "user_rps": 5.0,
        "symbols": ",".join(FED_SYMBOLS),
        "stale_symbols": ",".join(UNFED_SYMBOLS),
        "deadline_ms": 500.0,
        "burst_step_s": None,
        "allow_remote": False,
        **changes,
    }
    return ScenarioOptions.from_namespace(argparse.Namespace(**values), target)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("10.0.0.1:50051", False),
        ("decision.prod:50051", False),
        ("0.0.0.0:50051", False),
        ("127.0.0.1", False),
        ("http://127.0.0.1:50051", False),
    ],
)
def test_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_remote_targets_need_allow_remote():
    with pytest.raises(ScenarioError, match="not a loopback"):
        options("10.0.0.1:50051")
    assert options("10.0.0.1:50051", allow_remote=True).target == "10.0.0.1:50051"
    with pytest.raises(ScenarioError, match="without a scheme"):
        options("http://127.0.0.1:50051")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scenario": "soak"}, "--scenario"),
        ({"user_rps": 0.0}, "--user-rps"),
        ({"deadline_ms": -1.0}, "--deadline-ms"),
        ({"symbols": " , "}, "--symbols"),
        ({"symbols": "btc-usd"}, "--symbols"),
        ({"scenario": "stale-features", "stale_symbols": "NO SPACES"}, "--stale-symbols"),
        ({"scenario": "primary-failure"}, "--scenario"),
        ({"burst_step_s": 0.0}, "--burst-step-s"),
    ],
)
def test_bad_options_are_refused_by_name(changes, message):
    with pytest.raises(ScenarioError, match=message):
        options(**changes)


def test_steady_load_is_constant_until_the_run_time():
    plan = options()
    assert [plan.load_at(t) for t in (0.0, 25.0, 49.9)] == [(8, 8.0)] * 3
    assert plan.load_at(50.0) is None
    assert options(run_time=None).load_at(1e6) == (8, 8.0)


def test_burst_steps_up_and_down_within_the_run_time():
    plan = options(scenario="burst")  # 50 s: five steps of 10 s
    users = [plan.load_at(t) for t in (0.0, 9.9, 10.0, 20.0, 30.0, 45.0)]
    assert users == [(2, 8.0), (2, 8.0), (8, 8.0), (2, 8.0), (8, 8.0), (2, 8.0)]
    assert plan.load_at(50.0) is None
    assert len(BURST_LADDER) * plan.burst_step_s == 50.0


def test_burst_step_can_be_set_and_never_drops_to_zero_users():
    plan = options(scenario="burst", num_users=1, run_time=None, burst_step_s=2.0)
    assert [plan.load_at(t) for t in (0.0, 2.0, 9.9)] == [(1, 8.0)] * 3
    assert plan.load_at(10.0) is None


def test_stale_features_asks_about_the_stale_symbols():
    assert options(scenario="stale-features").symbols == UNFED_SYMBOLS
    assert options().symbols == FED_SYMBOLS
    assert not set(UNFED_SYMBOLS) & set(FED_SYMBOLS)


def test_request_mix_is_valid_and_covers_both_sides():
    requests = request_mix(("BTC-USD", "ETH-USD"), "locust-1")
    assert {r.client_id for r in requests} == {"locust-1"}  # its own share
    assert {(r.symbol, r.side) for r in requests} == {
        (s, side)
        for s in ("BTC-USD", "ETH-USD")
        for side in (decision_pb2.SIDE_BUY, decision_pb2.SIDE_SELL)
    }
    for request in requests:
        order_from_pb(request)


def test_source_labels_name_every_source():
    labels = {source_label(v) for v in decision_pb2.Source.values()}
    assert {"primary", "secondary", "canary", "cached-score", "rules", "abstain"} <= labels
