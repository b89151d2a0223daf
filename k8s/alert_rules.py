"""The alert rules checked by a real Prometheus's ``promtool`` (Debian's ``prometheus``
package, installed by ``make setup-ci``): ``promtool check rules`` on the groups of the
rendered PrometheusRule objects, and ``promtool test rules`` on
``monitoring/alert-rules-test.yaml``, unit tests of every alert with synthetic series."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from k8s.render import K8S_DIR, Object, RenderError, find

RULE_TESTS = K8S_DIR / "monitoring" / "alert-rules-test.yaml"
RULES_FILE = "alert-rules.yaml"  # the name RULE_TESTS' rule_files gives


@dataclass(frozen=True, slots=True)
class PromtoolRun:
    step: str
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        raise RenderError(
            "promtool not found: `make setup-ci` installs it (Debian's prometheus package)"
        )
    return found


def rule_groups(objects: list[Object]) -> list[dict[str, Any]]:
    """Every group of every PrometheusRule, as a Prometheus rules file lists them."""
    return [group for rule in find(objects, "PrometheusRule") for group in rule["spec"]["groups"]]


def alerts(objects: list[Object]) -> dict[str, dict[str, Any]]:
    """The alerting rules by name."""
    return {
        rule["alert"]: rule
        for group in rule_groups(objects)
        for rule in group["rules"]
        if "alert" in rule
    }


def run_promtool(objects: list[Object]) -> list[PromtoolRun]:
    """``check rules`` and ``test rules`` on the objects' rules, in a folder of their own;
    once per process for the same rules and tests (the overlays share the base's rules)."""
    rules = yaml.safe_dump({"groups": rule_groups(objects)})
    return list(_promtool_runs(rules, RULE_TESTS.read_text()))


@functools.cache
def _promtool_runs(rules: str, tests: str) -> tuple[PromtoolRun, ...]:
    tool = promtool()
    with tempfile.TemporaryDirectory(prefix="alert-rules-") as folder:
        workdir = Path(folder)
        (workdir / RULES_FILE).write_text(rules)
        (workdir / RULE_TESTS.name).write_text(tests)
        runs = []
        for step, argv in (
            ("check rules", [tool, "check", "rules", RULES_FILE]),
            ("test rules", [tool, "test", "rules", RULE_TESTS.name]),
        ):
            result = subprocess.run(  # noqa: S603 - the machine's promtool, our own files
                argv, cwd=workdir, capture_output=True, text=True, timeout=120, check=False
            )
            runs.append(PromtoolRun(step, result.returncode, result.stdout + result.stderr))
        return tuple(runs)


def dashboard_expressions(objects: list[Object]) -> list[str]:
    """The PromQL of every panel of the Grafana dashboards (ConfigMaps of JSON files)."""
    return [
        target["expr"]
        for config in find(objects, "ConfigMap")
        if config["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
        for text in config["data"].values()
        for panel in json.loads(text)["panels"]
        for target in panel.get("targets", [])
    ]


def rule_expressions(objects: list[Object]) -> list[str]:
    return [rule["expr"] for group in rule_groups(objects) for rule in group["rules"]]


# What prometheus-adapter puts in its templates' place, for checking the queries' syntax.
ADAPTER_TEMPLATE_VALUES = {
    "<<.LabelMatchers>>": 'namespace="decision",pod=~"decision-a|decision-b"',
    "<<.GroupBy>>": "pod",
}


def adapter_queries(config: Object) -> dict[str, str]:
    """Each prometheus-adapter rule's metricsQuery (of the ConfigMap ``config``) as the
    adapter runs it, by the metric it serves."""
    rules = yaml.safe_load(config["data"]["config.yaml"])["rules"]
    queries = {}
    for rule in rules:
        query = rule["metricsQuery"].replace("<<.Series>>", rule["name"]["matches"].strip("^$"))
        for template, value in ADAPTER_TEMPLATE_VALUES.items():
            query = query.replace(template, value)
        queries[rule["name"]["as"]] = query
    return queries


ADAPTER_TESTS = K8S_DIR / "monitoring" / "adapter-rules-test.yaml"


def check_adapter_queries(config: Object) -> PromtoolRun:
    """``promtool check rules`` on the adapter's queries, each as a recording rule, then
    ``promtool test rules`` on them (ADAPTER_TESTS: what each serves for given series)."""
    records = [
        {"record": f"adapter:{name}", "expr": query}
        for name, query in adapter_queries(config).items()
    ]
    rules = yaml.safe_dump({"groups": [{"name": "adapter", "rules": records}]})
    with tempfile.TemporaryDirectory(prefix="adapter-rules-") as folder:
        (Path(folder) / "adapter.yaml").write_text(rules)
        (Path(folder) / ADAPTER_TESTS.name).write_text(ADAPTER_TESTS.read_text())
        output = ""
        for argv in (["check", "rules", "adapter.yaml"], ["test", "rules", ADAPTER_TESTS.name]):
            result = subprocess.run(  # noqa: S603 - the machine's promtool, our own files
                [promtool(), *argv],
                cwd=folder, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            output += result.stdout + result.stderr
            if result.returncode != 0:
                break
    return PromtoolRun("check and test adapter queries", result.returncode, output)
