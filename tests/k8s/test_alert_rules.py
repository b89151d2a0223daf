"""The alert rules: a real promtool fails a broken one, each alert is tested firing and
linked to a runbook section that exists, and the dashboard and the rules agree on the
recording rules they share."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from k8s.alert_rules import (
    RULE_TESTS,
    alerts,
    dashboard_expressions,
    rule_expressions,
    rule_groups,
    run_promtool,
)
from k8s.render import Object, load

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = "docs/runbook.md"
# Where the rendered rules say the runbook is (k8s/base/monitoring-settings.yaml).
RUNBOOK_URL = load("base/monitoring-settings.yaml")[0]["data"]["runbook"]


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings."""
    return {
        re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    }


def test_promtool_fails_a_rule_that_breaks_its_test(rendered: dict[str, list[Object]]) -> None:
    """The harness would see a failing unit test: the journal-full alert made to wait.
    (That every overlay's rules pass promtool's check and unit tests is
    tests/k8s/test_validate.py's: ``make k8s-validate`` runs them.)"""
    broken = copy.deepcopy(rendered["prod"])
    for group in rule_groups(broken):
        for rule in group["rules"]:
            if rule.get("alert") == "DecisionAuditJournalFull":
                rule["for"] = "30m"
    runs = run_promtool(broken)
    assert runs[0].ok and not runs[1].ok
    assert "DecisionAuditJournalFull" in runs[1].output


def test_every_alert_is_unit_tested_firing(objects: list[Object]) -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == set(alerts(objects))


def test_every_alert_links_to_a_runbook_section_and_has_a_severity(
    objects: list[Object],
) -> None:
    sections = anchors((REPO / RUNBOOK).read_text())
    assert alerts(objects), "no alert rules found in the manifests"
    for name, rule in alerts(objects).items():
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == RUNBOOK_URL, name  # absolute: a monitoring stack links it as it is
        assert anchor in sections, f"{name}: no section #{anchor} in {RUNBOOK}"
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["annotations"]["summary"], name


def test_recording_rules_used_are_recorded(objects: list[Object]) -> None:
    recorded = {
        rule["record"]
        for group in rule_groups(objects)
        for rule in group["rules"]
        if "record" in rule
    }
    used = {
        name
        for expr in rule_expressions(objects) + dashboard_expressions(objects)
        for name in re.findall(r"\bdecision:[a-z0-9_:]+", expr)
    }
    assert used, "the alerts and the dashboard use the SLO recording rules"
    assert used <= recorded, sorted(used - recorded)


@pytest.mark.parametrize("prefix", ["decision_", "feature_cache_", "grpc_server_"])
def test_the_dashboard_shows_each_part(objects: list[Object], prefix: str) -> None:
    assert any(prefix in expr for expr in dashboard_expressions(objects))
