"""The local stack's Prometheus configuration: promtool accepts it, with the base's rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from localstack.__main__ import LocalStack
from localstack.prometheus import rule_groups, write_config


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
