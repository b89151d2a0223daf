"""Every metric the Kubernetes manifests (k8s/) name for the decision server (the HPA's
custom metric, prometheus-adapter's rule, the alert rules, the Grafana dashboard) is one
a real decision server exports on its /metrics. (The consumer's and the labeler's names:
their own tests.)"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import yaml

from core.processes import free_port
from k8s.alert_rules import dashboard_expressions, rule_expressions
from k8s.render import MONITORING_FILES, OVERLAYS, Object, load, one, render_overlay
from server.admission import Caller
from server.app import DecisionApp
from tests.metrics import exported_names, names_in
from tests.server.conftest import buy, decision_stub

pytestmark = pytest.mark.integration

SERVER_PREFIXES = ("decision_", "grpc_server_")
LABELER_PREFIX = "decision_quality_"  # the labeler's (tests/quality)


def server_names(names: set[str]) -> set[str]:
    return {name for name in names if not name.startswith(LABELER_PREFIX)}


def named_in_manifests(objects: list[Object]) -> dict[str, set[str]]:
    """Where each of the server's names is used: the HPA, the rules, the dashboard, the
    adapter."""
    hpa = one(objects, "HorizontalPodAutoscaler", "decision")
    used = {
        "hpa": {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    }
    used["rules"] = server_names(names_in(rule_expressions(objects), SERVER_PREFIXES))
    used["dashboard"] = server_names(names_in(dashboard_expressions(objects), SERVER_PREFIXES))
    adapter = [o for path in MONITORING_FILES for o in load(path)]
    config = yaml.safe_load(adapter[0]["data"]["config.yaml"])
    used["adapter"] = names_in(
        [q for rule in config["rules"] for q in (rule["seriesQuery"], rule["metricsQuery"])],
        SERVER_PREFIXES,
    )
    return used


def adapter_metrics() -> set[str]:
    """The custom metrics prometheus-adapter's rules serve (their ``as``)."""
    adapter = [o for path in MONITORING_FILES for o in load(path)]
    config = yaml.safe_load(adapter[0]["data"]["config.yaml"])
    return {rule["name"]["as"] for rule in config["rules"]}


async def test_the_manifests_name_only_exported_metrics(start_app, channel_to, tmp_path) -> None:
    rendered = {overlay: render_overlay(overlay) for overlay in OVERLAYS}
    port = free_port()
    app: DecisionApp = await start_app(
        server={"metrics_port": port, "caller_share": 1},
        drift={"model_store": str(tmp_path)},  # no archives: the PSI families read NaN
        # A challenger (nobody there) makes the server shadow-score, with its metrics.
        torchserve={"challenger_address": f"127.0.0.1:{free_port()}"},
    )
    assert app.metrics is not None
    # One decision (ABSTAIN: no features) makes the families with labels show samples;
    # a caller whose one call in flight is held here, its second refused, the refusals'.
    stub = decision_stub(channel_to(app))
    await stub.Decide(buy(), timeout=2.0)
    app.shares.take(Caller("desk-7@ipv4:127.0.0.1", False), call_ms=1.0)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Decide(buy(client_id="desk-7"), timeout=2.0)
    exported = await asyncio.to_thread(exported_names, port)
    assert "decision_in_flight" in exported
    for overlay, objects in rendered.items():
        used = named_in_manifests(objects)
        served = {"decision_in_flight", "decision_p99_seconds", "decision_refusals_per_second"}
        assert used.pop("hpa") == adapter_metrics() == served
        assert "grpc_server_handling_seconds_bucket" in used["adapter"]
        assert len(used["rules"]) >= 10, used["rules"]
        assert len(used["dashboard"]) >= 15, used["dashboard"]
        for where, names in used.items():
            assert names <= exported, f"{overlay} {where}: {sorted(names - exported)}"
