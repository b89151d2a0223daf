"""The TypeScript client (client-ts/: buf-generated protobuf-es messages on @grpc/grpc-js)
calls real decision servers: answers, its trace context in the audit records, and the
callers' service config loaded (round robin: two servers behind one target both answer)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from server.app import DecisionApp
from server.audit.store import decisions
from tests.server.conftest import replica_settings, sample_record

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "client-ts/dist/examples/decide.js"


def run_example(target: str) -> list[dict[str, str]]:
    node = shutil.which("node")
    assert node, "node is missing (make setup-ci installs it with npm)"
    assert EXAMPLE.exists(), "client-ts is not built (make proto-check builds it)"
    done = subprocess.run(
        [node, str(EXAMPLE), "--target", target, "--timeout-ms", "2000", "--decides", "6"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


async def test_the_typescript_client_gets_answers_round_robin(replicas, start_app, feature_writer):
    await feature_writer.write_many([sample_record("BTC-USD"), sample_record("ETH-USD")])
    apps = [await start_app(torchserve=replica_settings(replicas)) for _ in range(2)]
    target = "ipv4:" + ",".join(f"127.0.0.1:{app.port}" for app in apps)

    answers = await asyncio.to_thread(run_example, target)

    decides = [("decide", f"t-{i}") for i in range(1, 7)]
    batch = [("decide_batch", "b-1"), ("decide_batch", "b-2")]
    assert [(a["call"], a["request_id"]) for a in answers] == decides + batch
    assert all(a["source"] == "PRIMARY" for a in answers), answers
    # Round robin (the service config's; a channel's default picks one address and keeps
    # it): the calls reached both servers, each recorded by the one that decided it, with
    # the caller's trace id.
    deciders = set()
    for answer in answers:
        index, row = await decided_by(apps, answer["decision_id"])
        assert row["trace_id"] == answer["trace_id"]
        deciders.add(index)
    assert deciders == {0, 1}


async def decided_by(apps: list[DecisionApp], decision_id: str) -> tuple[int, dict[str, Any]]:
    """Which app recorded ``decision_id`` in its audit store, and the row."""

    def find() -> tuple[int, dict[str, Any]] | None:
        for index, app in enumerate(apps):
            with app.audit.store.engine.connect() as conn:
                query = sa.select(decisions).where(decisions.c.decision_id == decision_id)
                if row := conn.execute(query).mappings().first():
                    return index, dict(row)
        return None

    deadline = time.monotonic() + 10
    while (found := await asyncio.to_thread(find)) is None:
        assert time.monotonic() < deadline, f"{decision_id} in no audit store"
        await asyncio.sleep(0.05)
    return found
