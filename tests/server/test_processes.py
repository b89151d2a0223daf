"""The server and the local stack as real processes: readiness, signals, nothing left behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from core.processes import free_port, free_ports, live_group_members, port_open
from localstack.health import serving
from localstack.stack import LocalStack
from proto.decision.v1 import decision_pb2, decision_pb2_grpc
from tests.conftest import REPO, server_process, wait_for
from tests.metrics import scrape, value
from tests.server.conftest import buy

pytestmark = pytest.mark.integration


def test_server_process_serves_then_stops_cleanly_on_sigterm(redis_instance, tmp_path):
    port, admin_port = free_ports(2)
    proc = server_process(
        "decision server",
        tmp_path,
        port=port,
        redis_url=redis_instance.url,
        key_prefix=f"proc{port}:",
        primary=f"127.0.0.1:{free_port()}",
        secondary=f"127.0.0.1:{free_port()}",
        # Every port the server binds is free: 50052, the default, lies in Linux's
        # ephemeral range, where another test's connection may hold it.
        DECISION_ADMIN__PORT=str(admin_port),
        DECISION_SERVER__GRACE_PERIOD_S="2",
    )
    try:
        proc.start()
        proc.wait_ready(lambda: serving(port), 20.0)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = decision_pb2_grpc.DecisionServiceStub(channel).Decide(buy(), timeout=1.0)
            assert response.source == decision_pb2.SOURCE_ABSTAIN  # no features written

        proc.signal_group(signal.SIGTERM)
        assert proc.wait(10.0) == 0
        text = proc.log_path.read_text()
        assert "signal received: shutting down" in text
        assert text.rstrip().endswith("stopped")
        assert not port_open("127.0.0.1", port)
    finally:
        proc.kill()


def test_local_stack_sigint_to_its_group_stops_every_process(tmp_path, model_store):
    # An offset whose every port is free: away from a stack on the default ports.
    offset = LocalStack.free_offset(tmp_path, prometheus=True)
    decision_port = 50051 + offset
    proc = subprocess.Popen(
        [sys.executable, "-m", "localstack", "--run-dir", str(tmp_path), "--port-offset",
         str(offset), "--models", str(model_store[0]), "--with-prometheus"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a group of its own, as a terminal gives `make run`
    )  # fmt: skip
    try:
        wait_for(lambda: serving(decision_port), 150)
        with grpc.insecure_channel(f"127.0.0.1:{decision_port}") as channel:
            stub = decision_pb2_grpc.DecisionServiceStub(channel)
            # The model answers (a first call on a busy 2-core machine may exceed the
            # 25 ms per-call cap and fall back: that is the ladder working, not a failure).
            sources = []
            for _ in range(5):
                response = stub.Decide(buy(), timeout=1.0)
                sources.append((response.source, response.reason))
                if response.source == decision_pb2.SOURCE_PRIMARY:
                    break
        assert sources[-1][0] == decision_pb2.SOURCE_PRIMARY, sources
        # The labeler finds the decisions in the audit store and labels them once the
        # market data has passed their 2 s horizon.
        wait_for(lambda: labelled(9490 + offset) >= len(sources), 60)
        # Prometheus scrapes every process and has the alert rules loaded.
        prometheus = 9090 + offset
        wait_for(lambda: unhealthy_targets(prometheus) == set(), 30)
        rules = api(prometheus, "rules")["groups"]
        assert any(r["name"] == "DecisionModelWorseThanChance" for g in rules for r in g["rules"])
        children = descendants(proc.pid)
        # redis, 3 TorchServe launchers (+ JVMs, workers), the server, the labeler, prometheus
        assert len(children) >= 7

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output.decode()
        assert b"all processes stopped" in output
        time.sleep(0.5)
        left = [pid for pid in children if Path(f"/proc/{pid}").exists() and not zombie(pid)]
        assert left == [], f"processes left behind: {left}"
        assert not live_group_members(proc.pid)
    finally:
        if proc.poll() is None:
            # Each child runs in a process group of its own: the stack must stop them
            # (SIGINT); only what is still there after that is killed, group by group.
            stragglers = descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in [proc.pid, *stragglers]:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def api(prometheus_port: int, path: str) -> Any:
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/{path}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]


STACK_JOBS = {"decision-server", "feature-cache", "labeler", "torchserve"}


def unhealthy_targets(prometheus_port: int) -> set[str] | None:
    """The jobs with a target not up; None while Prometheus has not scraped them all."""
    try:
        targets = api(prometheus_port, "targets")["activeTargets"]
    except OSError:
        return None
    if {t["labels"]["job"] for t in targets} != STACK_JOBS or any(
        t["health"] == "unknown" for t in targets
    ):
        return None
    return {t["labels"]["job"] for t in targets if t["health"] != "up"}


def labelled(labeler_metrics_port: int) -> float:
    """Decisions the labeler has labelled; 0 while its metrics are not served yet."""
    try:
        samples = scrape(labeler_metrics_port)
    except OSError:
        return 0.0
    return value(samples, "decision_quality_outcomes_total", result="labelled")


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found
