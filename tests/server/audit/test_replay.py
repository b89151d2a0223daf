"""Replay of recorded decisions against the recorded model, and against another one."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from decision_client.v1 import decision_pb2
from server.audit.reader import DecisionReader
from server.audit.replay import replay, select_decisions
from tests.conftest import REPO, shared_models, wait_for
from tests.server.conftest import (
    UNHURRIED,
    buy,
    decision_stub,
    replica_settings,
    sample_record,
)

pytestmark = pytest.mark.integration


async def recorded_decisions(app, stub, feature_writer) -> list[str]:
    """40 model decisions over varied features and both sides, plus one ABSTAIN."""
    for n, symbol in enumerate(("BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD")):
        await feature_writer.write_many(
            [sample_record(symbol, imbalance_l1=0.4 * n - 0.6, mid_return_5s_bps=3.0 - 2 * n)]
        )
    ids = []
    for i in range(40):
        request = buy(
            ("BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD")[i % 4],
            side=decision_pb2.SIDE_BUY if i % 3 else decision_pb2.SIDE_SELL,
            feature_overrides={"ofi_1s": (i - 20) / 10.0},
        )
        response = await stub.Decide(request, timeout=5.0)
        assert response.source == decision_pb2.SOURCE_PRIMARY, response.reason
        ids.append(response.decision_id)
    abstain = await stub.Decide(buy("NO-FEATURES"), timeout=5.0)
    ids.append(abstain.decision_id)
    # store_ok first: it holds once the shipper has created the tables and inserted.
    await asyncio.to_thread(
        wait_for,
        lambda: app.audit.shipper.store_ok and app.audit.store.count_decisions() == 41,
        20,
    )
    return ids


async def test_replay_matches_the_recorded_model_and_reports_a_different_one(
    replicas, model_store, start_app, channel_to, feature_writer, monkeypatch
):
    app = await start_app(torchserve=replica_settings(replicas), **UNHURRIED)
    ids = await recorded_decisions(app, decision_stub(channel_to(app)), feature_writer)
    records = select_decisions(DecisionReader(app.audit.store.engine), ids)
    assert len(records) == 41
    assert len({r["score"] for r in records if r["score"] is not None}) > 10  # varied

    # The running replica that serves the recorded version.
    report = await replay(records, replica=replicas["primary"].address)
    assert (report.replayed, report.differences, report.unreplayable) == (40, [], {})
    assert report.skipped == {"ABSTAIN: no model score to replay": 1}

    # The archive looked up by its version hash, in a TorchServe process of its own; the
    # store given relative to the working folder, as the CLI's default (.run/models) is.
    store, _ = model_store
    monkeypatch.chdir(store.parent)
    report = await replay(records, model_store=Path(store.name))
    assert (report.replayed, report.differences, report.unreplayable) == (40, [], {})

    # A deliberately different model: every score moves.
    other = shared_models(seed=1)["champion"]
    report = await replay(records, against=other.path)
    assert report.replayed == 40
    assert len(report.differences) == 40
    assert all(d.model_version == other.version for d in report.differences)

    # The version nowhere to be found: said, not silently passed.
    report = await replay(records, model_store=other.path.parent)
    assert report.replayed == 0
    assert sum(report.unreplayable.values()) == 40


async def test_replay_command_exit_codes(replicas, start_app, channel_to, feature_writer):
    app = await start_app(torchserve=replica_settings(replicas), **UNHURRIED)
    ids = await recorded_decisions(app, decision_stub(channel_to(app)), feature_writer)
    url = app.settings.audit.database_url

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "server.audit", "--database-url", url, "replay", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )

    same = await asyncio.to_thread(
        run, "--decision-id", ids[0], "--decision-id", ids[1], "--replica",
        replicas["primary"].address,
    )  # fmt: skip
    assert same.returncode == 0, same.stderr
    assert "selected 2, replayed 2, differences 0" in same.stdout

    none = await asyncio.to_thread(run, "--decision-id", "no-such-decision")
    assert none.returncode == 2
    assert "no recorded decision matches" in none.stderr

    missing = await asyncio.to_thread(
        run, "--since", "2000-01-01", "--model-store", str(REPO / "no-such-store")
    )
    assert missing.returncode == 2
    assert "NOT REPLAYED 40" in missing.stdout
