"""Every metric the Kubernetes manifests (k8s/) name (the HPA's custom metric,
prometheus-adapter's rule, the alert rules' expressions) is one a real decision server
exports on its /metrics."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest
import yaml

from core.processes import free_port
from k8s.render import MONITORING_FILES, OVERLAYS, Object, find, load, one, render_overlay
from server.app import DecisionApp

pytestmark = pytest.mark.integration

OUR_METRIC = re.compile(r"\bdecision_[a-z0-9_]+\b")


def exported_names(port: int) -> set[str]:
    """The sample names the endpoint serves (a counter's _total, a histogram's _bucket)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line[:1] != "#"}


def named_in_manifests(objects: list[Object]) -> dict[str, set[str]]:
    """Where each decision_* name is used: the HPA, the rules, the adapter."""
    hpa = one(objects, "HorizontalPodAutoscaler", "decision")
    used = {
        "hpa": {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    }
    expressions = [
        rule["expr"]
        for rules in find(objects, "PrometheusRule")
        for group in rules["spec"]["groups"]
        for rule in group["rules"]
    ]
    used["rules"] = {name for expr in expressions for name in OUR_METRIC.findall(expr)}
    adapter = [o for path in MONITORING_FILES for o in load(path)]
    config = yaml.safe_load(adapter[0]["data"]["config.yaml"])
    used["adapter"] = {
        name for rule in config["rules"] for name in OUR_METRIC.findall(rule["seriesQuery"])
    }
    used["adapter as"] = {rule["name"]["as"] for rule in config["rules"]}
    return used


async def test_the_manifests_name_only_exported_metrics(start_app) -> None:
    rendered = {overlay: render_overlay(overlay) for overlay in OVERLAYS}
    port = free_port()
    app: DecisionApp = await start_app(telemetry={"metrics_port": port})
    assert app.metrics is not None
    exported = await asyncio.to_thread(exported_names, port)
    assert "decision_in_flight" in exported
    for overlay, objects in rendered.items():
        used = named_in_manifests(objects)
        assert used["hpa"] == used["adapter"] == used["adapter as"] == {"decision_in_flight"}
        assert len(used["rules"]) >= 5, used["rules"]
        for where, names in used.items():
            assert names <= exported, f"{overlay} {where}: {sorted(names - exported)}"
