"""A Prometheus for the local stack (``make run PROMETHEUS=1``): it scrapes every process
of the stack and evaluates the alert rules Kubernetes runs (``k8s/base/alert-rules.yaml``),
so alerts can be watched going pending and firing on http://127.0.0.1:9090/classic/alerts
while a replica is paused (Debian's Prometheus 2.42 has only the classic UI, under
``/classic/``).

Debian's ``prometheus`` package has the server (``make setup-ci`` installs it, for
``promtool``). The rules are the PrometheusRule's groups as they are in the base; the
local targets carry ``instance`` and ``job`` but no ``pod``, so rules that group by pod
see one group.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from core.processes import ManagedProcess

REPO = Path(__file__).resolve().parents[1]
ALERT_RULES = REPO / "k8s/base/alert-rules.yaml"
SCRAPE_INTERVAL_S = 5


@dataclass(frozen=True)
class Target:
    job: str
    ports: tuple[int, ...]


def prometheus_binary() -> str:
    """The ``prometheus`` on PATH; SystemExit naming what to install when there is none."""
    path = shutil.which("prometheus")
    if path is None:
        raise SystemExit(
            "--with-prometheus needs the prometheus server: `make setup-ci` installs Debian's "
            "prometheus package (or: sudo apt-get install prometheus)"
        )
    return path


def rule_groups() -> list[dict[str, Any]]:
    """The alert and recording rule groups of the Kubernetes base's PrometheusRule."""
    rule: dict[str, Any] = yaml.safe_load(ALERT_RULES.read_text())
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def config(targets: list[Target], rules_file: Path) -> dict[str, Any]:
    return {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "rule_files": [str(rules_file)],
        "scrape_configs": [
            {
                "job_name": target.job,
                "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in target.ports]}],
            }
            for target in targets
        ],
    }


def write_config(folder: Path, targets: list[Target]) -> Path:
    """``folder/prometheus.yml`` and the rules file it loads; returns the config's path."""
    folder.mkdir(parents=True, exist_ok=True)
    rules_file = folder / "alert-rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config(targets, rules_file), sort_keys=False))
    return path


def prometheus_process(folder: Path, config_file: Path, port: int) -> ManagedProcess:
    """Prometheus on 127.0.0.1:``port`` (not started), its data under ``folder``."""
    return ManagedProcess(
        "prometheus",
        [
            prometheus_binary(),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={folder / 'data'}",
            "--storage.tsdb.retention.time=1d",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        cwd=folder,
        log_path=folder / "prometheus.log",
    )
