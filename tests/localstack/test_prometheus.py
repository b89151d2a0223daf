"""The local stack's Prometheus configuration: promtool accepts it, with the base's rules;
the installed Prometheus serves the alerts page the banner and the docs link."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from core.processes import free_port
from localstack.__main__ import _usage
from localstack.prometheus import prometheus_process, rule_groups, write_config
from localstack.stack import LocalStack

REPO = Path(__file__).resolve().parents[2]
# Where the stack's Prometheus is linked: its banner and these.
LINKED_IN = ("README.md", "docs/local-stack.md", "localstack/prometheus.py")


def test_the_config_scrapes_every_process_and_loads_the_alert_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool missing: make setup-ci installs Debian's prometheus package")
    stack = LocalStack(tmp_path, 100, workers=2, prometheus=True)
    path = write_config(tmp_path / "prometheus", stack.scrape_targets())
    checked = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load(path.read_text())
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets == {
        "decision-server": ["127.0.0.1:9564", "127.0.0.1:9565"],
        "feature-cache": ["127.0.0.1:9580"],
        "labeler": ["127.0.0.1:9590"],
        "torchserve": ["127.0.0.1:8182", "127.0.0.1:8282", "127.0.0.1:8382"],
    }
    (rules_file,) = config["rule_files"]
    loaded = yaml.safe_load(Path(rules_file).read_text())["groups"]
    assert [g["name"] for g in loaded] == [g["name"] for g in rule_groups()]
    assert stack.prometheus_port == 9190


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError:  # not listening yet
        return 0


@pytest.mark.integration
def test_the_alerts_page_linked_is_the_one_the_installed_prometheus_serves(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path, 100, prometheus=True)
    stack.prometheus_port = free_port()
    (banner_url,) = re.findall(r"Prometheus: (http://\S+)", _usage(stack))
    # The pages the docs link, on the default port or as a path in the port table.
    linked = {
        path
        for name in LINKED_IN
        for path in re.findall(r"(?:9090|`)(/[a-z/]*alerts)\b", (REPO / name).read_text())
    }
    assert linked, "the docs link the alerts page"
    proc = prometheus_process(
        tmp_path, write_config(tmp_path, stack.scrape_targets()), stack.prometheus_port
    )
    base = f"http://127.0.0.1:{stack.prometheus_port}"
    proc.start()
    try:
        # Listening is not ready: its pages answer 503 until the storage has opened.
        proc.wait_ready(lambda: _status(f"{base}/-/ready") == 200, 30.0)
        served = {url: _status(url) for url in (banner_url, *(base + p for p in linked))}
    finally:
        proc.stop()
    assert set(served.values()) == {200}, served
